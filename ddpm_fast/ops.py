"""The public functional API: argument checks, then one call into the chosen backend.

Conventions for every op:
- Tensors are [B, ...] (batch first), floating point (float16, bfloat16, float32, float64), all on
  one device. Math runs in float32 (float64 for float64 inputs); elementwise outputs come back in
  the input dtype, per-sample [B] results in float32 (float64 for float64 inputs).
- t: 0-based timesteps, an integer tensor [B] on the inputs' device, or a Python int / 0-dim
  tensor meaning the same t for every sample. Values must lie in [0, T).
- validate: check t's range explicitly. Default: on for CPU tensors (free); off for CUDA tensors,
  where the check would cost a device sync -- there an out-of-range t is never read out of bounds:
  the compiled CUDA kernels and the reference's gather raise a device-side assert, the Triton kernels
  clamp t into [0, T) (and assert under TRITON_DEBUG=1). Pass validate=True to check on CUDA too.
- backend: "auto", "reference", "triton", "cpu", "cuda" or "cuda_emu" (the CUDA kernels emulated on CPU
  tensors, for checking; see ddpm_fast.backends).
"""
from __future__ import annotations

import torch

from . import backends
from .reference import LEARNED_VAR_TYPES, LOSS_TYPES, MEAN_TYPES, VAR_TYPES, WEIGHTINGS
from .schedule import NoiseSchedule

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = [
    "q_sample",
    "q_posterior",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "predict_xstart",
    "p_mean_variance",
    "vb_terms_bpd",
    "prior_bpd",
    "training_losses",
    "p_sample_step",
    "ddim_step",
]


# -- checks -----------------------------------------------------------------------------------
def _tensor(name, x, *, batched=True):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float16, bfloat16, float32 or float64 tensor, got {x.dtype}")
    if batched and x.ndim < 1:
        raise ValueError(f"{name}: expected a batched tensor [B, ...], got a 0-dim tensor")
    return x


def _same_device(**tensors):
    devices = {name: x.device for name, x in tensors.items() if x is not None}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name}: expected a tensor on {first} (like {first_name}), got one on {dev}")
    return first


def _same_shape(ref_name, ref, **tensors):
    for name, x in tensors.items():
        if x is not None and x.shape != ref.shape:
            raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (that of {ref_name}), got {tuple(x.shape)}")


def _same_dtype(ref_name, ref, **tensors):
    for name, x in tensors.items():
        if x is not None and x.dtype != ref.dtype:
            raise TypeError(f"{name}: expected dtype {ref.dtype} (that of {ref_name}), got {x.dtype}")


def _schedule(schedule):
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule: expected a ddpm_fast.NoiseSchedule, got {type(schedule).__name__}")
    return schedule


def _option(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}: unknown {value!r}; expected one of {allowed}")
    return value


def _timesteps(t, batch: int, schedule: NoiseSchedule, device: torch.device, validate):
    """t as an int64 tensor [B] on ``device``; range-checked when validate (default: not on CUDA)."""
    T = schedule.num_timesteps
    if isinstance(t, bool) or (isinstance(t, torch.Tensor) and t.dtype == torch.bool):
        raise TypeError("t: expected integer timesteps, got a bool")
    if isinstance(t, int):
        if not 0 <= t < T:
            raise ValueError(f"t: expected timesteps in [0, {T}), got {t}")
        return torch.full((batch,), t, dtype=torch.int64, device=device)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t: expected an int or an integer tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"t: expected an integer tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"t: expected a tensor on {device} (like the inputs), got one on {t.device}")
    if t.ndim == 0:
        t = t.reshape(1).expand(batch)
    elif t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(f"t: expected shape ({batch},) or a 0-dim tensor, got {tuple(t.shape)}")
    if t.dtype != torch.int64:
        t = t.to(torch.int64)
    if validate is None:
        validate = device.type != "cuda"
    if validate and t.numel() > 0:
        lo, hi = torch.aminmax(t)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= T:
            raise ValueError(f"t: expected timesteps in [0, {T}), got values in [{lo}, {hi}]")
    return t if t.is_contiguous() else t.contiguous()


