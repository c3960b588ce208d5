"""The compiled backends ("cpu" and "cuda"): ddpm_fast._C's ops (torch.ops.ddpm_fast) with autograd.

The same code, run as ddpm_fast.cuda_emu with OPS_NAMESPACE = "ddpm_fast_emu", is backend "cuda_emu":
the CUDA kernels emulated on the CPU (ddpm_fast._build.load_emu).

Same ops and signatures as ddpm_fast.reference; arguments were checked by ddpm_fast.ops. Math runs in
float32 (float64 for float64 inputs) on the schedule's packed table; elementwise outputs come back in
the input dtype, [B] reductions in the compute dtype. The library is built just in time on first use
(ddpm_fast._build); availability() says why when it cannot be built or loaded.

Gradients (autograd kernels in C++, in each op family's csrc/ops/<family>.cpp): fused backward kernels for q_sample,
q_posterior (mean), predict_xstart, normal_kl, discretized_gaussian_log_likelihood, prior_bpd, and
vb_terms_bpd / training_losses w.r.t. model_output. What runs on the reference instead (float64 on "cuda" /
"cuda_emu", a gradient these kernels do not have) is decided by ddpm_fast.backends.route from its capability
table: ddpm_fast.ops calls ``kernels.<op>`` through it, and this module's ops go through it too for callers
that use them directly.
"""
from __future__ import annotations

import functools
import inspect
import sys
import types
import weakref

import torch

from . import _build, backends
from .options import KL_LOSS_TYPES, LEARNED_VAR_TYPES, LOSS_IDS, MEAN_IDS, VAR_IDS, WEIGHTING_IDS
from .reference import compute_dtype

# torch.library namespace of the ops: "ddpm_fast" here, "ddpm_fast_emu" when ddpm_fast.cuda_emu runs this code
OPS_NAMESPACE = globals().get("OPS_NAMESPACE", "ddpm_fast")
EMULATED = OPS_NAMESPACE == "ddpm_fast_emu"
BACKEND_NAMES = ("cuda_emu",) if EMULATED else ("cpu", "cuda")
_registered = False


def _launch_tiny_cuda_kernel() -> None:
    """One q_sample of one element on the current GPU: raises when the library has no kernel image for it."""
    from .options import COLUMNS

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


def _register_fakes() -> None:
    """Register the fake impls of torch.ops.<OPS_NAMESPACE> (once). The autograd kernels, with their fused
    backwards, are C++ (csrc/ops/<family>.cpp): torch.library's Python wrapper costs 8-30 us a call. The fakes
    come from ddpm_fast.ops.REGISTRY."""
    global _registered
    if _registered:
        return
    from .ops import REGISTRY  # each op's fakes are declared beside it (ddpm_fast.ops.<family>)

    for spec in REGISTRY.values():
        for name, fake in spec.fakes.items():
            torch.library.register_fake(f"{OPS_NAMESPACE}::{name}", fake)
    _registered = True


# -- ops ----------------------------------------------------------------------------------------------
kernels = types.SimpleNamespace()  # the ops unrouted: what ddpm_fast.backends.route hands to ddpm_fast.ops


def _kernel(fn):
    """Record ``fn`` as kernels.<its name> and return it routed, for callers of this module's ops: the one
    decision of ddpm_fast.backends.route (float64 on CUDA, a gradient these kernels lack -> the reference)."""
    from .ops import REGISTRY

    name, params = fn.__name__, list(inspect.signature(fn).parameters)
    setattr(kernels, name, fn)
    inputs = [(params.index(n), n) for n in REGISTRY[name].tensors]

    @functools.wraps(fn)
    def op(*args, **kwargs):
        tensors = [args[i] if i < len(args) else kwargs.get(n) for i, n in inputs]
        present = [x for x in tensors if x is not None]
        dtype = torch.float64 if any(x.dtype == torch.float64 for x in present) else present[0].dtype
        device_type = present[0].device.type
        backend = BACKEND_NAMES[0] if EMULATED else device_type
        return backends.route(backend, device_type, name, dtype, *tensors)[0](*args, **kwargs)

    return op


@_kernel
def q_sample(x0, t, noise, schedule):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise: [B, ...] in x0's dtype."""
    return _op("q_sample")(x0, t, noise, _table(schedule, x0))


