"""Backend registry: which implementations exist, whether each can run here, why not, and what each supports.

A backend is a module exposing the ops of ddpm_fast.reference with the same signatures
(arguments already checked by ddpm_fast.ops) plus ``availability() -> (bool, reason)``; a module that also
has ``kernels`` (a namespace of the same ops, unrouted) is called through it.

    auto: CUDA tensor -> "cuda" if built, else "triton"; CPU tensor -> "cpu" if built, else "reference"

"cuda_emu" (the CUDA kernels emulated on the CPU, for checking; built when DDPM_FAST_CUDA_EMU=1) runs CPU
tensors and is never chosen by "auto".

CAPABILITIES says what each backend computes itself; ``route`` makes every fallback decision from it, for
every op and backend alike: inputs of a dtype the backend has no math for, or an input that requires grad
where the backend has no gradient for it, run on the reference path instead (same results, ordinary
autograd): a gradient is never silently dropped, and no backend raises where another one works.
"""
from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

BACKENDS = ("reference", "triton", "cpu", "cuda", "cuda_emu")
_MODULES = {
    "reference": "ddpm_fast.reference",
    "triton": "ddpm_fast.triton",
    "cpu": "ddpm_fast.native",
    "cuda": "ddpm_fast.native",
    "cuda_emu": "ddpm_fast.cuda_emu",
}
_DEVICE_TYPE = {"cpu": "cpu", "cuda": "cuda", "cuda_emu": "cpu"}  # the tensors a compiled backend runs
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

ALL_INPUTS = "*"  # in Capability.no_grad: none of the op's tensor inputs


@dataclass(frozen=True)
class Capability:
    """What a backend computes itself. Anything else runs on the reference, for the reason given."""

    no_float64: str = ""  # why float64 inputs run on the reference ("" : the backend computes them)
    warn_float64: bool = False  # warn (once, see FALLBACK_WARNED) when float64 runs on the reference
    no_grad: Mapping = field(default_factory=dict)  # op -> its inputs the backend cannot differentiate (or ALL_INPUTS)


class _DeclaredNoGrad(Mapping):
    """op -> the inputs the kernels (compiled and Triton) cannot differentiate, as each op declares it
    (ddpm_fast.ops.register(kernel_no_grad=...)); read from the registry on use (ddpm_fast.ops imports this
    module)."""

    def _declared(self) -> dict:
        from .ops import REGISTRY

        return {name: spec.kernel_no_grad for name, spec in REGISTRY.items() if spec.kernel_no_grad}

    def __getitem__(self, op):
        return self._declared()[op]

    def __iter__(self):
        return iter(self._declared())

    def __len__(self):
        return len(self._declared())