def _model_output(model_output, x_t, var_type, x_name):
    """model_output is x_t's shape, or doubled in channels (dim 1) for a learned variance."""
    if var_type in LEARNED_VAR_TYPES:
        if x_t.ndim < 2:
            raise ValueError(f"{x_name}: a learned variance needs a channel dim 1, got shape {tuple(x_t.shape)}")
        want = (x_t.shape[0], 2 * x_t.shape[1], *x_t.shape[2:])
        if tuple(model_output.shape) != want:
            raise ValueError(
                f"model_output: var_type={var_type!r} needs {x_name}'s shape {tuple(x_t.shape)} with doubled "
                f"channels, {want} (mean and variance halves), got {tuple(model_output.shape)}"
            )
    elif model_output.shape != x_t.shape:
        raise ValueError(
            f"model_output: expected shape {tuple(x_t.shape)} (that of {x_name}) for var_type={var_type!r}, "
            f"got {tuple(model_output.shape)}"
        )


def _number(name, value, lo=None, hi=None, lo_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if value != value or (lo is not None and (value < lo or (lo_open and value == lo))) or (
        hi is not None and value > hi
    ):
        raise ValueError(f"{name}: expected a value in {'(' if lo_open else '['}{lo}, {hi}], got {value}")
    return value


def _thresholding(dynamic_threshold, sample_max_value):
    if dynamic_threshold is not None:
        _number("dynamic_threshold", dynamic_threshold, 0.0, 1.0, lo_open=True)
    _number("sample_max_value", sample_max_value, 1.0, float("inf"))


def _broadcastable(*shapes) -> bool:
    """Whether the shapes broadcast together (torch.broadcast_shapes costs ~25 us a call; this ~1 us)."""
    for k in range(1, max(len(s) for s in shapes) + 1):
        sizes = {s[-k] for s in shapes if len(s) >= k} - {1}
        if len(sizes) > 1:
            return False
    return True


def _seed(seed):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"seed: expected None or an int in [0, 2**63), got {seed!r}")
    return seed


def _generator(generator, device):
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator: expected a generator on {device.type}, got one on {generator.device}")


# -- the compiled CPU path: its C++ checks dtypes, shapes and t (range included) once ---------------
def _cpu_native(backend, *tensors):
    """ddpm_fast.native's CPU ops when ``backend`` runs these CPU tensors (None: absent) on the compiled
    extension, else None (the checked path). csrc/ops.cpp then checks dtypes, shapes and t once, raising the
    TypeError / ValueError the checks above raise, named the same: no check runs twice."""
    if backend != "auto" and backend != "cpu":
        return None
    for x in tensors:
        if x is not None and not (isinstance(x, torch.Tensor) and x.is_cpu):
            return None
    if tensors[0].ndim == 0:
        return None
    global _compiled_cpu_ops
    if _compiled_cpu_ops is False:  # resolved once: backends caches whether the extension loads
        _compiled_cpu_ops = getattr(backends.select("auto", "cpu"), "cpu_ops", None)
    if _compiled_cpu_ops is None and backend == "cpu":
        backends.select(backend, "cpu")  # raises BackendUnavailableError with the reason
    return _compiled_cpu_ops


_compiled_cpu_ops = False  # ddpm_fast.native.cpu_ops, or None without the compiled extension; False: not looked up


def _cpu_timesteps(t, x, schedule):
    """t for the compiled CPU op: an int range-checked here and broadcast; an int64 [B] CPU tensor as is
    (the C++ checks its shape and range, reading it on the host anyway); anything else via _timesteps."""
    if type(t) is int:
        if not 0 <= t < schedule.num_timesteps:
            raise ValueError(f"t: expected timesteps in [0, {schedule.num_timesteps}), got {t}")
        return torch.full((x.shape[0],), t, dtype=torch.int64)
    if isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.ndim == 1 and t.is_cpu and t.is_contiguous():
        return t
    return _timesteps(t, x.shape[0], schedule, x.device, False)


# -- ops --------------------------------------------------------------------------------------
def q_sample(x0, t, noise, schedule, *, backend="auto", validate=None):
    """Forward noising x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

    x0, noise: [B, ...] same shape and dtype; t: [B] int64. Returns x_t [B, ...] in x0's dtype.
    """
    native = _cpu_native(backend, x0, noise)
    if native is not None:
        return native.q_sample(x0, _cpu_timesteps(t, x0, _schedule(schedule)), noise, schedule)
    _tensor("x0", x0), _tensor("noise", noise)
    _same_shape("x0", x0, noise=noise), _same_dtype("x0", x0, noise=noise)
    device = _same_device(x0=x0, noise=noise)
    t = _timesteps(t, x0.shape[0], _schedule(schedule), device, validate)
    return backends.select(backend, device.type).q_sample(x0, t, noise, schedule)