@_kernel
def q_posterior(x0, x_t, t, schedule):
    """(mean [B, ...], variance [B, 1, ...], clipped log variance [B, 1, ...]) in x0's dtype."""
    mean, var, logvar = _op("q_posterior")(x0, x_t, t, _table(schedule, x0))
    shape = (-1,) + (1,) * (x0.ndim - 1)
    return mean, var.reshape(shape), logvar.reshape(shape)


@_kernel
def predict_xstart(model_output, x_t, t, schedule, *, mean_type):
    """x0 implied by the model output (unclipped), [B, C, ...] in x_t's dtype."""
    return _op("predict_xstart")(model_output, x_t, t, _table(schedule, x_t), MEAN_IDS[mean_type])


def _thresh(model_output, x_t, t, schedule, mean_type, var_type, dynamic_threshold, sample_max_value):
    """Per-sample dynamic-threshold scale s [B] (compute dtype), or None."""
    if dynamic_threshold is None:
        return None
    out = model_output[:, : x_t.shape[1]] if var_type in LEARNED_VAR_TYPES else model_output
    ct = compute_dtype(x_t.dtype)  # the quantile sees the unrounded prediction, as in the reference
    x0 = _op("predict_xstart")(out.to(ct), x_t.to(ct), t, _table(schedule, x_t), MEAN_IDS[mean_type])
    s = torch.quantile(x0.abs().reshape(x0.shape[0], -1), dynamic_threshold, dim=1)
    return s.clamp(min=1.0, max=sample_max_value).contiguous()


@_kernel
def p_mean_variance(model_output, x_t, t, schedule, *, mean_type, var_type, clip_denoised=False,
                    dynamic_threshold=None, sample_max_value=1.0):
    """dict mean, variance, log_variance, pred_xstart (x_t's dtype); variances [B, 1, ...] for fixed types."""
    thresh = _thresh(model_output, x_t, t, schedule, mean_type, var_type, dynamic_threshold, sample_max_value)
    mean, var, logvar, pred = _op("p_mean_variance")(
        model_output, x_t, t, _table(schedule, x_t), MEAN_IDS[mean_type], VAR_IDS[var_type],
        bool(clip_denoised), thresh)
    if var_type not in LEARNED_VAR_TYPES:
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        var, logvar = var.reshape(shape), logvar.reshape(shape)
    return {"mean": mean, "variance": var, "log_variance": logvar, "pred_xstart": pred}


@_kernel
def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise in nats (broadcasts)."""
    out = _op("normal_kl")(mean1, logvar1, mean2, logvar2)
    return out.to(functools.reduce(torch.promote_types, [a.dtype for a in (mean1, logvar1, mean2, logvar2)]))


@_kernel
def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Elementwise log-likelihood (nats) of x in [-1, 1] on 256 bins under N(means, exp(log_scales)^2)."""
    out = _op("discretized_gaussian_log_likelihood")(x, means, log_scales)
    return out.to(torch.promote_types(x.dtype, means.dtype))


@_kernel
def vb_terms_bpd(model_output, x0, x_t, t, schedule, *, mean_type, var_type, clip_denoised=False):
    """The bound's term at t per sample in bits/dim: [B] float32 (float64 for float64 inputs)."""
    vb, _, _ = _op("vb_terms_bpd")(model_output, x0, x_t, t, _table(schedule, x0), MEAN_IDS[mean_type],
                                   VAR_IDS[var_type], bool(clip_denoised), _grad_needed(model_output))
    return vb


@_kernel
def prior_bpd(x0, schedule):
    """KL(q(x_{T-1} | x0) || N(0, I)) per sample in bits/dim: [B]."""
    return _op("prior_bpd")(x0, _table(schedule, x0))


