"""The sampler steps: p_sample_step (ancestral DDPM) and ddim_step, noise given or drawn in-kernel."""
from __future__ import annotations

from .. import backends
from ..options import MEAN_IDS, VAR_IDS
from . import _checks as check
from ._registry import (Traffic, check_shape, element_bytes, like_plan, model_output_factor, numel, register,
                        t_and_rows, xstart_input_bytes)


def _step_traffic(shape, dtype, model_output_bytes, noise_read, mean_type, dynamic_threshold) -> Traffic:
    """Reads model_output (its ``model_output_bytes``), x_t (and noise if ``noise_read``); writes sample and
    pred_xstart. Dynamic thresholding reads x0's inputs once more."""
    shape = check_shape(shape, dtype)
    n, e = numel(shape), element_bytes(dtype)
    read = model_output_bytes * n * e + (1 + int(noise_read)) * n * e + t_and_rows(shape, dtype)
    if dynamic_threshold is not None:
        read += xstart_input_bytes(shape, dtype, mean_type)
    return Traffic(read, 2 * n * e)


def _p_sample_step_traffic(shape, dtype, *, mean_type="epsilon", var_type, noise_given=False,
                           dynamic_threshold=None) -> Traffic:
    """Reads model_output, x_t (and noise if given); writes sample and pred_xstart."""
    return _step_traffic(shape, dtype, model_output_factor(var_type), noise_given, mean_type, dynamic_threshold)


def _ddim_step_traffic(shape, dtype, *, mean_type="epsilon", eta=0.0, noise_given=False,
                       dynamic_threshold=None) -> Traffic:
    """Reads the model's mean half and x_t (and noise if given and eta > 0); writes sample and
    pred_xstart. A variance half in model_output is not read."""
    return _step_traffic(shape, dtype, 1, noise_given and eta != 0.0, mean_type, dynamic_threshold)


def _step_fake(mo, x_t, *_):
    return like_plan(x_t), like_plan(x_t)


def _ddpm_bench_traffic(case, shape, dtype):
    return _p_sample_step_traffic(shape, dtype, mean_type=case.mean_type, var_type=case.var_type,
                                  noise_given=bool(case.options.get("noise_given")))


def _step_compiled(kernel, model_output, x_t, t, schedule, mean_type, var_type, clip_denoised, dynamic_threshold,
                   sample_max_value, noise, draws_noise, generator, seed, *step_options):
    """A compiled DDPM or DDIM step: dict sample, pred_xstart. With draws_noise and noise=None the kernel draws
    N(0, I) itself (Philox, seeded from seed / generator); step_options go between the clip threshold and noise."""
    thresh = kernel.thresh(model_output, x_t, t, schedule, mean_type, var_type, dynamic_threshold, sample_max_value)
    philox, key = kernel.philox_seed(seed, generator, x_t.device) if draws_noise and noise is None else (0, None)
    sample, pred = kernel.op(model_output, x_t, t, kernel.table(schedule, x_t), MEAN_IDS[mean_type],
                             VAR_IDS[var_type], bool(clip_denoised), thresh, *step_options, noise, philox, key)
    return {"sample": sample, "pred_xstart": pred}


def _p_sample_step_compiled(kernel, model_output, x_t, t, schedule, *, mean_type, var_type, clip_denoised=True,
                            dynamic_threshold=None, sample_max_value=1.0, noise=None, generator=None, seed=None):
    """The compiled op: noise=None draws N(0, I) in-kernel (Philox)."""
    return _step_compiled(kernel, model_output, x_t, t, schedule, mean_type, var_type, clip_denoised,
                          dynamic_threshold, sample_max_value, noise, True, generator, seed)