def q_posterior(x0, x_t, t, schedule, *, backend="auto", validate=None):
    """q(x_{t-1} | x_t, x0): (mean [B, ...], variance [B, 1, ...], log_variance [B, 1, ...]).

    log_variance is the clipped one (post_var_1 at t = 0, where the variance itself is 0).
    """
    native = _cpu_native(backend, x0, x_t)
    if native is not None:
        return native.q_posterior(x0, x_t, _cpu_timesteps(t, x0, _schedule(schedule)), schedule)
    _tensor("x0", x0), _tensor("x_t", x_t)
    _same_shape("x0", x0, x_t=x_t), _same_dtype("x0", x0, x_t=x_t)
    device = _same_device(x0=x0, x_t=x_t)
    t = _timesteps(t, x0.shape[0], _schedule(schedule), device, validate)
    return backends.select(backend, device.type).q_posterior(x0, x_t, t, schedule)


def normal_kl(mean1, logvar1, mean2, logvar2, *, backend="auto"):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise in nats; arguments broadcast.

    Finite for log variances a network outputs (|logvar| up to ~80 in float32); beyond that
    exp() overflows to inf, as the true KL does.
    """
    names = ("mean1", "logvar1", "mean2", "logvar2")
    args = [_tensor(n, a, batched=False) for n, a in zip(names, (mean1, logvar1, mean2, logvar2))]
    device = _same_device(**dict(zip(names, args)))
    if not _broadcastable(*[a.shape for a in args]):
        raise ValueError(f"mean1, logvar1, mean2, logvar2: shapes {[tuple(a.shape) for a in args]} do not broadcast")
    return backends.select(backend, device.type).normal_kl(*args)


def discretized_gaussian_log_likelihood(x, means, log_scales, *, backend="auto"):
    """log p(x) for x in [-1, 1] discretized to 256 bins under N(means, exp(log_scales)^2), nats.

    x, means: same shape; log_scales broadcastable. Elementwise; floored at log(1e-12).
    """
    _tensor("x", x, batched=False), _tensor("means", means, batched=False)
    _tensor("log_scales", log_scales, batched=False)
    _same_shape("x", x, means=means)
    device = _same_device(x=x, means=means, log_scales=log_scales)
    if not _broadcastable(x.shape, log_scales.shape):
        raise ValueError(f"log_scales: shape {tuple(log_scales.shape)} does not broadcast to {tuple(x.shape)}")
    return backends.select(backend, device.type).discretized_gaussian_log_likelihood(x, means, log_scales)


def _xstart_defined(mean_type, schedule):
    """An epsilon model cannot give x_0 where abar_t = 0 (zero terminal SNR): x_0 = (x_t - 0 eps) / 0."""
    if mean_type == "epsilon" and schedule.zero_terminal_snr:
        raise ValueError(
            "mean_type: 'epsilon' cannot predict x_0 at the zero-terminal-SNR step of this schedule "
            "(alphas_cumprod[T-1] = 0); use mean_type 'v' (or 'x0') with rescale_zero_terminal_snr"
        )


def _model_args(model_output, x_t, t, schedule, mean_type, var_type, validate, x_name="x_t", **others):
    """Shared checks of (model_output, x_t, t, ...) ops; x_name names x_t. Returns (t, device)."""
    _option("mean_type", mean_type, MEAN_TYPES), _option("var_type", var_type, VAR_TYPES)
    _tensor("model_output", model_output), _tensor(x_name, x_t)
    for name, x in others.items():
        if x is not None:
            _tensor(name, x)
    _same_shape(x_name, x_t, **others), _same_dtype(x_name, x_t, model_output=model_output, **others)
    _model_output(model_output, x_t, var_type, x_name)
    device = _same_device(model_output=model_output, **{x_name: x_t}, **others)
    return _timesteps(t, x_t.shape[0], _schedule(schedule), device, validate), device


def _cpu_model_args(t, x, schedule, mean_type, var_type, xstart=True):
    """_model_args on the compiled CPU path: the options and t here, the tensors in C++."""
    _option("mean_type", mean_type, MEAN_TYPES), _option("var_type", var_type, VAR_TYPES)
    t = _cpu_timesteps(t, x, _schedule(schedule))
    if xstart:
        _xstart_defined(mean_type, schedule)
    return t


def predict_xstart(model_output, x_t, t, schedule, *, mean_type, backend="auto", validate=None):
    """x0 implied by the model's (mean) output for mean_type, unclipped: [B, C, ...] in x_t's dtype."""
    native = _cpu_native(backend, x_t, model_output)
    if native is not None:
        t = _cpu_model_args(t, x_t, schedule, mean_type, "fixed_small")
        return native.predict_xstart(model_output, x_t, t, schedule, mean_type=mean_type)
    t, device = _model_args(model_output, x_t, t, schedule, mean_type, "fixed_small", validate)
    _xstart_defined(mean_type, schedule)
    return backends.select(backend, device.type).predict_xstart(model_output, x_t, t, schedule, mean_type=mean_type)


def p_mean_variance(model_output, x_t, t, schedule, *, mean_type, var_type, clip_denoised=False,
                    dynamic_threshold=None, sample_max_value=1.0, backend="auto", validate=None):
    """The model's p(x_{t-1} | x_t): dict mean, variance, log_variance, pred_xstart.

    variance / log_variance are [B, 1, ...] for fixed variance types, [B, C, ...] for learned ones.
    """
    native = _cpu_native(backend, x_t, model_output)
    if native is not None:
        t = _cpu_model_args(t, x_t, schedule, mean_type, var_type)
        _thresholding(dynamic_threshold, sample_max_value)
        return native.p_mean_variance(
            model_output, x_t, t, schedule, mean_type=mean_type, var_type=var_type,
            clip_denoised=bool(clip_denoised), dynamic_threshold=dynamic_threshold,
            sample_max_value=float(sample_max_value))
    t, device = _model_args(model_output, x_t, t, schedule, mean_type, var_type, validate)
    _xstart_defined(mean_type, schedule)
    _thresholding(dynamic_threshold, sample_max_value)
    return backends.select(backend, device.type).p_mean_variance(
        model_output, x_t, t, schedule, mean_type=mean_type, var_type=var_type, clip_denoised=bool(clip_denoised),
        dynamic_threshold=dynamic_threshold, sample_max_value=float(sample_max_value),
    )


def vb_terms_bpd(model_output, x0, x_t, t, schedule, *, mean_type, var_type, clip_denoised=False,
                 backend="auto", validate=None):
    """The variational-bound term at t per sample, in bits/dim: [B] float32 (float64 for float64).

    KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0; the decoder NLL -log p(x0|x_1) for t = 0.
    model_output: [B, C, ...], or [B, 2C, ...] for learned variance types.
    """
    native = _cpu_native(backend, x_t, model_output, x0)
    if native is not None:
        t = _cpu_model_args(t, x_t, schedule, mean_type, var_type)
        return native.vb_terms_bpd(model_output, x0, x_t, t, schedule, mean_type=mean_type, var_type=var_type,
                                   clip_denoised=bool(clip_denoised))
    t, device = _model_args(model_output, x_t, t, schedule, mean_type, var_type, validate, x0=x0)
    _xstart_defined(mean_type, schedule)
    return backends.select(backend, device.type).vb_terms_bpd(
        model_output, x0, x_t, t, schedule, mean_type=mean_type, var_type=var_type, clip_denoised=bool(clip_denoised)
    )


def prior_bpd(x0, schedule, *, backend="auto"):
    """The prior term L_T = KL(q(x_{T-1}|x0) || N(0, I)) per sample in bits/dim: [B]."""
    _tensor("x0", x0)
    _schedule(schedule)
    return backends.select(backend, x0.device.type).prior_bpd(x0, schedule)


def training_losses(model_output, x0, t, noise, schedule, *, mean_type, var_type, loss_type,
                    weighting="simple", min_snr_gamma=5.0, backend="auto", validate=None):
    """improved-diffusion's training losses for the model's output at x_t = q_sample(x0, t, noise).

    Returns a dict of [B] tensors (float32, or float64): "loss"; "mse" (mse losses); "vb" (kl losses,
    and mse losses with a learned variance: the hybrid loss). weighting ("simple", "elbo",
    "min_snr" with min_snr_gamma) weights the mse; see ddpm_fast.reference.loss_weight.
    """
    _option("loss_type", loss_type, LOSS_TYPES), _option("weighting", weighting, WEIGHTINGS)
    if weighting == "min_snr":
        _number("min_snr_gamma", min_snr_gamma, 0.0, float("inf"), lo_open=True)
        if mean_type == "x_prev":
            raise ValueError("weighting: 'min_snr' is defined for mean_type 'epsilon', 'x0' or 'v', not 'x_prev'")
    native = _cpu_native(backend, x0, model_output, noise)
    if native is not None:
        t = _cpu_model_args(t, x0, schedule, mean_type, var_type, xstart=False)
        device = None
    else:
        t, device = _model_args(model_output, x0, t, schedule, mean_type, var_type, validate, x_name="x0",
                                noise=noise)
    if loss_type in ("kl", "rescaled_kl") or var_type in LEARNED_VAR_TYPES or weighting != "simple":
        _xstart_defined(mean_type, schedule)  # the vb term and the snr weights need x_0 / finite coefficients
    if native is not None:
        return native.training_losses(model_output, x0, t, noise, schedule, mean_type=mean_type, var_type=var_type,
                                      loss_type=loss_type, weighting=weighting, min_snr_gamma=float(min_snr_gamma))
    return backends.select(backend, device.type).training_losses(
        model_output, x0, t, noise, schedule, mean_type=mean_type, var_type=var_type, loss_type=loss_type,
        weighting=weighting, min_snr_gamma=float(min_snr_gamma),
    )


def p_sample_step(model_output, x_t, t, schedule, *, mean_type, var_type, clip_denoised=True,
                  dynamic_threshold=None, sample_max_value=1.0, noise=None, generator=None, seed=None,
                  backend="auto", validate=None):
    """One ancestral DDPM step x_t -> x_{t-1}: dict "sample" and "pred_xstart" [B, C, ...].

    noise: the N(0, I) draw [B, C, ...]; none is added at t = 0. When None, it is drawn from ``seed``
    (an int: deterministic for a given seed and backend; fused backends generate it in-kernel with
    Philox) or else from ``generator`` (default: torch's global generator).
    dynamic_threshold: a quantile in (0, 1] for Imagen's dynamic thresholding (replaces clipping).
    """
    native = _cpu_native(backend, x_t, model_output, noise)
    if native is not None:
        t = _cpu_model_args(t, x_t, schedule, mean_type, var_type)
        _thresholding(dynamic_threshold, sample_max_value)
        if generator is not None:
            _generator(generator, x_t.device)
        return native.p_sample_step(
            model_output, x_t, t, schedule, mean_type=mean_type, var_type=var_type,
            clip_denoised=bool(clip_denoised), dynamic_threshold=dynamic_threshold,
            sample_max_value=float(sample_max_value), noise=noise, generator=generator, seed=_seed(seed))
    t, device = _model_args(model_output, x_t, t, schedule, mean_type, var_type, validate, noise=noise)
    _xstart_defined(mean_type, schedule)
    _thresholding(dynamic_threshold, sample_max_value)
    _generator(generator, device)
    return backends.select(backend, device.type).p_sample_step(
        model_output, x_t, t, schedule, mean_type=mean_type, var_type=var_type, clip_denoised=bool(clip_denoised),
        dynamic_threshold=dynamic_threshold, sample_max_value=float(sample_max_value), noise=noise,
        generator=generator, seed=_seed(seed),
    )


def ddim_step(model_output, x_t, t, schedule, *, eta=0.0, clip_denoised=True, dynamic_threshold=None,
              sample_max_value=1.0, mean_type="epsilon", var_type="fixed_small", noise=None, generator=None, seed=None,
              backend="auto", validate=None):
    """One DDIM step from t to the schedule's previous step (respaced schedules work): dict
    "sample" and "pred_xstart". var_type only says whether model_output carries a variance half."""
    native = _cpu_native(backend, x_t, model_output, noise)
    if native is not None:
        t = _cpu_model_args(t, x_t, schedule, mean_type, var_type)
        eta = _number("eta", eta, 0.0, float("inf"))
        _thresholding(dynamic_threshold, sample_max_value)
        if generator is not None:
            _generator(generator, x_t.device)
        return native.ddim_step(
            model_output, x_t, t, schedule, eta=eta, clip_denoised=bool(clip_denoised),
            dynamic_threshold=dynamic_threshold, sample_max_value=float(sample_max_value), mean_type=mean_type,
            var_type=var_type, noise=noise, generator=generator, seed=_seed(seed))
    t, device = _model_args(model_output, x_t, t, schedule, mean_type, var_type, validate, noise=noise)
    _xstart_defined(mean_type, schedule)
    eta = _number("eta", eta, 0.0, float("inf"))
    _thresholding(dynamic_threshold, sample_max_value)
    _generator(generator, device)
    return backends.select(backend, device.type).ddim_step(
        model_output, x_t, t, schedule, eta=eta, clip_denoised=bool(clip_denoised),
        dynamic_threshold=dynamic_threshold, sample_max_value=float(sample_max_value), mean_type=mean_type,
        var_type=var_type, noise=noise, generator=generator, seed=_seed(seed),
    )
