"""The compiled backends ("cpu" and "cuda"): ddpm_fast._C's ops (torch.ops.ddpm_fast) with autograd.

The same code, run as ddpm_fast.cuda_emu with OPS_NAMESPACE = "ddpm_fast_emu", is backend "cuda_emu":
the CUDA kernels emulated on the CPU (ddpm_fast._build.load_emu).

Same ops and signatures as ddpm_fast.reference; arguments were checked by ddpm_fast.ops. Math runs in
float32 (float64 for float64 inputs) on the schedule's packed table; elementwise outputs come back in
the input dtype, [B] reductions in the compute dtype. The library is built just in time on first use
(ddpm_fast._build); availability() says why when it cannot be built or loaded.

Gradients (autograd kernels in C++, csrc/autograd.cpp): fused backward kernels for q_sample,
q_posterior (mean), predict_xstart, normal_kl, discretized_gaussian_log_likelihood, prior_bpd, and
vb_terms_bpd / training_losses w.r.t. model_output. When x0, x_t or noise of those two losses, or any
input of p_mean_variance and the sampler steps, requires grad, the op runs on the reference path
instead (same results, ordinary autograd), so no gradient is ever silently dropped.
"""
from __future__ import annotations

import functools
import sys
import types
import weakref

import torch

from . import _build, reference
from .reference import LOSS_TYPES, MEAN_TYPES, VAR_TYPES, WEIGHTINGS, compute_dtype

# torch.library namespace of the ops: "ddpm_fast" here, "ddpm_fast_emu" when ddpm_fast.cuda_emu runs this code
OPS_NAMESPACE = globals().get("OPS_NAMESPACE", "ddpm_fast")
EMULATED = OPS_NAMESPACE == "ddpm_fast_emu"
BACKEND_NAMES = ("cuda_emu",) if EMULATED else ("cpu", "cuda")
_registered = False


def _launch_tiny_cuda_kernel() -> None:
    """One q_sample of one element on the current GPU: raises when the library has no kernel image for it."""
    from .schedule import COLUMNS

    schedule_table = torch.zeros(1, len(COLUMNS), device="cuda")
    x = torch.zeros(1, 1, device="cuda")
    torch.ops.ddpm_fast.q_sample(x, torch.zeros(1, dtype=torch.int64, device="cuda"), x, schedule_table)
    torch.cuda.synchronize()


def _cuda_runs() -> tuple[bool, str]:
    """(the CUDA kernels run on the current GPU, why not), tried once per process."""
    if "cuda_runs" not in _build._state:
        try:
            _launch_tiny_cuda_kernel()
            _build._state["cuda_runs"] = (True, "")
        except Exception as exc:  # noqa: BLE001 -- e.g. "no kernel image is available for execution"
            module = sys.modules.get("ddpm_fast._C")
            archs = ";".join(getattr(module, "cuda_archs", []) or []) or "?"
            name, cap = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
            _build._state["cuda_runs"] = (False, (
                f"the CUDA kernels (built for sm {archs}) do not run on {name} (sm_{cap[0]}{cap[1]}): "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; set DDPM_FAST_CUDA_ARCHS "
                "to include it and delete the build cache to rebuild"))
    return _build._state["cuda_runs"]


def availability(name: str = BACKEND_NAMES[0]) -> tuple[bool, str]:
    """(available, reason if not) for backend "cpu" or "cuda" (or "cuda_emu" as ddpm_fast.cuda_emu);
    builds the library on first call. "cuda" is available only after one tiny kernel ran on the GPU."""
    if name not in BACKEND_NAMES:
        return False, f"{__name__} runs backends {BACKEND_NAMES}, not {name!r}"
    if EMULATED:
        lib, reason = _build.load_emu()
        if lib is None:
            return False, reason
        _register_fakes()
        return True, ""
    module, reason = _build.load()
    if module is None:
        return False, reason
    _register_fakes()
    if name == "cuda":
        if not module.with_cuda:
            return False, f"the compiled extension has no CUDA kernels: {module.no_cuda_reason}"
        return _cuda_runs()
    return True, ""