@_kernel
def training_losses(model_output, x0, t, noise, schedule, *, mean_type, var_type, loss_type,
                    weighting="simple", min_snr_gamma=5.0):
    """improved-diffusion's training losses per sample: dict of [B] ("loss", "mse" and/or "vb")."""
    loss, mse, vb, _, _, _ = _op("training_losses")(
        model_output, x0, t, noise, _table(schedule, x0), MEAN_IDS[mean_type], VAR_IDS[var_type],
        LOSS_IDS[loss_type], WEIGHTING_IDS[weighting], float(min_snr_gamma), _grad_needed(model_output))
    if loss_type in KL_LOSS_TYPES:
        return {"loss": loss, "vb": vb}
    terms = {"mse": mse, "loss": loss}
    if var_type in LEARNED_VAR_TYPES:
        terms["vb"] = vb
    return terms


# -- sampler steps ----------------------------------------------------------------------------------
def _philox_seed(seed, generator, device) -> tuple:
    """(the step's Philox seed, or 0 and seed_key: an int64 [1] tensor on ``device`` holding it).

    ``seed``, else a torch.randint draw of ``generator`` (default: torch's for ``device``). A generator on the
    inputs' device gives the draw as a tensor that the kernel reads: no host read, and on CUDA the draw advances
    the generator's Philox offset on the device, so a CUDA-graph capture of the step draws fresh noise on every
    replay. A CPU generator for CUDA inputs is read on the host (a CPU tensor: no device sync).
    """
    if seed is not None:
        return int(seed), None
    if generator is None:
        generator = (torch.cuda.default_generators[device.index if device.index is not None
                                                   else torch.cuda.current_device()]
                     if device.type == "cuda" else torch.default_generator)
    key = torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64, device=generator.device)
    if key.device == device:
        return 0, key
    return int(key.cpu().numpy()[0]), None


@_kernel
def p_sample_step(model_output, x_t, t, schedule, *, mean_type, var_type, clip_denoised=True,
                  dynamic_threshold=None, sample_max_value=1.0, noise=None, generator=None, seed=None):
    """One ancestral step: dict sample, pred_xstart; noise=None draws N(0, I) in-kernel (Philox)."""
    thresh = _thresh(model_output, x_t, t, schedule, mean_type, var_type, dynamic_threshold, sample_max_value)
    philox, key = (0, None) if noise is not None else _philox_seed(seed, generator, x_t.device)
    sample, pred = _op("p_sample_step")(
        model_output, x_t, t, _table(schedule, x_t), MEAN_IDS[mean_type], VAR_IDS[var_type],
        bool(clip_denoised), thresh, noise, philox, key)
    return {"sample": sample, "pred_xstart": pred}


@_kernel
def ddim_step(model_output, x_t, t, schedule, *, eta=0.0, clip_denoised=True, dynamic_threshold=None,
              sample_max_value=1.0, mean_type="epsilon", var_type="fixed_small", noise=None, generator=None,
              seed=None):
    """One DDIM step: dict sample, pred_xstart; with eta > 0 and noise=None, noise is drawn in-kernel."""
    thresh = _thresh(model_output, x_t, t, schedule, mean_type, var_type, dynamic_threshold, sample_max_value)
    philox, key = (0, None) if (noise is not None or eta == 0.0) else _philox_seed(seed, generator, x_t.device)
    sample, pred = _op("ddim_step")(
        model_output, x_t, t, _table(schedule, x_t), MEAN_IDS[mean_type], VAR_IDS[var_type],
        bool(clip_denoised), thresh, float(eta), noise, philox, key)
    return {"sample": sample, "pred_xstart": pred}


# -- the fused multistep solver update (ddpm_fast.solvers) --------------------------------------------
@_kernel
def solver_update(x, model_output, rows, row_index, m_out, *, model_cond=None, guidance_scale=1.0, cfg_factor=None,
                  thresh=None, history=(None, None, None), last_sample=None, noise=None, draw_noise=False,
                  generator=None, seed=None):
    """One sampler update (ddpm_fast.reference.solver_update): x_prev in x's dtype; m_out and last_sample
    written in place; with draw_noise and noise None, the noise is drawn in-kernel (Philox, as p_sample_step)."""
    drawn = bool(draw_noise) and noise is None
    philox, key = _philox_seed(seed, generator, x.device) if drawn else (0, None)
    h1, h2, h3 = history
    return _op("solver_update")(x, model_output, model_cond, rows, row_index, float(guidance_scale), cfg_factor,
                                thresh, h1, h2, h3, last_sample, noise, drawn, philox, key, m_out)
