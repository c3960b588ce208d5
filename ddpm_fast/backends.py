"""Backend registry: which implementations exist, whether each can run here, and why not.

A backend is a module exposing the ops of ddpm_fast.reference with the same signatures
(arguments already checked by ddpm_fast.ops) plus ``availability() -> (bool, reason)``.

    auto: CUDA tensor -> "cuda" if built, else "triton"; CPU tensor -> "cpu" if built, else "reference"

"cuda_emu" (the CUDA kernels emulated on the CPU, for checking; built when DDPM_FAST_CUDA_EMU=1) runs CPU
tensors and is never chosen by "auto".
"""
from __future__ import annotations

import importlib
from functools import lru_cache

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


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine or for these inputs; the message says why."""


@lru_cache(maxsize=None)
def _load(name: str):
    """(module or None, reason it is unavailable or '')."""
    if name == "reference":
        return importlib.import_module(_MODULES[name]), ""
    try:
        module = importlib.import_module(_MODULES[name])
        ok, reason = module.availability(name)
    except Exception as exc:  # a broken optional backend must never break the others
        return None, f"{_MODULES[name]} could not be loaded: {type(exc).__name__}: {exc}"
    return (module if ok else None), reason


def availability() -> dict:
    """{backend name: (available, reason if not)} for every known backend."""
    return {name: (_load(name)[0] is not None, _load(name)[1]) for name in BACKENDS}


def check_name(backend) -> str:
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend: unknown {backend!r}; expected 'auto' or one of {BACKENDS}")
    return backend


def select(backend: str, device_type: str):
    """The module that runs an op for tensors on ``device_type`` ('cpu', 'cuda', ...)."""
    check_name(backend)
    if backend == "auto":
        for name in _AUTO_ORDER.get(device_type, ("reference",)):
            module = _load(name)[0]
            if module is not None:
                return module
        return _load("reference")[0]
    module, reason = _load(backend)
    if module is None:
        raise BackendUnavailableError(f"backend={backend!r} is unavailable: {reason}")
    if backend in _DEVICE_TYPE and device_type != _DEVICE_TYPE[backend]:
        raise BackendUnavailableError(
            f"backend={backend!r} runs {_DEVICE_TYPE[backend]} tensors, but the inputs are on {device_type}"
        )
    return module
