"""Bound calls: a checked op's plain-eager fast path on a backend that binds it (Triton's q_sample, velocity and
training_losses).

An op's argument checks read its tensors' types, dtypes, shapes and devices, its options and its schedule, and
nothing else but t's values and the tensors' requires_grad. So once a call with some metadata has passed the
checks and reached a backend function that can bind (a ``bind`` attribute: ``fn.bind(*args) -> bound or None``),
every later call with the same metadata passes them too: the op keeps the bound call under a key of exactly what
its checks read (key), and a call that finds it (lookup) checks t (timesteps, as ever) and hands over (run);
after a checked call, bind keeps the backend's bound call. The bound call itself
returns None where the call must take the checked path after all (torch.compile, a dispatch mode, a gradient the
backend has no kernel for, another current CUDA device): nothing is ever skipped that could fail.

One lookup replaces the checks' reads, the router and the backend's own layout lookup, which read the same
metadata again: a Triton training_losses mse call 8.1-8.4 -> 6.1-6.4 us of Python, q_sample 6.0-6.2 -> 4.6-5.0 (kernels
stubbed, ddpm_fast.bench.host). The compiled backends do not bind: CPU tensors skip the Python checks for their
C++ ones (check.cpu_native); CUDA tensors on the compiled kernels are checked in Python, then in C++ again.
"""
from __future__ import annotations

from .. import backends
from ._checks import PLAIN_TYPES, is_compiling, timesteps

BOUND_SIZE = 1024  # bound calls kept (the key: options, schedule, each tensor's dtype, device, shape and layout)
BOUND: dict = {}  # key -> (the bound call, B, device)
_AUTO_BINDS: list = []  # [whether backend "auto" may route to a backend that binds], found once


def may_bind(backend) -> bool:
    """Whether calls for ``backend`` may reach a backend that binds (Triton), so that an op builds its key: "triton",
    or "auto" where the compiled CUDA kernels are unavailable (CUDA tensors then run on Triton); not the compiled
    backends (no bind: building a key would only add to their calls)."""
    if backend == "triton":
        return True
    if backend != "auto":
        return False
    if not _AUTO_BINDS:
        _AUTO_BINDS.append(not backends.available("cuda"))
    return _AUTO_BINDS[0]


def key(op: str, backend, options: tuple, *tensors):
    """The key of a call of ``op`` on ``tensors`` (in its checks' order) with ``options`` (everything else its checks
    read, the schedule among them): each tensor's dtype, device and shape, and its strides unless every one is
    contiguous (the Triton plans of contiguous tensors are their shapes'). None where nothing can be bound: a
    backend that cannot bind, torch.compile tracing, a tensor subclass or a missing tensor (the checks raise)."""
    if not may_bind(backend) or is_compiling():
        return None
    parts = [op, backend, options]
    contiguous = True
    for x in tensors:
        if type(x) not in PLAIN_TYPES:
            return None
        parts += (x.dtype, x.device, x.shape)
        contiguous = contiguous and x.is_contiguous()
    if not contiguous:
        parts += [x.stride() for x in tensors]
    return tuple(parts)


def lookup(key):
    """(bound call, B, device) kept under ``key``, or None (none kept; key None or unhashable: an option that is)."""
    try:
        return BOUND.get(key)
    except TypeError:
        return None


def run(hit, t, schedule, validate, *tensors):
    """The result of the bound call ``hit`` (from lookup) on t, checked here as the checks would (timesteps), and
    the key's tensors in its order; None where the call must take the checked path after all."""
    bound, batch, device = hit
    return bound(timesteps(t, batch, schedule, device, validate), *tensors)


def bind(fn, key, batch: int, device, *args, **kwargs) -> None:
    """After a checked call of the backend function ``fn`` passed with ``key``: keep ``fn.bind(*args, **kwargs)``
    under it (nothing when fn does not bind or the key is None)."""
    binder = getattr(fn, "bind", None)
    if binder is not None and key is not None:
        keep(key, binder(*args, **kwargs), batch, device)


def keep(key, bound, batch: int, device) -> None:
    """Keep ``bound`` (from the backend function's bind; None: nothing kept) under ``key`` (None or unhashable:
    nothing kept), with the batch size and device its t is checked for."""
    if bound is None or key is None:
        return
    if len(BOUND) >= BOUND_SIZE:
        BOUND.clear()
    try:
        BOUND[key] = (bound, batch, device)
    except TypeError:
        pass


def clear() -> None:
    """Forget every bound call and may_bind's finding (the backends were found again, or the Triton launch
    constants changed)."""
    BOUND.clear()
    _AUTO_BINDS.clear()
