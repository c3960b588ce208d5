"""The variational bound: normal_kl, discretized_gaussian_log_likelihood (the decoder NLL), vb_terms_bpd
(the bound's term at t) and prior_bpd (its term at T), in nats or bits per dimension."""
from __future__ import annotations

import functools

import torch

from .. import backends
from ..reference import compute_dtype
from ..options import LEARNED_VAR_IDS, MEAN_IDS, VAR_IDS
from . import _checks as check
from ._registry import (Traffic, broadcast_compute, broadcast_outputs, check_shape, element_bytes, like_plan,
                        model_output_factor, numel, per_sample, per_sample_bytes, register, saved_grad,
                        t_and_rows)


def _widest(*tensors) -> torch.dtype:
    """float64 if any input is float64 (these ops mix dtypes), else the first input's dtype."""
    for x in tensors:
        if x.dtype == torch.float64:
            return torch.float64
    return tensors[0].dtype


def _normal_kl_traffic(shapes, dtype) -> Traffic:
    """Reads mean1, logvar1, mean2, logvar2 (``shapes``: their four shapes); writes the broadcast KL."""
    if len(shapes) != 4:
        raise ValueError(f"shapes: expected the four argument shapes, got {len(shapes)}")
    shapes = [tuple(int(s) for s in sh) for sh in shapes]
    check_shape(shapes[0] or (1,), dtype)
    e = element_bytes(dtype)
    return Traffic(sum(numel(sh) for sh in shapes) * e, numel(torch.broadcast_shapes(*shapes)) * e)


def _normal_kl_compiled(kernel, mean1, logvar1, mean2, logvar2):
    """The compiled op: the KL elementwise in nats, in the promoted dtype of the inputs (they broadcast)."""
    return kernel.op(mean1, logvar1, mean2, logvar2)  # (the op returns the promoted dtype)


