"""The forward process: q_sample (noising) and q_posterior (the posterior q(x_{t-1} | x_t, x_0))."""
from __future__ import annotations

from .. import backends
from . import _bound
from . import _checks as check
from ._registry import (Traffic, check_shape, element_bytes, like_plan, numel, per_sample, register,
                        t_and_rows)


def _q_sample_traffic(shape, dtype) -> Traffic:
    """Reads x0 and noise, writes x_t."""
    shape = check_shape(shape, dtype)
    n, e = numel(shape), element_bytes(dtype)
    return Traffic(2 * n * e + t_and_rows(shape, dtype), n * e)


def _q_sample_compiled(kernel, x0, t, noise, schedule):
    """The compiled op: x_t [B, ...] in x0's dtype."""
    return kernel.op(x0, t, noise, kernel.table(schedule, x0))


@register(
    tensors=("x0", "noise"),
    fakes={"q_sample": lambda x0, t, noise, table: like_plan(x0),
           "linear_backward": lambda g, t, table, kind, mean_type: (like_plan(g), like_plan(g))},
    traffic=_q_sample_traffic,
    bench=(dict(name="q_sample", label="q_sample", kind="q_sample", peer="add_noise"),),
    test_case=lambda a, schedule, **kw: q_sample(a["x0"], a["t"], a["noise"], schedule, **kw),
    reads=("x0", "noise", "t"),
    compiled=_q_sample_compiled,
)
@check.document
def q_sample(x0, t, noise, schedule, *, backend="auto", validate=None):
    """Forward noising: a sample of q(x_t | x_0), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

    Args:
        x0: clean samples [B, ...], float16 / bfloat16 / float32 / float64.
        <t>
        noise: the N(0, I) draw, x0's shape and dtype.
        <schedule>
        <backend>
        <validate>

    Returns:
        x_t: [B, ...] in x0's dtype (computed in float32, float64 for float64). Differentiable
        with respect to x0 and noise.

    Example:
        >>> import torch, ddpm_fast as F
        >>> schedule = F.NoiseSchedule.named("linear", 1000)
        >>> x0, noise = torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)
        >>> x_t = F.q_sample(x0, torch.tensor([0, 999]), noise, schedule)
        >>> x_t.shape, x_t.dtype
        (torch.Size([2, 3, 8, 8]), torch.float32)
        >>> x_t[:, 0, 0, 0]  # sqrt(1 - abar_t) at t = 0 and t = 999
        tensor([0.0100, 1.0000])
    """
    return _linear_in_x0_and_noise("q_sample", x0, t, noise, schedule, backend, validate)


def _linear_in_x0_and_noise(op, x0, t, noise, schedule, backend, validate):
    """Checks, then ``op`` (q_sample or velocity: a linear map of x0 and noise at t) on its backend (a call bound
    for these tensors' metadata: only t checked, ops._bound)."""
    native = check.cpu_native(op, backend, x0, noise)
    if native is not None:
        return native(x0, check.cpu_timesteps(t, x0, schedule), noise, schedule)
    key = _bound.key(op, backend, (schedule,), x0, noise)
    hit = _bound.lookup(key)
    if hit is not None:
        out = _bound.run(hit, t, schedule, validate, x0, noise)
        if out is not None:
            return out
    t, device = check.x_args("x0", x0, t, schedule, validate, noise=noise)
    fn = backends.route(backend, device.type, op, x0.dtype, x0, noise)[0]
    out = fn(x0, t, noise, schedule)
    if hit is None:  # a call with this key passed: keep its bound call
        _bound.bind(fn, key, x0.shape[0], device, x0, noise, schedule)
    return out


