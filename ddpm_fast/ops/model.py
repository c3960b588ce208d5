"""The model's reverse step: predict_xstart (x_0 from the network's output) and p_mean_variance."""
from __future__ import annotations

from .. import backends
from ..options import LEARNED_VAR_IDS, LEARNED_VAR_TYPES, MEAN_IDS, VAR_IDS
from . import _checks as check
from ._registry import (Traffic, check_shape, element_bytes, like_plan, model_output_factor, numel, per_sample,
                        register, t_and_rows, xstart_input_bytes)


def _predict_xstart_traffic(shape, dtype, *, mean_type) -> Traffic:
    """Reads the model's mean half (and x_t unless mean_type is x0); writes x0."""
    shape = check_shape(shape, dtype)
    return Traffic(xstart_input_bytes(shape, dtype, mean_type) + t_and_rows(shape, dtype),
                   numel(shape) * element_bytes(dtype))


def _predict_xstart_compiled(kernel, model_output, x_t, t, schedule, *, mean_type):
    """The compiled op: x0 implied by the model output (unclipped), [B, C, ...] in x_t's dtype."""
    return kernel.op(model_output, x_t, t, kernel.table(schedule, x_t), MEAN_IDS[mean_type])


@register(
    tensors=("x_t", "model_output"),
    fakes={"predict_xstart": lambda mo, x_t, t, table, mean_type: like_plan(x_t)},
    traffic=_predict_xstart_traffic,
    test_case=lambda a, schedule, **kw: predict_xstart(a["eps"], a["x_t"], a["t"], schedule, mean_type="epsilon",
                                                       **kw),
    reads=("eps", "x_t", "t"),
    compiled=_predict_xstart_compiled,
)
@check.document
def predict_xstart(model_output, x_t, t, schedule, *, mean_type="epsilon", backend="auto", validate=None):
    """The clean sample x_0 implied by the model's (mean) output, unclipped.

    x_0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps (epsilon), the output itself (x0),
    (x_{t-1} - post_c2_t x_t) / post_c1_t (x_prev), sqrt(abar_t) x_t - sqrt(1 - abar_t) v (v).

    Args:
        model_output: the network's (mean) output, x_t's shape.
        x_t: noised samples [B, ...] (float16 / bfloat16 / float32 / float64).
        <t>
        <schedule>
        <mean_type>
        <backend>
        <validate>

    Returns:
        x_0 [B, ...] in x_t's dtype. Differentiable with respect to model_output and x_t.
        ValueError for mean_type "epsilon" on a zero-terminal-SNR schedule (x_0 is undefined at
        its last step; use "v").

    Example:
        >>> import torch, ddpm_fast as F
        >>> schedule = F.NoiseSchedule.named("linear", 1000)
        >>> x0, eps = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4)
        >>> t = torch.tensor([10, 900])
        >>> x_t = F.q_sample(x0, t, eps, schedule)
        >>> torch.allclose(F.predict_xstart(eps, x_t, t, schedule), x0, atol=1e-3)  # mean_type="epsilon"
        True
    """
    native = check.cpu_native("predict_xstart", backend, x_t, model_output)
    if native is not None:
        t = check.cpu_model_args(t, x_t, schedule, mean_type, "fixed_small")
        return native(model_output, x_t, t, schedule, mean_type=mean_type)
    t, device = check.model_args(model_output, x_t, t, schedule, mean_type, "fixed_small", validate)
    check.xstart_defined(mean_type, schedule)
    fn = backends.route(backend, device.type, "predict_xstart", x_t.dtype, x_t, model_output)[0]
    return fn(model_output, x_t, t, schedule, mean_type=mean_type)


def _p_mean_variance_traffic(shape, dtype, *, mean_type, var_type, dynamic_threshold=None) -> Traffic:
    """Reads model_output and x_t; writes mean, pred_xstart and the variance and log variance
    ([B, 1, ...] for fixed types, [B, C, ...] for learned ones)."""
    shape = check_shape(shape, dtype)
    n, e, b = numel(shape), element_bytes(dtype), shape[0]
    read = (model_output_factor(var_type) + 1) * n * e + t_and_rows(shape, dtype)
    if dynamic_threshold is not None:
        read += xstart_input_bytes(shape, dtype, mean_type)
    var = n if var_type in LEARNED_VAR_TYPES else b
    return Traffic(read, 2 * n * e + 2 * var * e)