_KERNELS_NO_GRAD = _DeclaredNoGrad()
_CUDA_NO_FLOAT64 = "the CUDA kernels are built for float32 math only"
CAPABILITIES = {
    "reference": Capability(),
    "cpu": Capability(no_grad=_KERNELS_NO_GRAD),
    "cuda": Capability(no_float64=_CUDA_NO_FLOAT64, no_grad=_KERNELS_NO_GRAD),
    "cuda_emu": Capability(no_float64=_CUDA_NO_FLOAT64, no_grad=_KERNELS_NO_GRAD),
    "triton": Capability(
        no_float64="kernels compute in float32; float64 is a checking precision, where the reference is faithful",
        warn_float64=True, no_grad=_KERNELS_NO_GRAD),
}
FALLBACK_WARNED: dict = {name: [] for name in BACKENDS}  # non-empty once the float64 warning was given


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine or for these inputs; the message says why."""


_LOADED: dict = {}  # backend name -> _load's result


def _load(name: str):
    """(module or None, reason it is unavailable or ''), found once per backend and kept in _LOADED: a plain dict,
    which torch.compile reads while tracing (it would trace an lru_cache'd function's body, imports included)."""
    found = _LOADED.get(name)
    if found is None:
        found = _LOADED[name] = _find(name)
    return found


def _find(name: str):
    if name == "reference":
        return importlib.import_module(_MODULES[name]), ""
    try:
        module = importlib.import_module(_MODULES[name])
        ok, reason = module.availability(name)
    except Exception as exc:  # a broken optional backend must never break the others
        return None, f"{_MODULES[name]} could not be loaded: {type(exc).__name__}: {exc}"
    return (module if ok else None), reason


def _clear_caches() -> None:
    """Forget what _load found, and route's plans and the ops' bound calls (made from it)."""
    from .ops import _bound  # (ddpm_fast.ops imports this module)

    _LOADED.clear()
    _PLANS.clear()
    _bound.clear()


_load.cache_clear = _clear_caches


def availability() -> dict:
    """{backend name: (available, reason if not)} for every known backend."""
    return {name: (_load(name)[0] is not None, _load(name)[1]) for name in BACKENDS}


def available(name: str) -> bool:
    return _load(name)[0] is not None


def check_name(backend) -> str:
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend: unknown {backend!r}; expected 'auto' or one of {BACKENDS}")
    return backend


def _resolve(backend: str, device_type: str) -> str:
    """The name of the backend that runs tensors on ``device_type`` (raises BackendUnavailableError)."""
    check_name(backend)
    if backend == "auto":
        for name in _AUTO_ORDER.get(device_type, ("reference",)):
            if available(name):
                return name
        return "reference"
    module, reason = _load(backend)
    if module is None:
        raise BackendUnavailableError(f"backend={backend!r} is unavailable: {reason}")
    if backend in _DEVICE_TYPE and device_type != _DEVICE_TYPE[backend]:
        raise BackendUnavailableError(
            f"backend={backend!r} runs {_DEVICE_TYPE[backend]} tensors, but the inputs are on {device_type}"
        )
    return backend


def select(backend: str, device_type: str):
    """The module that runs an op for tensors on ``device_type`` ('cpu', 'cuda', ...)."""
    return _load(_resolve(backend, device_type))[0]


# -- the one fallback decision ----------------------------------------------------------------------------
_PLANS: dict = {}  # (backend, device type, op, dtype) -> (decision, positions that need the reference for grad,
#                                                         the decision then)


def _warned_reference(fn, name: str, reason: str):
    """The reference op ``fn``, warning once (FALLBACK_WARNED[name]) that float64 runs there."""
    def run(*args, **kwargs):
        if not FALLBACK_WARNED[name]:
            FALLBACK_WARNED[name].append(True)
            warnings.warn(f"backend={name!r}: float64 inputs run on the reference path ({reason})",
                          RuntimeWarning, stacklevel=3)
        return fn(*args, **kwargs)

    return run


def plan(backend: str, device_type: str, op: str, dtype) -> tuple:
    """route's plan for (backend, device type, op, dtype), made once: ((function, reason it is the reference's or
    ""), the positions of the inputs whose requires_grad sends the op to the reference, (function, reason) then)."""
    key = (backend, device_type, op, dtype)
    return _PLANS.get(key) or _plan(key)


def _plan(key: tuple):
    backend, device_type, op, dtype = key
    name = _resolve(backend, device_type)
    module = _load(name)[0]
    reference_op = getattr(_load("reference")[0], op)
    capability = CAPABILITIES[name]
    if dtype == torch.float64 and capability.no_float64:
        reason = f"{name}: float64 runs on the reference ({capability.no_float64})"
        fn = _warned_reference(reference_op, name, capability.no_float64) if capability.warn_float64 else reference_op
        plan = ((fn, reason), (), None)
    else:
        from .ops import REGISTRY  # the ops' tensor inputs (imported late: ddpm_fast.ops imports this module)

        inputs = REGISTRY[op].tensors
        blocked = capability.no_grad.get(op, ())
        positions = tuple(i for i, n in enumerate(inputs) if blocked == ALL_INPUTS or n in blocked)
        grad_reason = (f"{name}: {op} has no gradient w.r.t. "
                       f"{', '.join(inputs[i] for i in positions)} here; it runs on the reference")
        kernels = getattr(module, "kernels", module)
        plan = ((getattr(kernels, op), ""), positions, (reference_op, grad_reason))
    _PLANS[key] = plan
    return plan


def route(backend: str, device_type: str, op: str, dtype, *tensors) -> tuple:
    """(the function that runs ``op``, why it is the reference's instead of the backend's, or "").

    ``tensors``: the op's tensor inputs in ops.REGISTRY[op].tensors order (None: absent); ``dtype``: float64 if
    any is float64. One cached lookup per (backend, device type, op, dtype), plus a requires_grad test of the
    inputs the backend cannot differentiate. Raises BackendUnavailableError as select does.
    """
    plan = _PLANS.get((backend, device_type, op, dtype))
    if plan is None:
        plan = _plan((backend, device_type, op, dtype))
    decision, positions, on_grad = plan
    if positions and torch.is_grad_enabled():  # grad_blocked, inline
        for i in positions:
            x = tensors[i]
            if x is not None and x.requires_grad:
                return on_grad
    return decision


def grad_blocked(positions: tuple, tensors: tuple) -> bool:
    """Whether autograd is on and an input at ``positions`` (those the backend cannot differentiate) requires grad."""
    if torch.is_grad_enabled():
        for i in positions:
            x = tensors[i]
            if x is not None and x.requires_grad:
                return True
    return False


def fallback_rules(name: str) -> list:
    """What backend ``name`` hands to the reference, one line per kind (``ddpm-fast info``)."""
    capability = CAPABILITIES[name]
    rules = [f"to the reference: float64 ({capability.no_float64})"] if capability.no_float64 else []
    if capability.no_grad:
        which = [f"{op} ({'any input' if inputs == ALL_INPUTS else ', '.join(inputs)})"
                 for op, inputs in capability.no_grad.items()]
        rules.append("to the reference: gradients w.r.t. " + "; ".join(which))
    return rules