def _ops():
    if not _registered:  # direct use of this module without availability() first
        ok, reason = availability()
        if not ok:
            raise RuntimeError(f"ddpm_fast's compiled library ({OPS_NAMESPACE}) is unavailable: {reason}")
    return getattr(torch.ops, OPS_NAMESPACE)


_OVERLOADS: dict = {}


def _op(name):
    """torch.ops.ddpm_fast.<name>.default, looked up once (the overload packet's call costs ~3 us more)."""
    op = _OVERLOADS.get(name)
    if op is None:
        op = _OVERLOADS[name] = getattr(_ops(), name).default
    return op


_CPU_TABLES = weakref.WeakKeyDictionary()  # schedule -> {dtype: its CPU table}: no device hashing per call


def _table(schedule, x):
    if x.is_cpu:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        tables = _CPU_TABLES.get(schedule)
        if tables is None:
            tables = _CPU_TABLES[schedule] = {}
        table = tables.get(dtype)
        if table is None:
            table = tables[dtype] = schedule.table(torch.device("cpu"), dtype)
        return table
    return schedule.table(x.device, compute_dtype(x.dtype))


def _grad_needed(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# -- fake (meta) implementations: output shapes, dtypes and layouts, symbolic shapes allowed ----------
def _plan_strides(x):
    """Strides of csrc/layout.h's make_plan layout for x's shape: batch outermost (stride N), the other
    dims in x's memory order when they are dense (any permutation), else row-major."""
    sizes, dims = x.shape, range(1, x.ndim)
    big = sorted((d for d in dims if sizes[d] != 1), key=lambda d: -x.stride(d))  # stable, as std::stable_sort
    order = [d for d in dims if sizes[d] == 1] + big
    expect = 1
    for d in reversed(big):
        if x.stride(d) != expect:
            order = list(dims)  # not dense: row-major
            break
        expect *= sizes[d]
    strides, s = [1] * x.ndim, 1
    for d in reversed(order):
        strides[d], s = s, s * sizes[d]
    strides[0] = s
    return strides


def _like_plan(x, dtype=None):
    return torch.empty_strided(x.shape, _plan_strides(x), dtype=dtype or x.dtype, device=x.device)


def _per_sample(x, dtype):
    return x.new_empty((x.shape[0],), dtype=dtype)


def _saved_grad(need, x, ct):
    """The forward's saved gradient buffer: plan-shaped when needed, else an empty [0] tensor."""
    return _like_plan(x, ct) if need else x.new_empty((0,), dtype=ct)


def _bcast_outs(n, xs, dtype):
    shape = torch.broadcast_shapes(*[x.shape for x in xs])
    return tuple(xs[0].new_empty(shape, dtype=dtype) for _ in range(n))


def _bcast_compute(xs):
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _fake_p_mean_variance(mo, x_t, t, table, mean_type, var_type, clip, thresh):
    if VAR_TYPES[var_type] in reference.LEARNED_VAR_TYPES:
        return _like_plan(x_t), _like_plan(x_t), _like_plan(x_t), _like_plan(x_t)
    return _like_plan(x_t), _per_sample(x_t, x_t.dtype), _per_sample(x_t, x_t.dtype), _like_plan(x_t)


def _fake_vb(mo, x0, x_t, t, table, mean_type, var_type, clip, need_grad):
    ct = compute_dtype(x0.dtype)
    learned = VAR_TYPES[var_type] in reference.LEARNED_VAR_TYPES
    return _per_sample(x0, ct), _saved_grad(need_grad, x0, ct), _saved_grad(need_grad and learned, x0, ct)


def _fake_train(mo, x0, t, noise, table, mean_type, var_type, loss_type, weighting, gamma, need_grad):
    ct = compute_dtype(x0.dtype)
    learned = VAR_TYPES[var_type] in reference.LEARNED_VAR_TYPES
    return (*(_per_sample(x0, ct) for _ in range(4)), _saved_grad(need_grad, x0, ct),
            _saved_grad(need_grad and learned, x0, ct))


def _fake_scale_halves(d_out, d_v, s_mean, s_var, mo):
    """layout.h alloc_grad_like: model_output's suggested memory format."""
    from torch._prims_common import suggest_memory_format

    return torch.empty(mo.shape, dtype=mo.dtype, device=mo.device, memory_format=suggest_memory_format(mo))


def _fake_normal_kl(*xs):
    return _bcast_outs(1, xs, functools.reduce(torch.promote_types, [x.dtype for x in xs]))[0]


def _fake_dgll(x, means, log_scales):
    return _bcast_outs(1, (x, means, log_scales), torch.promote_types(x.dtype, means.dtype))[0]


_FAKES = {
    "q_sample": lambda x0, t, noise, table: _like_plan(x0),
    "linear_backward": lambda g, t, table, kind, mean_type: (_like_plan(g), _like_plan(g)),
    "q_posterior": lambda x0, x_t, t, table: (_like_plan(x0), _per_sample(x0, x0.dtype), _per_sample(x0, x0.dtype)),
    "predict_xstart": lambda mo, x_t, t, table, mean_type: _like_plan(x_t),
    "p_mean_variance": _fake_p_mean_variance,
    "p_sample_step": lambda mo, x_t, *_: (_like_plan(x_t), _like_plan(x_t)),
    "ddim_step": lambda mo, x_t, *_: (_like_plan(x_t), _like_plan(x_t)),
    "vb_terms_bpd": _fake_vb,
    "training_losses": _fake_train,
    "scale_halves": _fake_scale_halves,
    "prior_bpd": lambda x0, table: _per_sample(x0, compute_dtype(x0.dtype)),
    "prior_bpd_backward": lambda g, x0, table: _like_plan(x0),
    "normal_kl": _fake_normal_kl,
    "normal_kl_backward": lambda g, *xs: _bcast_outs(4, (g, *xs), _bcast_compute((g, *xs))),
    "discretized_gaussian_log_likelihood": _fake_dgll,
    "dgll_backward": lambda g, *xs: _bcast_outs(3, (g, *xs), _bcast_compute((g, *xs))),
}


def _register_fakes() -> None:
    """Register the fake impls of torch.ops.<OPS_NAMESPACE> (once). The autograd kernels, with their fused
    backwards, are C++ (csrc/autograd.cpp): torch.library's Python wrapper costs 8-30 us a call."""
    global _registered
    if _registered:
        return
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"{OPS_NAMESPACE}::{name}", fake)
    _registered = True