@register(
    tensors=("x0", "noise"),
    fakes={"velocity": lambda x0, t, noise, table: like_plan(x0)},
    traffic=_q_sample_traffic,
    bench=(dict(name="velocity", label="velocity", kind="q_sample"),),
    test_case=lambda a, schedule, **kw: velocity(a["x0"], a["t"], a["noise"], schedule, **kw),
    reads=("x0", "noise", "t"),
    compiled=_q_sample_compiled,  # the same call: kernel.op is the velocity op
    kernel_no_grad=backends.ALL_INPUTS,
)
@check.document
def velocity(x0, t, noise, schedule, *, backend="auto", validate=None):
    """The v-prediction target v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (Salimans & Ho; diffusers'
    get_velocity): what a model with mean_type "v" learns to output at x_t = q_sample(x0, t, noise).

    Args:
        x0: clean samples [B, ...], float16 / bfloat16 / float32 / float64.
        <t>
        noise: the N(0, I) draw, x0's shape and dtype.
        <schedule>
        <backend>
        <validate>

    Returns:
        v: [B, ...] in x0's dtype (computed in float32, float64 for float64). Differentiable with respect to
        x0 and noise (the gradient runs on the reference path: no fused backward).

    Example:
        >>> import torch, ddpm_fast as F
        >>> schedule = F.NoiseSchedule.named("linear", 1000)
        >>> x0, noise = torch.ones(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)
        >>> v = F.velocity(x0, torch.tensor([0, 999]), noise, schedule)
        >>> v[:, 0, 0, 0]  # -sqrt(1 - abar_t) at t = 0 and t = 999
        tensor([-0.0100, -1.0000])
    """
    return _linear_in_x0_and_noise("velocity", x0, t, noise, schedule, backend, validate)


def _q_posterior_traffic(shape, dtype) -> Traffic:
    """Reads x0 and x_t; writes the mean and the [B, 1, ...] variance and log variance."""
    shape = check_shape(shape, dtype)
    n, e, b = numel(shape), element_bytes(dtype), shape[0]
    return Traffic(2 * n * e + t_and_rows(shape, dtype), n * e + 2 * b * e)


def _q_posterior_compiled(kernel, x0, x_t, t, schedule):
    """The compiled op: (mean [B, ...], variance [B, 1, ...], clipped log variance [B, 1, ...]) in x0's dtype."""
    mean, var, logvar = kernel.op(x0, x_t, t, kernel.table(schedule, x0))
    shape = (-1,) + (1,) * (x0.ndim - 1)
    return mean, var.reshape(shape), logvar.reshape(shape)


@register(
    tensors=("x0", "x_t"),
    fakes={"q_posterior": lambda x0, x_t, t, table: (like_plan(x0), per_sample(x0, x0.dtype),
                                                     per_sample(x0, x0.dtype))},
    traffic=_q_posterior_traffic,
    bench=(dict(name="q_posterior", label="q_posterior", kind="q_posterior"),),
    test_case=lambda a, schedule, **kw: q_posterior(a["x0"], a["x_t"], a["t"], schedule, **kw),
    reads=("x0", "x_t", "t"),
    compiled=_q_posterior_compiled,
)
@check.document
def q_posterior(x0, x_t, t, schedule, *, backend="auto", validate=None):
    """The forward process posterior q(x_{t-1} | x_t, x_0).

    Args:
        x0: clean samples [B, ...] (float16 / bfloat16 / float32 / float64).
        x_t: noised samples, x0's shape and dtype.
        <t>
        <schedule>
        <backend>
        <validate>

    Returns:
        (mean, variance, log_variance): mean [B, ...] in x0's dtype (post_c1_t x0 + post_c2_t
        x_t); variance and log_variance [B, 1, ...] (broadcastable to x0), the log variance
        clipped: at t = 0, where the variance is 0, it is that of t = 1. Only mean is
        differentiable.

    Example:
        >>> import torch, ddpm_fast as F
        >>> schedule = F.NoiseSchedule.named("cosine", 1000)
        >>> x0 = torch.zeros(2, 3, 4, 4)
        >>> mean, var, logvar = F.q_posterior(x0, x0, torch.tensor([0, 500]), schedule)
        >>> mean.shape, var.shape, logvar.shape
        (torch.Size([2, 3, 4, 4]), torch.Size([2, 1, 1, 1]), torch.Size([2, 1, 1, 1]))
        >>> float(var[0]), bool(torch.isfinite(logvar).all())
        (0.0, True)
    """
    native = check.cpu_native("q_posterior", backend, x0, x_t)
    if native is not None:
        return native(x0, x_t, check.cpu_timesteps(t, x0, schedule), schedule)
    t, device = check.x_args("x0", x0, t, schedule, validate, x_t=x_t)
    return backends.route(backend, device.type, "q_posterior", x0.dtype, x0, x_t)[0](x0, x_t, t, schedule)
