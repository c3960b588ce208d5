"""The fused multistep solver update: solver_update, the one op every step of ddpm_fast.solvers.steps calls
(DPM-Solver++, Euler, Euler ancestral, UniPC: a per-sample linear combination over one coefficient row)."""
from __future__ import annotations

import functools

import torch

from .. import backends
from . import _checks as check
from ._registry import Traffic, check_shape, element_bytes, like_plan, numel, per_sample_bytes, register

NUM_COLUMNS = 14  # len(ddpm_fast.solvers.tables.FUSED_COLUMNS)


def _solver_update_traffic(shape, dtype, *, guidance=False, history=0, last_sample=False, noise_given=False,
                           cfg_factor=False, thresh=False) -> Traffic:
    """Reads x, model_output (and model_cond with guidance), ``history`` history entries (compute dtype),
    last_sample (read and written), the noise if given, row_index and one row per sample, the [B] factors;
    writes x_prev (dtype) and m_out (compute dtype). Dynamic thresholding's quantile (computed before the op)
    is not counted."""
    shape = check_shape(shape, dtype)
    n, e, s = numel(shape), element_bytes(dtype), per_sample_bytes(dtype)
    read = (2 + int(guidance) + int(noise_given)) * n * e + (int(history) + int(last_sample)) * n * s
    read += shape[0] * (8 + NUM_COLUMNS * s + (int(cfg_factor) + int(thresh)) * s)
    return Traffic(read, n * e + (1 + int(last_sample)) * n * s)


def _solver_update_fake(x, *_):
    return like_plan(x)


def _test_rows(x):
    """Two coefficient rows [2, 14] with every column non-zero (the cross-backend tests' case)."""
    base = torch.linspace(0.1, 0.9, NUM_COLUMNS, dtype=torch.float64)
    return torch.stack([base, base.flip(0) - 0.5]).to(dtype=torch.float64 if x.dtype == torch.float64
                                                        else torch.float32, device=x.device)


def _test_case(a, schedule, **kw):
    """One call on tests/backend_cases.inputs() (eps as model_output, x0 as model_cond, x_t as x, history and
    last_sample made of x_t and x0, the row t % 2); returns (x_prev, m_out, last_sample): the in-place outputs are compared too."""
    x, x0 = a["x_t"], a["x0"]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    row_index = (a["t"] % 2).to(torch.int64)  # per sample: the rows alternate with t
    history = (x.to(compute) * 0.5, x0.to(compute), -x.to(compute))
    last_sample = (x0.to(compute) - x.to(compute))
    m_out = torch.empty(x.shape, dtype=compute, device=x.device)
    x_prev = solver_update(x, a["eps"], _test_rows(x), row_index, m_out, model_cond=x0, guidance_scale=2.5,
                           history=history, last_sample=last_sample, noise=a["noise"], **kw)
    return x_prev, m_out, last_sample


def _solver_update_compiled(kernel, x, model_output, rows, row_index, m_out, *, model_cond=None, guidance_scale=1.0,
                            cfg_factor=None, thresh=None, history=(None, None, None), last_sample=None, noise=None,
                            draw_noise=False, generator=None, seed=None):
    """The compiled op: x_prev in x's dtype; m_out and last_sample written in place; with draw_noise and noise
    None, the noise is drawn in-kernel (Philox, as p_sample_step's)."""
    drawn = bool(draw_noise) and noise is None
    philox, key = kernel.philox_seed(seed, generator, x.device) if drawn else (0, None)
    h1, h2, h3 = history
    return kernel.op(x, model_output, model_cond, rows, row_index, float(guidance_scale), cfg_factor, thresh, h1, h2,
                     h3, last_sample, noise, drawn, philox, key, m_out)