@register(
    tensors=("x_t", "model_output", "noise"),
    fakes={"p_sample_step": _step_fake},
    traffic=_p_sample_step_traffic,
    bench=(dict(name="p_sample_step", label="p_sample_step (seeded)", kind="ddpm", peer="ddpm_step",
                traffic=_ddpm_bench_traffic),
           dict(name="p_sample_step_noise", label="p_sample_step (noise given)", kind="ddpm",
                options={"noise_given": True}, traffic=_ddpm_bench_traffic)),
    test_case=lambda a, schedule, **kw: p_sample_step(a["model_output"], a["x_t"], a["t"], schedule,
                                                      mean_type="epsilon", var_type="learned_range",
                                                      noise=a["noise"], **kw),
    reads=("model_output", "x_t", "noise", "t"),
    compiled=_p_sample_step_compiled,
    kernel_no_grad=backends.ALL_INPUTS,
)
@check.document
def p_sample_step(model_output, x_t, t, schedule, *, mean_type="epsilon", var_type="fixed_small",
                  clip_denoised=True,
                  dynamic_threshold=None, sample_max_value=1.0, noise=None, generator=None, seed=None,
                  backend="auto", validate=None):
    """One ancestral DDPM sampling step x_t -> x_{t-1} (no noise is added at t = 0).

    Args:
        <model_output>
        x_t: the current samples [B, C, ...] (float16 / bfloat16 / float32 / float64).
        <t>
        <schedule>
        <mean_type>
        <var_type>
        <clip_denoised>
        <dynamic_threshold>
        <sample_max_value>
        noise: the N(0, I) draw [B, C, ...] (x_t's shape and dtype), or None (default) to draw it
            from seed or generator.
        generator: used when noise and seed are None: a torch.Generator on x_t's device (default:
            torch's global generator).
        seed: an int in [0, 2**63): draw the noise from this seed; fused backends generate it
            in-kernel (Philox-4x32-10: element i of sample b gets lane g % 4 of
            triton.language.randn4x(seed, g // 4), g = b * N + i, i the row-major index), so a seed gives
            the same noise on every backend and layout, to float32 rounding. Takes precedence over generator.
        <backend>
        <validate>

    Returns:
        dict with "sample" (x_{t-1}) and "pred_xstart", [B, C, ...] in x_t's dtype.

    Example:
        >>> import torch, ddpm_fast as F
        >>> schedule = F.NoiseSchedule.named("linear", 1000)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> for i in reversed(range(3)):  # the last three steps of a sampling loop
        ...     eps = torch.zeros_like(x)  # stands in for the network
        ...     x = F.p_sample_step(eps, x, i, schedule, seed=i)["sample"]
        >>> x.shape, bool(torch.isfinite(x).all())
        (torch.Size([2, 3, 8, 8]), True)
    """
    t, fn = _step_args("p_sample_step", model_output, x_t, t, schedule, mean_type, var_type, dynamic_threshold,
                       sample_max_value, noise, generator, backend, validate)
    return fn(model_output, x_t, t, schedule, mean_type=mean_type, var_type=var_type,
              clip_denoised=bool(clip_denoised), dynamic_threshold=dynamic_threshold,
              sample_max_value=float(sample_max_value), noise=noise, generator=generator, seed=check.seed(seed))


def _step_args(op, model_output, x_t, t, schedule, mean_type, var_type, dynamic_threshold, sample_max_value, noise,
               generator, backend, validate):
    """The checks both steps share: (t checked, the function that runs the step)."""
    fn = check.cpu_native(op, backend, x_t, model_output, noise)
    if fn is not None:
        t = check.cpu_model_args(t, x_t, schedule, mean_type, var_type)
        check.thresholding(dynamic_threshold, sample_max_value)
        if generator is not None:
            check.generator(generator, x_t.device)
        return t, fn
    t, device = check.model_args(model_output, x_t, t, schedule, mean_type, var_type, validate, noise=noise)
    check.xstart_defined(mean_type, schedule)
    check.thresholding(dynamic_threshold, sample_max_value)
    check.generator(generator, device)
    return t, backends.route(backend, device.type, op, x_t.dtype, x_t, model_output, noise)[0]


