"""The training losses: improved-diffusion's mse / rescaled_mse / kl / rescaled_kl with weightings."""
from __future__ import annotations

from .. import backends, options
from ..options import (KL_LOSS_TYPES, LEARNED_VAR_IDS, LEARNED_VAR_TYPES, LOSS_IDS, MEAN_IDS, VAR_IDS,
                       WEIGHTING_IDS)

KL_LOSS_IDS = tuple(LOSS_IDS[k] for k in KL_LOSS_TYPES)
SIMPLE_ID = WEIGHTING_IDS["simple"]
from ..reference import compute_dtype
from . import _bound
from . import _checks as check
from ._registry import (Traffic, check_shape, element_bytes, model_output_factor, numel, per_sample,
                        per_sample_bytes, register, saved_grad, t_and_rows)


def _loss_input_bytes(shape, dtype, mean_type, var_type, loss_type) -> int:
    """Bytes of the inputs a loss depends on (model_output, and x0 / noise as needed)."""
    n, e = numel(shape), element_bytes(dtype)
    if loss_type in KL_LOSS_TYPES or var_type in LEARNED_VAR_TYPES:
        # The vb term needs the posterior at x_t = q_sample(x0, noise): the whole model_output, x0, noise.
        return (model_output_factor(var_type) + 2) * n * e
    target = {"epsilon": 1, "x0": 1, "v": 2, "x_prev": 2}[mean_type]  # noise; x0; both; both
    return (1 + target) * n * e


def _training_losses_traffic(shape, dtype, *, mean_type, var_type, loss_type, backward=False) -> Traffic:
    """Forward: reads what the loss depends on, writes "loss" and "mse" / "vb" ([B] each).

    backward=True adds the backward pass: reads the [B] gradients and the inputs again, writes
    d loss / d model_output.
    """
    shape = check_shape(shape, dtype)
    n, e, b, ps = numel(shape), element_bytes(dtype), shape[0], per_sample_bytes(dtype)
    inputs = _loss_input_bytes(shape, dtype, mean_type, var_type, loss_type) + t_and_rows(shape, dtype)
    outputs = 2 if loss_type in KL_LOSS_TYPES else (3 if var_type in LEARNED_VAR_TYPES else 2)
    fwd = Traffic(inputs, outputs * b * ps)
    if not backward:
        return fwd
    return fwd + Traffic(inputs + outputs * b * ps, model_output_factor(var_type) * n * e)


def _fake(mo, x0, t, noise, table, mean_type, var_type, loss_type, weighting, gamma, need_grad):
    """(loss, mse, vb, w, d_out, d_v) as the op makes them: None for a result these options do not define
    (csrc/ops/losses.cpp)."""
    ct = compute_dtype(x0.dtype)
    learned = var_type in LEARNED_VAR_IDS
    kl = loss_type in KL_LOSS_IDS

    def made(want):
        return per_sample(x0, ct) if want else None

    weighted = not kl and weighting != SIMPLE_ID
    return (per_sample(x0, ct), made(not kl and (learned or weighted)), made(learned or kl), made(weighted),
            saved_grad(need_grad, x0, ct), saved_grad(need_grad and learned, x0, ct))


# (mean_type, var_type, loss_type, weighting) -> whether the loss reads x_0, for the combinations checked once
_CHECKED_OPTIONS: dict = {}


def _checked_options(mean_type, var_type, loss_type, weighting) -> bool:
    """Whether the loss reads x_0 (the vb term, or snr weights) with these options; ValueError naming the first
    unknown option or a combination that is not defined. A combination is checked once (one lookup after)."""
    key = (mean_type, var_type, loss_type, weighting)
    try:
        return _CHECKED_OPTIONS[key]
    except (KeyError, TypeError):  # not yet checked, or an unhashable value (options.check rejects it)
        pass
    for kind, value in zip(options.OPTIONS, key):  # OPTIONS' kinds are in the key's order
        options.check(kind, value)
    if weighting == "min_snr" and mean_type == "x_prev":
        raise ValueError("weighting: 'min_snr' is defined for mean_type 'epsilon', 'x0' or 'v', not 'x_prev'")
    reads_x0 = loss_type in KL_LOSS_TYPES or var_type in LEARNED_VAR_TYPES or weighting != "simple"
    _CHECKED_OPTIONS[key] = reads_x0
    return reads_x0


def _bench(name, label, var_type, backward):
    """A timed training_losses case (loss_type mse)."""
    return dict(name=name, label=label, kind="loss", var_type=var_type, backward=backward,
                options={"loss_type": "mse"},
                traffic=lambda case, shape, dtype: _training_losses_traffic(
                    shape, dtype, mean_type=case.mean_type, var_type=case.var_type,
                    loss_type=case.options.get("loss_type", "mse"), backward=case.backward))