def _p_mean_variance_fake(mo, x_t, t, table, mean_type, var_type, clip, thresh):
    if var_type in LEARNED_VAR_IDS:
        return like_plan(x_t), like_plan(x_t), like_plan(x_t), like_plan(x_t)
    return like_plan(x_t), per_sample(x_t, x_t.dtype), per_sample(x_t, x_t.dtype), like_plan(x_t)


def _p_mean_variance_compiled(kernel, model_output, x_t, t, schedule, *, mean_type, var_type, clip_denoised=False,
                               dynamic_threshold=None, sample_max_value=1.0):
    """The compiled op: dict mean, variance, log_variance, pred_xstart (x_t's dtype; fixed variances [B, 1, ...])."""
    thresh = kernel.thresh(model_output, x_t, t, schedule, mean_type, var_type, dynamic_threshold, sample_max_value)
    mean, var, logvar, pred = kernel.op(model_output, x_t, t, kernel.table(schedule, x_t), MEAN_IDS[mean_type],
                                        VAR_IDS[var_type], bool(clip_denoised), thresh)
    if var_type not in LEARNED_VAR_TYPES:
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        var, logvar = var.reshape(shape), logvar.reshape(shape)
    return {"mean": mean, "variance": var, "log_variance": logvar, "pred_xstart": pred}


@register(
    tensors=("x_t", "model_output"),
    fakes={"p_mean_variance": _p_mean_variance_fake},
    traffic=_p_mean_variance_traffic,
    test_case=lambda a, schedule, **kw: p_mean_variance(a["model_output"], a["x_t"], a["t"], schedule,
                                                        mean_type="epsilon", var_type="learned_range", **kw),
    reads=("model_output", "x_t", "t"),
    compiled=_p_mean_variance_compiled,
    kernel_no_grad=backends.ALL_INPUTS,
)
@check.document
def p_mean_variance(model_output, x_t, t, schedule, *, mean_type="epsilon", var_type="fixed_small",
                    clip_denoised=False,
                    dynamic_threshold=None, sample_max_value=1.0, backend="auto", validate=None):
    """The model's reverse step p(x_{t-1} | x_t): its mean, variance and predicted x_0.

    Args:
        <model_output>
        x_t: noised samples [B, C, ...] (float16 / bfloat16 / float32 / float64).
        <t>
        <schedule>
        <mean_type>
        <var_type>
        clip_denoised: clamp the predicted x_0 to [-1, 1] before it is used. Default False.
        <dynamic_threshold>
        <sample_max_value>
        <backend>
        <validate>

    Returns:
        dict with "mean" [B, C, ...], "variance" and "log_variance" ([B, 1, ...] for fixed
        variance types, [B, C, ...] for learned ones) and "pred_xstart" [B, C, ...], in x_t's
        dtype.

    Example:
        >>> import torch, ddpm_fast as F
        >>> schedule = F.NoiseSchedule.named("cosine", 100)
        >>> x_t, out = torch.randn(2, 3, 4, 4), torch.randn(2, 6, 4, 4)  # eps and variance halves
        >>> p = F.p_mean_variance(out, x_t, torch.tensor([5, 50]), schedule, var_type="learned_range",
        ...                       clip_denoised=True)
        >>> sorted(p), p["variance"].shape, float(p["pred_xstart"].abs().max()) <= 1.0
        (['log_variance', 'mean', 'pred_xstart', 'variance'], torch.Size([2, 3, 4, 4]), True)
    """
    native = check.cpu_native("p_mean_variance", backend, x_t, model_output)
    if native is not None:
        t = check.cpu_model_args(t, x_t, schedule, mean_type, var_type)
        check.thresholding(dynamic_threshold, sample_max_value)
        fn = native
    else:
        t, device = check.model_args(model_output, x_t, t, schedule, mean_type, var_type, validate)
        check.xstart_defined(mean_type, schedule)
        check.thresholding(dynamic_threshold, sample_max_value)
        fn = backends.route(backend, device.type, "p_mean_variance", x_t.dtype, x_t, model_output)[0]
    return fn(model_output, x_t, t, schedule, mean_type=mean_type, var_type=var_type,
              clip_denoised=bool(clip_denoised), dynamic_threshold=dynamic_threshold,
              sample_max_value=float(sample_max_value))