def _ddim_step_compiled(kernel, model_output, x_t, t, schedule, *, eta=0.0, clip_denoised=True, dynamic_threshold=None,
                        sample_max_value=1.0, mean_type="epsilon", var_type="fixed_small", noise=None, generator=None,
                        seed=None):
    """The compiled op: with eta > 0 and noise=None the noise is drawn in-kernel."""
    return _step_compiled(kernel, model_output, x_t, t, schedule, mean_type, var_type, clip_denoised,
                          dynamic_threshold, sample_max_value, noise, eta != 0.0, generator, seed, float(eta))


@register(
    tensors=("x_t", "model_output", "noise"),
    fakes={"ddim_step": _step_fake},
    traffic=_ddim_step_traffic,
    bench=(dict(name="ddim_step", label="ddim_step (50 steps, eta 0)", kind="ddim", peer="ddim_step",
                options={"eta": 0.0},
                traffic=lambda case, shape, dtype: _ddim_step_traffic(shape, dtype, mean_type=case.mean_type,
                                                                      eta=case.options.get("eta", 0.0))),),
    test_case=lambda a, schedule, **kw: ddim_step(a["model_output"], a["x_t"], a["t"], schedule, eta=0.5,
                                                  var_type="learned_range", noise=a["noise"], **kw),
    reads=("model_output", "x_t", "noise", "t"),
    compiled=_ddim_step_compiled,
    kernel_no_grad=backends.ALL_INPUTS,
)
@check.document
def ddim_step(model_output, x_t, t, schedule, *, eta=0.0, clip_denoised=True, dynamic_threshold=None,
              sample_max_value=1.0, mean_type="epsilon", var_type="fixed_small", noise=None, generator=None, seed=None,
              backend="auto", validate=None):
    """One DDIM step from t to the schedule's previous step (works on respaced schedules).

    Args:
        <model_output>
        x_t: the current samples [B, C, ...] (float16 / bfloat16 / float32 / float64).
        <t>
        schedule: a ddpm_fast.NoiseSchedule, usually respaced
            (``schedule.respace(F.space_timesteps(1000, "ddim50"))``); t indexes its steps.
        eta: the DDIM noise scale, >= 0 (default 0: deterministic; 1: DDPM-like variance).
        <clip_denoised>
        <dynamic_threshold>
        <sample_max_value>
        <mean_type>
        var_type: only says whether model_output carries a variance half ("learned",
            "learned_range": [B, 2C, ...], the half is ignored) or not ("fixed_small", default;
            "fixed_large").
        noise: the N(0, I) draw for eta > 0 (x_t's shape and dtype), or None to draw it from seed
            or generator as in p_sample_step.
        generator: a torch.Generator on x_t's device, used when noise and seed are None.
        seed: an int in [0, 2**63): in-kernel Philox noise as in p_sample_step.
        <backend>
        <validate>

    Returns:
        dict with "sample" (x at the previous step) and "pred_xstart", [B, C, ...] in x_t's dtype.
        eps is re-derived from the (clipped) x_0 as in improved-diffusion.

    Example:
        >>> import torch, ddpm_fast as F
        >>> ddim = F.NoiseSchedule.named("linear", 1000).respace(F.space_timesteps(1000, "ddim10"))
        >>> x = torch.randn(2, 3, 8, 8)
        >>> for i in reversed(range(ddim.num_timesteps)):  # a 10-step DDIM loop, eta = 0
        ...     x = F.ddim_step(torch.zeros_like(x), x, i, ddim)["sample"]
        >>> x.shape, ddim.num_timesteps
        (torch.Size([2, 3, 8, 8]), 10)
    """
    t, fn = _step_args("ddim_step", model_output, x_t, t, schedule, mean_type, var_type, dynamic_threshold,
                       sample_max_value, noise, generator, backend, validate)
    return fn(model_output, x_t, t, schedule, eta=check.number("eta", eta, 0.0, float("inf")),
              clip_denoised=bool(clip_denoised), dynamic_threshold=dynamic_threshold,
              sample_max_value=float(sample_max_value), mean_type=mean_type, var_type=var_type, noise=noise,
              generator=generator, seed=check.seed(seed))