# -- ops ----------------------------------------------------------------------------------------------
def q_sample(x0, t, noise, schedule):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise: [B, ...] in x0's dtype."""
    return _op("q_sample")(x0, t, noise, _table(schedule, x0))


def q_posterior(x0, x_t, t, schedule):
    """(mean [B, ...], variance [B, 1, ...], clipped log variance [B, 1, ...]) in x0's dtype."""
    mean, var, logvar = _op("q_posterior")(x0, x_t, t, _table(schedule, x0))
    shape = (-1,) + (1,) * (x0.ndim - 1)
    return mean, var.reshape(shape), logvar.reshape(shape)


def predict_xstart(model_output, x_t, t, schedule, *, mean_type):
    """x0 implied by the model output (unclipped), [B, C, ...] in x_t's dtype."""
    return _op("predict_xstart")(model_output, x_t, t, _table(schedule, x_t), MEAN_TYPES.index(mean_type))


def _thresh(model_output, x_t, t, schedule, mean_type, var_type, dynamic_threshold, sample_max_value):
    """Per-sample dynamic-threshold scale s [B] (compute dtype), or None."""
    if dynamic_threshold is None:
        return None
    out = model_output[:, : x_t.shape[1]] if var_type in reference.LEARNED_VAR_TYPES else model_output
    ct = compute_dtype(x_t.dtype)  # the quantile sees the unrounded prediction, as in the reference
    x0 = _op("predict_xstart")(out.to(ct), x_t.to(ct), t, _table(schedule, x_t), MEAN_TYPES.index(mean_type))
    s = torch.quantile(x0.abs().reshape(x0.shape[0], -1), dynamic_threshold, dim=1)
    return s.clamp(min=1.0, max=sample_max_value).contiguous()