@register(
    tensors=("mean1", "logvar1", "mean2", "logvar2"),
    fakes={"normal_kl": lambda *xs: broadcast_outputs(1, xs, functools.reduce(torch.promote_types,
                                                                              [x.dtype for x in xs]))[0],
           "normal_kl_backward": lambda g, *xs: broadcast_outputs(4, (g, *xs), broadcast_compute((g, *xs)))},
    traffic=_normal_kl_traffic,
    compiled=_normal_kl_compiled,
)
@check.document
def normal_kl(mean1, logvar1, mean2, logvar2, *, backend="auto"):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Args:
        mean1, logvar1: the first Gaussian's mean and log variance.
        mean2, logvar2: the second Gaussian's. All four are floating-point tensors on one device
            whose shapes broadcast (a [B, 1, ...] log variance against a [B, C, ...] mean, say).
        <backend_short>

    Returns:
        The KL, of the broadcast shape. Finite for log variances a network outputs (|logvar| up to
        ~80 in float32); beyond that exp() overflows to inf, as the true KL does. Differentiable
        with respect to all four inputs.

    Example:
        >>> import torch, ddpm_fast as F
        >>> zero = torch.zeros(3)
        >>> F.normal_kl(zero, zero, zero, zero)
        tensor([0., 0., 0.])
        >>> F.normal_kl(torch.tensor([1.0]), torch.zeros(1), torch.zeros(1), torch.zeros(1))  # (1 - 0)^2 / 2
        tensor([0.5000])
    """
    names = ("mean1", "logvar1", "mean2", "logvar2")
    args = [check.tensor(n, a, batched=False) for n, a in zip(names, (mean1, logvar1, mean2, logvar2))]
    device = check.same_device(**dict(zip(names, args)))
    if not check.broadcastable(*[a.shape for a in args]):
        raise ValueError(f"mean1, logvar1, mean2, logvar2: shapes {[tuple(a.shape) for a in args]} do not broadcast")
    return backends.route(backend, device.type, "normal_kl", _widest(*args), *args)[0](*args)


def _dgll_traffic(shape, dtype, *, log_scales_shape=None) -> Traffic:
    """Reads x, means and log_scales (x's shape unless given); writes the log-likelihood."""
    shape = check_shape(shape, dtype)
    n, e = numel(shape), element_bytes(dtype)
    scales = n if log_scales_shape is None else numel(tuple(log_scales_shape))
    return Traffic((2 * n + scales) * e, n * e)


def _dgll_compiled(kernel, x, means, log_scales):
    """The compiled op: the elementwise log-likelihood in nats, in the promoted dtype of x and means."""
    return kernel.op(x, means, log_scales)  # (the op returns x's and means' promoted dtype)


@register(
    tensors=("x", "means", "log_scales"),
    fakes={"discretized_gaussian_log_likelihood": lambda x, means, log_scales: broadcast_outputs(
               1, (x, means, log_scales), torch.promote_types(x.dtype, means.dtype))[0],
           "dgll_backward": lambda g, *xs: broadcast_outputs(3, (g, *xs), broadcast_compute((g, *xs)))},
    traffic=_dgll_traffic,
    compiled=_dgll_compiled,
)
@check.document
def discretized_gaussian_log_likelihood(x, means, log_scales, *, backend="auto"):
    """log p(x) of images discretized to 256 bins of [-1, 1] under a Gaussian, elementwise, in nats.

    The decoder likelihood L_0 of DDPM: bin half-width 1/255, the edge bins open below -0.999
    and above 0.999, the normal cdf approximated as in improved-diffusion, the log floored at
    log(1e-12); computed without the float32 cancellation of cdf(x + 1/255) - cdf(x - 1/255)
    far from the mean.

    Args:
        x: the data, values in [-1, 1] (e.g. uint8 pixels / 127.5 - 1), any floating dtype.
        means: the Gaussian's means, x's shape and device.
        log_scales: the log standard deviations (not variances), broadcastable to x.
        <backend_short>

    Returns:
        log-likelihoods (<= 0), x's shape. Differentiable with respect to means and log_scales.

    Example:
        >>> import math, torch, ddpm_fast as F
        >>> x = torch.tensor([-1.0, 0.0, 1.0])
        >>> ll = F.discretized_gaussian_log_likelihood(x, x, torch.full((3,), math.log(1e-3)))
        >>> bool((ll <= 0).all()), bool((ll > -1e-3).all())  # a sharp Gaussian on the bin: p ~ 1
        (True, True)
    """
    check.tensor("x", x, batched=False), check.tensor("means", means, batched=False)
    check.tensor("log_scales", log_scales, batched=False)
    check.same_shape("x", x, means=means)
    device = check.same_device(x=x, means=means, log_scales=log_scales)
    if not check.broadcastable(x.shape, log_scales.shape):
        raise ValueError(f"log_scales: shape {tuple(log_scales.shape)} does not broadcast to {tuple(x.shape)}")
    fn = backends.route(backend, device.type, "discretized_gaussian_log_likelihood", _widest(x, means, log_scales),
                        x, means, log_scales)[0]
    return fn(x, means, log_scales)


def _vb_terms_bpd_traffic(shape, dtype, *, var_type) -> Traffic:
    """Reads model_output, x0 and x_t; writes one [B] result."""
    shape = check_shape(shape, dtype)
    n, e = numel(shape), element_bytes(dtype)
    read = (model_output_factor(var_type) + 2) * n * e + t_and_rows(shape, dtype)
    return Traffic(read, shape[0] * per_sample_bytes(dtype))


def _vb_fake(mo, x0, x_t, t, table, mean_type, var_type, clip, need_grad):
    ct = compute_dtype(x0.dtype)
    learned = var_type in LEARNED_VAR_IDS
    return per_sample(x0, ct), saved_grad(need_grad, x0, ct), saved_grad(need_grad and learned, x0, ct)


def _scale_halves_fake(d_out, d_v, mo, g_loss, g_mse, g_vb, w, *coefficients):
    """layout.h alloc_grad_like: model_output's suggested memory format. Reads no metadata of the [B] gradients:
    under compiled autograd they are placeholders of no real shape."""
    from torch._prims_common import suggest_memory_format

    return torch.empty(mo.shape, dtype=mo.dtype, device=mo.device, memory_format=suggest_memory_format(mo))


def _vb_terms_bpd_compiled(kernel, model_output, x0, x_t, t, schedule, *, mean_type, var_type, clip_denoised=False):
    """The compiled op: the bound's term at t per sample in bits/dim, [B] in the compute dtype (the op's first
    result: its direct binding gives only that one, its OpOverload its node's saved gradients too). need_grad is
    False: the op's autograd kernel saves the gradients when it builds a node."""
    return kernel.op(model_output, x0, x_t, t, kernel.table(schedule, x0), MEAN_IDS[mean_type], VAR_IDS[var_type],
                     bool(clip_denoised), False)[0]


@register(
    tensors=("x_t", "model_output", "x0"),
    fakes={"vb_terms_bpd": _vb_fake, "scale_halves": _scale_halves_fake},
    traffic=_vb_terms_bpd_traffic,
    bench=(dict(name="vb_terms_bpd", label="vb_terms_bpd (learned_range)", kind="vb", var_type="learned_range",
                traffic=lambda case, shape, dtype: _vb_terms_bpd_traffic(shape, dtype, var_type=case.var_type)),),
    test_case=lambda a, schedule, **kw: vb_terms_bpd(a["model_output"], a["x0"], a["x_t"], a["t"], schedule,
                                                     mean_type="epsilon", var_type="learned_range", **kw),
    reads=("model_output", "x0", "x_t", "t"),
    compiled=_vb_terms_bpd_compiled,
    kernel_no_grad=("x0", "x_t"),
)
@check.document
def vb_terms_bpd(model_output, x0, x_t, t, schedule, *, mean_type="epsilon", var_type="fixed_small",
                 clip_denoised=False,
                 backend="auto", validate=None):
    """The variational-bound term of each sample at its t, in bits per dimension.

    L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0 and the decoder NLL
    L_0 = -log p(x0 | x_1) for t = 0, each averaged over the non-batch dimensions and divided by
    ln 2 (as improved-diffusion's _vb_terms_bpd).

    Args:
        <model_output>
        x0: clean samples [B, C, ...], values in [-1, 1] (the decoder term discretizes them).
        x_t: noised samples, x0's shape and dtype.
        <t>
        <schedule>
        <mean_type>
        <var_type>
        clip_denoised: clamp the predicted x_0 to [-1, 1] before it is used. Default False.
        <backend>
        <validate>

    Returns:
        [B] float32 (float64 for float64 inputs). Differentiable with respect to model_output.

    Example:
        >>> import torch, ddpm_fast as F
        >>> schedule = F.NoiseSchedule.named("linear", 1000)
        >>> x0, eps = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
        >>> t = torch.tensor([0, 1, 500, 999])
        >>> x_t = F.q_sample(x0, t, eps, schedule)
        >>> vb = F.vb_terms_bpd(eps, x0, x_t, t, schedule)  # a perfect epsilon model, fixed_small
        >>> vb.shape, bool(vb[1:].abs().max() < 1e-3)  # its KL terms vanish
        (torch.Size([4]), True)
    """
    native = check.cpu_native("vb_terms_bpd", backend, x_t, model_output, x0)
    if native is not None:
        t = check.cpu_model_args(t, x_t, schedule, mean_type, var_type)
        fn = native
    else:
        t, device = check.model_args(model_output, x_t, t, schedule, mean_type, var_type, validate, x0=x0)
        check.xstart_defined(mean_type, schedule)
        fn = backends.route(backend, device.type, "vb_terms_bpd", x_t.dtype, x_t, model_output, x0)[0]
    return fn(model_output, x0, x_t, t, schedule, mean_type=mean_type, var_type=var_type,
              clip_denoised=bool(clip_denoised))


def _prior_bpd_traffic(shape, dtype) -> Traffic:
    """Reads x0 (and the table's last row); writes one [B] result."""
    shape = check_shape(shape, dtype)
    return Traffic(numel(shape) * element_bytes(dtype), shape[0] * per_sample_bytes(dtype))


def _prior_bpd_compiled(kernel, x0, schedule):
    """The compiled op: KL(q(x_{T-1} | x0) || N(0, I)) per sample in bits/dim, [B]."""
    return kernel.op(x0, kernel.table(schedule, x0))


@register(
    tensors=("x0",),
    fakes={"prior_bpd": lambda x0, table: per_sample(x0, compute_dtype(x0.dtype)),
           "prior_bpd_backward": lambda g, x0, table: like_plan(x0)},
    traffic=_prior_bpd_traffic,
    test_case=lambda a, schedule, **kw: prior_bpd(a["x0"], schedule, **{k: v for k, v in kw.items()
                                                                         if k != "validate"}),
    reads=("x0",),
    compiled=_prior_bpd_compiled,
)
@check.document
def prior_bpd(x0, schedule, *, backend="auto"):
    """The prior term L_T = KL(q(x_{T-1} | x0) || N(0, I)) of each sample, in bits per dimension.

    Args:
        x0: clean samples [B, ...] (float16 / bfloat16 / float32 / float64).
        <schedule>
        <backend_short>

    Returns:
        [B] float32 (float64 for float64 inputs), the mean over the non-batch dimensions
        divided by ln 2. Differentiable with respect to x0.

    Example:
        >>> import torch, ddpm_fast as F
        >>> prior = F.prior_bpd(torch.rand(2, 3, 8, 8) * 2 - 1, F.NoiseSchedule.named("linear", 1000))
        >>> prior.shape, bool((prior >= 0).all() and (prior < 1e-4).all())  # T = 1000 leaves ~nothing
        (torch.Size([2]), True)
    """
    check.tensor("x0", x0)
    check.schedule(schedule)
    return backends.route(backend, x0.device.type, "prior_bpd", x0.dtype, x0)[0](x0, schedule)