@register(
    tensors=("x", "model_output", "model_cond", "rows", "cfg_factor", "thresh", "last_sample", "noise", "m_out"),
    fakes={"solver_update": _solver_update_fake},
    traffic=_solver_update_traffic,
    test_case=_test_case,
    reads=("eps", "noise"),
    compiled=_solver_update_compiled,
    kernel_no_grad=backends.ALL_INPUTS,
)
@check.document
def solver_update(x, model_output, rows, row_index, m_out, *, model_cond=None, guidance_scale=1.0, cfg_factor=None,
                  thresh=None, history=(None, None, None), last_sample=None, noise=None, draw_noise=False,
                  generator=None, seed=None, backend="auto", validate=None):
    """One multistep sampler update as one fused elementwise op (ddpm_fast.solvers.steps builds its arguments).

    With S the compute dtype (float32; float64 for float64 x), per element of sample b:
    g = model_output (+ guidance_scale (model_cond - model_output) with model_cond) (* cfg_factor[b]);
    x_s = x + churn noise; m = conv_sample x_s + conv_model g (clamped to +-thresh[b] and divided by it with
    thresh); corrected = c_this x_s + c_last last_sample + c_model m + c_h1 h1 + c_h2 h2 + c_h3 h3;
    x_prev = p_corr corrected + p_m0 m + p_h1 h1 + p_h2 h2 + p_noise noise, the coefficients from
    rows[row_index[b]] (columns ddpm_fast.solvers.tables.FUSED_COLUMNS). ddpm_fast.reference.solver_update
    defines the result.

    Args:
        x: the sample [B, ...] (float16 / bfloat16 / float32 / float64).
        model_output: the model's output [B, ...] (x's dtype or S); with model_cond, the unconditional half.
        rows: the coefficient rows [R, 14], dtype S, contiguous, on x's device.
        row_index: int64 [B], contiguous, on x's device, values in [0, R) (checked when validate).
        m_out: [B, ...] of dtype S on x's device: receives m, in place (may be a history entry's memory).
        model_cond: None, or the conditional half [B, ...] of classifier-free guidance (x's dtype or S).
        guidance_scale: the guidance scale s (a number; used with model_cond).
        cfg_factor: None, or [B] of dtype S: multiplies the guided output (diffusers' guidance_rescale).
        thresh: None, or [B] of dtype S, > 0: the dynamic-thresholding scale of m.
        history: up to three [B, ...] tensors of dtype S (or None): the converted outputs of steps i-1, i-2, i-3.
        last_sample: None, or [B, ...] of dtype S (UniPC): read, then overwritten with ``corrected``.
        noise: None, or the standard normal [B, ...] (x's dtype or S).
        draw_noise: with noise None, draw the noise from seed / generator (fused backends: in-kernel Philox,
            the stream of p_sample_step); False: no noise term.
        generator: a torch.Generator on x's device (with draw_noise, noise None and seed None).
        seed: an int in [0, 2**63) (with draw_noise and noise None).
        <backend_short>
        validate: range-check row_index on the host (None: CPU tensors only, where it is free).

    Returns:
        x_prev [B, ...] in x's dtype.

    Example:
        >>> import torch, ddpm_fast as F
        >>> from ddpm_fast.solvers.tables import FUSED_COLUMNS
        >>> rows = torch.zeros(1, len(FUSED_COLUMNS))
        >>> rows[0, [2, 10]] = 1.0  # conv_model, p_m0: x_prev = m = the guided output
        >>> uncond, cond = torch.zeros(2, 3), torch.ones(2, 3)
        >>> m_out = torch.empty(2, 3)
        >>> F.solver_update(uncond, uncond, rows, torch.zeros(2, dtype=torch.int64), m_out, model_cond=cond,
        ...                 guidance_scale=7.5)
        tensor([[7.5000, 7.5000, 7.5000],
                [7.5000, 7.5000, 7.5000]])
    """
    history = _history(history)
    fn = check.cpu_native("solver_update", backend, x, model_output, model_cond, rows, cfg_factor, thresh, last_sample,
                          noise, m_out)
    if fn is not None and not _history_needs_grad(history):  # the compiled CPU op checks the tensors once, in C++
        check.seed(seed)
        if generator is not None:
            check.generator(generator, x.device)
        if type(guidance_scale) is not float or guidance_scale != guidance_scale:
            guidance_scale = check.number("guidance_scale", guidance_scale)
        return fn(x, model_output, rows, row_index, m_out, model_cond=model_cond, guidance_scale=guidance_scale,
                  cfg_factor=cfg_factor, thresh=thresh, history=history, last_sample=last_sample, noise=noise,
                  draw_noise=bool(draw_noise), generator=generator, seed=seed)
    check.tensor("x", x)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    device = x.device
    inputs = {"model_output": model_output, "model_cond": model_cond, "noise": noise}
    for name, value in inputs.items():
        if value is not None:
            check.tensor(name, value)
            if value.dtype != x.dtype and value.dtype != compute:
                raise TypeError(f"{name}: expected dtype {x.dtype} (that of x) or {compute}, got {value.dtype}")
    full = {"m_out": m_out, "last_sample": last_sample, "h1": history[0], "h2": history[1], "h3": history[2]}
    for name, value in full.items():
        if value is not None:
            check.tensor(name if name[0] != "h" else f"history[{name[1]}]", value)
            if value.dtype != compute:
                raise TypeError(f"{name}: expected dtype {compute} (the compute dtype of x), got {value.dtype}")
    check.same_shape("x", x, **inputs, **full)
    per_sample = {"cfg_factor": cfg_factor, "thresh": thresh}
    for name, value in per_sample.items():
        if value is not None:
            check.tensor(name, value)
            if value.dtype != compute:
                raise TypeError(f"{name}: expected dtype {compute} (the compute dtype of x), got {value.dtype}")
            if value.shape != (x.shape[0],) or not value.is_contiguous():
                raise ValueError(f"{name}: expected a contiguous tensor [{x.shape[0]}] (x's batch), got "
                                 f"{tuple(value.shape)}")
    _check_rows(rows, row_index, x, compute)
    check.same_device(x=x, **inputs, **full, **per_sample, rows=rows, row_index=row_index)
    guidance_scale = check.number("guidance_scale", guidance_scale)
    check.seed(seed)
    check.generator(generator, device)
    if validate or (validate is None and device.type == "cpu"):
        lo, hi = check.int_range(row_index)
        if lo is not None and not (0 <= lo and hi < rows.shape[0]):
            raise ValueError(f"row_index: expected values in [0, {rows.shape[0]}) (the rows of rows)")
    fn = backends.route(backend, device.type, "solver_update", x.dtype, x, model_output, model_cond, rows,
                        cfg_factor, thresh, last_sample, noise, m_out)[0]
    if _history_needs_grad(history):
        fn = backends.route("reference", device.type, "solver_update", x.dtype)[0]  # the kernels have no gradient
    return fn(x, model_output, rows, row_index, m_out, model_cond=model_cond, guidance_scale=guidance_scale,
              cfg_factor=cfg_factor, thresh=thresh, history=history, last_sample=last_sample, noise=noise,
              draw_noise=bool(draw_noise), generator=generator, seed=seed)