def p_mean_variance(model_output, x_t, t, schedule, *, mean_type, var_type, clip_denoised=False,
                    dynamic_threshold=None, sample_max_value=1.0):
    """dict mean, variance, log_variance, pred_xstart (x_t's dtype); variances [B, 1, ...] for fixed types."""
    if _grad_needed(model_output, x_t):
        return reference.p_mean_variance(model_output, x_t, t, schedule, mean_type=mean_type, var_type=var_type,
                                         clip_denoised=clip_denoised, dynamic_threshold=dynamic_threshold,
                                         sample_max_value=sample_max_value)
    thresh = _thresh(model_output, x_t, t, schedule, mean_type, var_type, dynamic_threshold, sample_max_value)
    mean, var, logvar, pred = _op("p_mean_variance")(
        model_output, x_t, t, _table(schedule, x_t), MEAN_TYPES.index(mean_type), VAR_TYPES.index(var_type),
        bool(clip_denoised), thresh)
    if var_type not in reference.LEARNED_VAR_TYPES:
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        var, logvar = var.reshape(shape), logvar.reshape(shape)
    return {"mean": mean, "variance": var, "log_variance": logvar, "pred_xstart": pred}


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise in nats (broadcasts)."""
    out = _op("normal_kl")(mean1, logvar1, mean2, logvar2)
    return out.to(functools.reduce(torch.promote_types, [a.dtype for a in (mean1, logvar1, mean2, logvar2)]))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Elementwise log-likelihood (nats) of x in [-1, 1] on 256 bins under N(means, exp(log_scales)^2)."""
    out = _op("discretized_gaussian_log_likelihood")(x, means, log_scales)
    return out.to(torch.promote_types(x.dtype, means.dtype))


def vb_terms_bpd(model_output, x0, x_t, t, schedule, *, mean_type, var_type, clip_denoised=False):
    """The bound's term at t per sample in bits/dim: [B] float32 (float64 for float64 inputs)."""
    if _grad_needed(x0, x_t):
        return reference.vb_terms_bpd(model_output, x0, x_t, t, schedule, mean_type=mean_type,
                                      var_type=var_type, clip_denoised=clip_denoised)
    vb, _, _ = _op("vb_terms_bpd")(model_output, x0, x_t, t, _table(schedule, x0), MEAN_TYPES.index(mean_type),
                                   VAR_TYPES.index(var_type), bool(clip_denoised), _grad_needed(model_output))
    return vb


def prior_bpd(x0, schedule):
    """KL(q(x_{T-1} | x0) || N(0, I)) per sample in bits/dim: [B]."""
    return _op("prior_bpd")(x0, _table(schedule, x0))


def training_losses(model_output, x0, t, noise, schedule, *, mean_type, var_type, loss_type,
                    weighting="simple", min_snr_gamma=5.0):
    """improved-diffusion's training losses per sample: dict of [B] ("loss", "mse" and/or "vb")."""
    if _grad_needed(x0, noise):
        return reference.training_losses(model_output, x0, t, noise, schedule, mean_type=mean_type,
                                         var_type=var_type, loss_type=loss_type, weighting=weighting,
                                         min_snr_gamma=min_snr_gamma)
    loss, mse, vb, _, _, _ = _op("training_losses")(
        model_output, x0, t, noise, _table(schedule, x0), MEAN_TYPES.index(mean_type), VAR_TYPES.index(var_type),
        LOSS_TYPES.index(loss_type), WEIGHTINGS.index(weighting), float(min_snr_gamma),
        _grad_needed(model_output))
    if loss_type in ("kl", "rescaled_kl"):
        return {"loss": loss, "vb": vb}
    terms = {"mse": mse, "loss": loss}
    if var_type in reference.LEARNED_VAR_TYPES:
        terms["vb"] = vb
    return terms


