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

import torch

from . import _build, backends
from .options import LEARNED_VAR_TYPES, MEAN_IDS
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
_is_compiling = torch.compiler.is_dynamo_compiling  # as ops._checks.is_compiling


def _op(name):
    """torch.ops.ddpm_fast.<name>.default, looked up once (the overload packet's call costs ~3 us more)."""
    op = _OVERLOADS.get(name)
    if op is None:
        op = _OVERLOADS[name] = getattr(_ops(), name).default
    return op


def _table(schedule, x):
    if x.is_cpu:
        return schedule.cpu_table(x.dtype)
    return schedule.table(x.device, compute_dtype(x.dtype))


def _grad_needed(*tensors) -> bool:
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    return False


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


# -- ops: built from each op's declaration (ddpm_fast.ops.<family>: register(compiled=...)) ---------------------
def _thresh(model_output, x_t, t, schedule, mean_type, var_type, dynamic_threshold, sample_max_value):
    """Per-sample dynamic-threshold scale s [B] (compute dtype), or None."""
    if dynamic_threshold is None:
        return None
    out = model_output[:, : x_t.shape[1]] if var_type in LEARNED_VAR_TYPES else model_output
    ct = compute_dtype(x_t.dtype)  # the quantile sees the unrounded prediction, as in the reference
    x0 = _op("predict_xstart")(out.to(ct), x_t.to(ct), t, _table(schedule, x_t), MEAN_IDS[mean_type])
    s = torch.quantile(x0.abs().reshape(x0.shape[0], -1), dynamic_threshold, dim=1)
    return s.clamp(min=1.0, max=sample_max_value).contiguous()


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


class _OpByMode:
    """``Kernel.op``: the op's direct binding (csrc/ops/direct.h: the dispatcher called unboxed, ~0.5-2 us a
    call less than the OpOverload's boxing; the same dispatch, __torch_function__ through the OpOverload) in
    plain eager, its OpOverload while torch.compile traces (the binding is opaque to it)."""

    def __get__(self, kernel, owner=None):
        if kernel is None:
            return self
        return kernel.overload if _is_compiling() else kernel.direct


class _Direct:
    """``EagerKernel.op``: the direct binding, looked up on first use, then an instance attribute."""

    def __get__(self, kernel, owner=None):
        if kernel is None:
            return self
        kernel.op = kernel.direct
        return kernel.op


class Kernel:
    """What an op's compiled adapter (``register(compiled=...)`` in ddpm_fast.ops.<family>) is handed first:
    ``op``, the op to call (_OpByMode), and this module's helpers."""

    table = staticmethod(_table)  # (schedule, x) -> the packed schedule table for x's device and compute dtype
    grad_needed = staticmethod(_grad_needed)  # (*tensors) -> whether autograd will need a saved gradient
    thresh = staticmethod(_thresh)  # the per-sample dynamic-threshold scale [B], or None
    philox_seed = staticmethod(_philox_seed)  # (seed, generator, device) -> (seed, seed_key)
    op = _OpByMode()

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr):  # looked up on first use, then attributes
        if attr == "overload":  # torch.ops.<namespace>.<name>.default
            self.overload = _op(self.name)
            return self.overload
        if attr == "direct":  # the op's direct binding
            _ops()  # the library loaded
            self.direct = getattr(_build.direct_bindings(EMULATED), self.name)
            return self.direct
        if attr == "eager":
            self.eager = EagerKernel(self.name)
            return self.eager
        raise AttributeError(attr)


class EagerKernel(Kernel):
    """A Kernel whose ``op`` is always the op's direct binding, with no mode test a call: for callers that only
    run in plain eager (a Kernel's ``eager``: ddpm_fast.ops._checks.cpu_native,
    ddpm_fast.ops.solvers.solver_update_checked)."""

    op = _Direct()


def _kernels() -> types.SimpleNamespace:
    """Every registered op that declares a compiled adapter, unrouted (its adapter bound to the op's Kernel): what
    ddpm_fast.backends.route hands to ddpm_fast.ops."""
    from .ops import REGISTRY

    return types.SimpleNamespace(**{name: functools.partial(spec.compiled, Kernel(name))
                                    for name, spec in REGISTRY.items() if spec.compiled is not None})


kernels = _kernels()
# the same adapters for plain-eager callers, bound to each Kernel's EagerKernel
eager_kernels = types.SimpleNamespace(**{name: functools.partial(fn.func, fn.args[0].eager)
                                         for name, fn in vars(kernels).items()})
_ROUTED: dict = {}


def _routed(name: str):
    """kernels.<name> behind the one decision of ddpm_fast.backends.route (float64 on CUDA, a gradient these
    kernels lack -> the reference), for callers of this module's ops."""
    from .ops import REGISTRY

    params = list(inspect.signature(REGISTRY[name].compiled).parameters)[1:]  # after the Kernel
    inputs = [(params.index(n), n) for n in REGISTRY[name].tensors]

    @functools.wraps(REGISTRY[name].compiled)
    def op(*args, **kwargs):
        tensors = [args[i] if i < len(args) else kwargs.get(n) for i, n in inputs]
        present = [x for x in tensors if x is not None]
        dtype = torch.float64 if any(x.dtype == torch.float64 for x in present) else present[0].dtype
        device_type = present[0].device.type
        backend = BACKEND_NAMES[0] if EMULATED else device_type
        return backends.route(backend, device_type, name, dtype, *tensors)[0](*args, **kwargs)

    return op


def __getattr__(name: str):
    """This module's ops (``native.q_sample(...)``, same signature as the reference's), routed."""
    if not hasattr(kernels, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    op = _ROUTED.get(name)
    if op is None:
        op = _ROUTED[name] = _routed(name)
    return op