def solver_update_checked(x, model_output, rows, row_index, m_out, *, model_cond=None, guidance_scale=1.0,
                          cfg_factor=None, thresh=None, history=(), last_sample=None, noise=None, draw_noise=False,
                          generator=None, seed=None):
    """solver_update (backend "auto", validate False) for callers that have checked its arguments
    (ddpm_fast.solvers.steps: tensors on x's device, history a tuple of up to 3 entries, guidance_scale a float,
    seed None or an int in [0, 2**63), generator None or a torch.Generator on x's device). Tensors that the
    compiled extension runs (CPU, and CUDA where it was built with CUDA) go to its op straight away (its C++ checks
    them once more, as on solver_update's own CPU path; with draw_noise and noise None it draws the noise
    in-kernel): the call solver_update's route makes, without its Python checks. Tensors that route sends to the
    Triton backend (CUDA tensors where the extension has no CUDA kernels) go to its function straight away, its
    Python checks skipped as well; the rest (inputs that require grad, the reference) go through solver_update."""
    h1, h2, h3 = history + (None,) * (3 - len(history))
    device_type = "cpu" if x.is_cpu else x.device.type
    kernel = _compiled_kernel(device_type, x.dtype)
    if kernel is not None and not kernel.grad_needed(x, model_output, model_cond, rows, cfg_factor, thresh, h1, h2,
                                                     h3, last_sample, noise, m_out):
        drawn = draw_noise and noise is None
        philox, key = kernel.philox_seed(seed, generator, x.device) if drawn else (0, None)
        return kernel.op(x, model_output, model_cond, rows, row_index, guidance_scale, cfg_factor, thresh, h1, h2, h3,
                         last_sample, noise, drawn, philox, key, m_out)
    fn = _triton_update(device_type, x.dtype) if kernel is None else None
    if fn is None or backends.grad_blocked(_ALL_POSITIONS, (x, model_output, model_cond, rows, cfg_factor, thresh, h1,
                                                            h2, h3, last_sample, noise, m_out)):
        fn = functools.partial(solver_update, validate=False)
    return fn(x, model_output, rows, row_index, m_out, model_cond=model_cond, guidance_scale=guidance_scale,
              cfg_factor=cfg_factor, thresh=thresh, history=(h1, h2, h3), last_sample=last_sample, noise=noise,
              draw_noise=draw_noise, generator=generator, seed=seed)