# -- sampler steps ----------------------------------------------------------------------------------
def _philox_seed(seed, generator, device) -> int:
    """The step's Philox seed: ``seed``, else drawn from ``generator`` (default: torch's) on the host."""
    if seed is not None:
        return int(seed)
    if generator is None:
        generator = (torch.cuda.default_generators[device.index if device.index is not None
                                                   else torch.cuda.current_device()]
                     if device.type == "cuda" else torch.default_generator)
    if generator.device.type == "cpu":  # a CPU draw read through numpy: no device, no aten scalar read
        return int(torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64).numpy()[0])
    # CUDA generator: its seed and Philox offset live on the host; advance the offset, no device sync
    offset = generator.get_offset()
    generator.set_offset(offset + 4)
    return (generator.initial_seed() * 0x9E3779B97F4A7C15 + offset) % 2**63


def p_sample_step(model_output, x_t, t, schedule, *, mean_type, var_type, clip_denoised=True,
                  dynamic_threshold=None, sample_max_value=1.0, noise=None, generator=None, seed=None):
    """One ancestral step: dict sample, pred_xstart; noise=None draws N(0, I) in-kernel (Philox)."""
    if _grad_needed(model_output, x_t, noise):
        return reference.p_sample_step(model_output, x_t, t, schedule, mean_type=mean_type, var_type=var_type,
                                       clip_denoised=clip_denoised, dynamic_threshold=dynamic_threshold,
                                       sample_max_value=sample_max_value, noise=noise, generator=generator,
                                       seed=seed)
    thresh = _thresh(model_output, x_t, t, schedule, mean_type, var_type, dynamic_threshold, sample_max_value)
    philox = 0 if noise is not None else _philox_seed(seed, generator, x_t.device)
    sample, pred = _op("p_sample_step")(
        model_output, x_t, t, _table(schedule, x_t), MEAN_TYPES.index(mean_type), VAR_TYPES.index(var_type),
        bool(clip_denoised), thresh, noise, philox)
    return {"sample": sample, "pred_xstart": pred}


def ddim_step(model_output, x_t, t, schedule, *, eta=0.0, clip_denoised=True, dynamic_threshold=None,
              sample_max_value=1.0, mean_type="epsilon", var_type="fixed_small", noise=None, generator=None,
              seed=None):
    """One DDIM step: dict sample, pred_xstart; with eta > 0 and noise=None, noise is drawn in-kernel."""
    if _grad_needed(model_output, x_t, noise):
        return reference.ddim_step(model_output, x_t, t, schedule, eta=eta, clip_denoised=clip_denoised,
                                   dynamic_threshold=dynamic_threshold, sample_max_value=sample_max_value,
                                   mean_type=mean_type, var_type=var_type, noise=noise, generator=generator,
                                   seed=seed)
    thresh = _thresh(model_output, x_t, t, schedule, mean_type, var_type, dynamic_threshold, sample_max_value)
    philox = 0 if (noise is not None or eta == 0.0) else _philox_seed(seed, generator, x_t.device)
    sample, pred = _op("ddim_step")(
        model_output, x_t, t, _table(schedule, x_t), MEAN_TYPES.index(mean_type), VAR_TYPES.index(var_type),
        bool(clip_denoised), thresh, float(eta), noise, philox)
    return {"sample": sample, "pred_xstart": pred}


def _cuda_float64_via_reference(fn):
    """float64 CUDA tensors (every float64 tensor on cuda_emu): the reference op (the CUDA kernels are
    built for float32 math only)."""
    ref = getattr(reference, fn.__name__)

    @functools.wraps(fn)
    def op(*args, **kwargs):
        for a in args:
            if isinstance(a, torch.Tensor) and (a.is_cuda or EMULATED) and a.dtype == torch.float64:
                return ref(*args, **kwargs)
        return fn(*args, **kwargs)

    return op


# The ops unwrapped, for CPU tensors only (ddpm_fast.ops' compiled CPU path): no per-argument CUDA test.
cpu_ops = types.SimpleNamespace()
for _name in ("q_sample", "q_posterior", "predict_xstart", "p_mean_variance", "normal_kl",
              "discretized_gaussian_log_likelihood", "vb_terms_bpd", "prior_bpd", "training_losses",
              "p_sample_step", "ddim_step"):
    setattr(cpu_ops, _name, globals()[_name])
    globals()[_name] = _cuda_float64_via_reference(globals()[_name])
del _name