def _training_losses_compiled(kernel, model_output, x0, t, noise, schedule, *, mean_type, var_type, loss_type,
                              weighting="simple", min_snr_gamma=5.0):
    """The compiled op: dict of [B] terms ("loss", "mse" and / or "vb") in the compute dtype (the op's first three
    results: its direct binding gives only those, its OpOverload its node's saved tensors too; mse is None where
    it equals loss: "mse" is then the loss tensor, as in improved-diffusion). need_grad is False: the op's autograd
    kernel saves the gradient when it builds a node."""
    loss, mse, vb = kernel.op(
        model_output, x0, t, noise, kernel.table(schedule, x0), MEAN_IDS[mean_type], VAR_IDS[var_type],
        LOSS_IDS[loss_type], WEIGHTING_IDS[weighting], float(min_snr_gamma), False)[:3]
    return options.loss_terms(loss_type, var_type, loss, mse, vb)


@register(
    tensors=("x0", "model_output", "noise"),
    fakes={"training_losses": _fake},
    traffic=_training_losses_traffic,
    bench=(_bench("losses_simple", "training_losses simple fwd", "fixed_small", False),
           _bench("losses_simple_bwd", "training_losses simple fwd+bwd", "fixed_small", True),
           _bench("losses_hybrid", "training_losses hybrid fwd", "learned_range", False),
           _bench("losses_hybrid_bwd", "training_losses hybrid fwd+bwd", "learned_range", True)),
    test_case=lambda a, schedule, **kw: training_losses(a["model_output"], a["x0"], a["t"], a["noise"], schedule,
                                                        mean_type="epsilon", var_type="learned_range",
                                                        loss_type="mse", **kw),
    reads=("model_output", "x0", "noise", "t"),
    compiled=_training_losses_compiled,
    kernel_no_grad=("x0", "noise"),
)
@check.document
def training_losses(model_output, x0, t, noise, schedule, *, mean_type="epsilon", var_type="fixed_small",
                    loss_type="mse",
                    weighting="simple", min_snr_gamma=5.0, backend="auto", validate=None):
    """improved-diffusion's training losses for the model's output at x_t = q_sample(x0, t, noise).

    The defaults (mean_type="epsilon", var_type="fixed_small", loss_type="mse", weighting="simple")
    give the simple DDPM loss, the mean squared error of the predicted noise.

    Args:
        <model_output>
        x0: clean samples [B, C, ...] in [-1, 1] (float16 / bfloat16 / float32 / float64).
        <t>
        noise: the noise x_t was made with, x0's shape and dtype.
        <schedule>
        <mean_type>
        <var_type>
        <loss_type>
        <weighting>
        min_snr_gamma: the gamma of "min_snr" weighting (> 0; default 5).
        <backend>
        <validate>

    Returns:
        dict of [B] float32 tensors (float64 for float64 inputs): "loss", plus "mse" (mse loss
        types) and "vb" (kl types, and mse types with a learned variance). Differentiable with
        respect to model_output.

    Example:
        >>> import torch, ddpm_fast as F
        >>> schedule = F.NoiseSchedule.named("cosine", 1000)
        >>> x0, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
        >>> t = torch.randint(0, 1000, (4,))
        >>> out = torch.zeros(4, 3, 8, 8, requires_grad=True)  # the model's predicted noise
        >>> losses = F.training_losses(out, x0, t, noise, schedule)  # the simple DDPM loss
        >>> sorted(losses), torch.allclose(losses["loss"], (noise ** 2).mean(dim=(1, 2, 3)))
        (['loss', 'mse'], True)
        >>> losses["loss"].mean().backward()
        >>> hybrid = F.training_losses(torch.randn(4, 6, 8, 8), x0, t, noise, schedule, var_type="learned_range")
        >>> sorted(hybrid)
        ['loss', 'mse', 'vb']
    """
    reads_x0 = _checked_options(mean_type, var_type, loss_type, weighting)
    if weighting == "min_snr":
        check.number("min_snr_gamma", min_snr_gamma, 0.0, float("inf"), lo_open=True)
    fn = check.cpu_native("training_losses", backend, x0, model_output, noise)
    key = hit = None
    if fn is not None:
        t = check.cpu_timesteps(t, x0, schedule)
    else:
        key = _bound.key("training_losses", backend, (schedule, mean_type, var_type, loss_type, weighting,
                                                      min_snr_gamma), model_output, x0, noise)
        hit = _bound.lookup(key)
        if hit is not None:  # these checks passed for this key before: only t's are left (ops._bound)
            terms = _bound.run(hit, t, schedule, validate, model_output, x0, noise)
            if terms is not None:
                return terms
        t, device = check.model_args(model_output, x0, t, schedule, mean_type, var_type, validate, x_name="x0",
                                     noise=noise)
    if reads_x0:
        check.xstart_defined(mean_type, schedule)  # the vb term and the snr weights need x_0 / finite coefficients
    if fn is None:
        fn = backends.route(backend, device.type, "training_losses", x0.dtype, x0, model_output, noise)[0]
    terms = fn(model_output, x0, t, noise, schedule, mean_type=mean_type, var_type=var_type, loss_type=loss_type,
               weighting=weighting, min_snr_gamma=float(min_snr_gamma))
    if key is not None and hit is None:  # a call with this key passed: keep its bound call (device: model_args')
        _bound.bind(fn, key, x0.shape[0], device, model_output, x0, noise, schedule, mean_type=mean_type,
                    var_type=var_type, loss_type=loss_type, weighting=weighting, min_snr_gamma=float(min_snr_gamma))
    return terms