def plain_update(op, x, model_output, rows, row_index, m_out, noise=None, model_cond=None, guidance_scale=1.0,
                 philox=None):
    """op (a compiled Kernel's op, as _compiled_kernel gives it) on solver_update's arguments without
    guidance_rescale, thresholding, history or last_sample, with noise given, drawn in the op (philox: the Kernel's
    philox_seed result, (seed, seed_key)) or none: solver_update_checked's call for the steady steps of the Euler
    drop-ins (ddpm_fast.compat.diffusers_solvers), which have checked them."""
    seed, key = philox if philox is not None else (0, None)
    return op(x, model_output, model_cond, rows, row_index, guidance_scale, None, None, None, None, None, None, noise,
              philox is not None, seed, key, m_out)


def _compiled_kernel(device_type, dtype):
    """The compiled Kernel (ddpm_fast.native.Kernel: its op, grad_needed) when backend "auto" runs solver_update
    on tensors of device_type ("cpu" / "cuda") and dtype with the compiled extension, else None: backends.plan's
    cached decision, this module's compiled adapter bound to its Kernel (native.EagerKernel outside torch.compile:
    the op's direct binding)."""
    if device_type != "cpu" and device_type != "cuda":
        return None
    fn, reason = backends.plan("auto", device_type, "solver_update", dtype)[0]
    if reason or getattr(fn, "func", None) is not _solver_update_compiled:
        return None
    return fn.args[0] if check.is_compiling() else fn.args[0].eager


_ALL_POSITIONS = tuple(range(12))  # every tensor argument of solver_update_checked's grad test


def _triton_update(device_type, dtype):
    """The Triton backend's solver_update when backend "auto" runs solver_update on tensors of device_type and
    dtype with it (a CUDA device and an extension without CUDA kernels), else None: backends.plan's cached
    decision (as _compiled_kernel's)."""
    fn, reason = backends.plan("auto", device_type, "solver_update", dtype)[0]
    if reason or getattr(fn, "__module__", None) != "ddpm_fast.triton.solvers":
        return None
    return fn


def _history(history) -> tuple:
    """history as (h1, h2, h3), absent entries None."""
    if type(history) is not tuple:
        if isinstance(history, torch.Tensor) or not hasattr(history, "__len__"):
            raise TypeError(f"history: expected a tuple of up to 3 tensors or None, got {type(history).__name__}")
        history = tuple(history)
    if len(history) == 3:
        return history
    if len(history) > 3:
        raise ValueError(f"history: expected at most 3 entries (h1, h2, h3), got {len(history)}")
    return history + (None,) * (3 - len(history))


def _history_needs_grad(history) -> bool:
    """Whether autograd must see a history entry (its kernels have none: the reference runs)."""
    if torch.is_grad_enabled():
        for h in history:
            if h is not None and h.requires_grad:
                return True
    return False


def _check_rows(rows, row_index, x, compute):
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"rows: expected a torch.Tensor [R, {NUM_COLUMNS}], got {type(rows).__name__}")
    if rows.dtype != compute:
        raise TypeError(f"rows: expected dtype {compute} (the compute dtype of x), got {rows.dtype}")
    if rows.ndim != 2 or rows.shape[1] != NUM_COLUMNS or rows.shape[0] < 1 or not rows.is_contiguous():
        raise ValueError(f"rows: expected a contiguous tensor [R >= 1, {NUM_COLUMNS}], got {tuple(rows.shape)}")
    if not isinstance(row_index, torch.Tensor):
        raise TypeError(f"row_index: expected an int64 tensor [B], got {type(row_index).__name__}")
    if row_index.dtype != torch.int64:
        raise TypeError(f"row_index: expected dtype torch.int64, got {row_index.dtype}")
    if row_index.shape != (x.shape[0],) or not row_index.is_contiguous():
        raise ValueError(f"row_index: expected a contiguous tensor [{x.shape[0]}] (x's batch), got "
                         f"{tuple(row_index.shape)}")

