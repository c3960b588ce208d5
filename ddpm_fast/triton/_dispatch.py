"""How a Triton op is reached: straight to its launcher in plain eager mode, through torch.library otherwise.

Every op has one host launcher ``impl(wrap, *args)`` (allocates outputs, launches ``wrap(kernel)[grid]``).
It is reached three ways, all running the same launcher:

- plain eager, no gradient needed: ``impl(direct, *args)``, no dispatcher in between;
- plain eager, an input requires grad: a torch.autograd.Function built from the op's setup_context /
  backward (the cheapest autograd node Python offers, about a third of a custom op's);
- anything else (torch.compile, fake / functional tracing, dispatch modes, functorch transforms, tensor
  subclasses): the registered torch.library op, whose body calls ``impl(wrap_triton, *args)``.

The hottest backend functions (q_sample, training_losses) go one step further in plain eager: a launch prepared
once per schedule, options and operand layouts (its plan, config, table and argument tail, kept in
_layout.PREPARED) is launched straight from the backend function, with training_losses' own lean autograd node
when model_output requires grad: no table lookup, no layout-cache key, no launcher frames per call. And they
bind (``q_sample.bind``, ``velocity.bind``, ``training_losses.bind``): ddpm_fast.ops keeps the bound call under
the key of what its checks read, and later calls with that key skip the checks' reads, the router and the layout
lookup alike (ddpm_fast.ops._bound).

On a GPU the op is a ``torch.library.triton_op``: torch.compile traces through its body, sees each
kernel via ``wrap_triton`` and inlines it into its graph; the body is also its fake implementation.
Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) wrap_triton cannot capture interpreted
kernels, so the op is an opaque ``torch.library.custom_op`` with an explicit fake.
"""
from __future__ import annotations

import contextlib

import torch
from torch.library import wrap_triton  # noqa: F401  (the op bodies' wrap)

from ._runtime import INTERPRET, check_device

NS = "ddpm_fast_triton"
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)  # tensors whose kernels launch directly
_BF16 = torch.bfloat16


def direct(kernel):
    """The eager launchers' wrap: launch the kernel itself."""
    return kernel


class LaunchStub:
    """The eager wrap while stubbed_launches is active: ``wrap(kernel)[grid](*args, **meta)`` evaluates a
    callable grid on ``meta`` (as Triton's launch does first) and counts the launch in ``launches``; no kernel
    runs and nothing else of Triton's launch (argument binding, specialization, cache lookup, the driver call)
    happens. The outputs the launchers allocated are left uninitialised."""

    def __init__(self):
        self.launches = 0
        self._grid = None

    def __call__(self, kernel):
        return self

    def __getitem__(self, grid):
        self._grid = grid
        return self._launch

    def _launch(self, *args, **meta):
        if callable(self._grid):
            self._grid(meta)
        self.launches += 1


@contextlib.contextmanager
def stubbed_launches():
    """Within: every launch of the plain-eager route (``direct``, which call and the autograd Functions look up
    at each call) goes to a LaunchStub, yielded; what remains is this backend's own Python cost (checks,
    dispatch, autograd, output allocation, layout plans). The torch.library ops (wrap_triton) are untouched. For
    the host benchmark (ddpm_fast.bench.host): not thread-safe, never for results."""
    global direct
    real, stub = direct, LaunchStub()
    direct = stub
    try:
        yield stub
    finally:
        direct = real


def define(name: str, fake, mutates_args=()):
    """Decorator: register an annotated op body as ``ddpm_fast_triton::name`` (triton_op on GPUs; a custom_op
    with ``fake`` as its fake implementation under the interpreter), declaring the arguments named in
    ``mutates_args`` as written in place."""
    def register(body):
        if INTERPRET:
            op = torch.library.custom_op(f"{NS}::{name}", body, mutates_args=mutates_args)
            op.register_fake(fake)
            return op
        return torch.library.triton_op(f"{NS}::{name}", body, mutates_args=mutates_args)

    return register


# whether torch.compile's dynamo traces this call: a plain `return False` in eager that dynamo treats as True
# (torch.compiler.is_compiling calls torch.jit.is_scripting first, one more frame); export and fake / functional
# tracing run under a dispatch mode, which the other tests of call catch
_is_compiling = torch.compiler.is_dynamo_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_level = torch._C._functorch.maybe_current_level
_grad_enabled = torch.is_grad_enabled


def plain_eager(*tensors) -> bool:
    """True if the kernels may be launched directly: plain tensors, not under torch.compile, no dispatch
    mode (fake / functional tensors, FlopCounter, ...) and no functorch transform (vmap, grad)."""
    return _plain_eager(tensors)


def _plain_eager(tensors) -> bool:
    if _is_compiling() or _dispatch_modes() or _functorch_level() is not None:
        return False
    for x in tensors:
        if x is not None and type(x) not in PLAIN_TYPES:
            return False
    return True


def autograd_function(name: str, impl, setup_context, backward):
    """A torch.autograd.Function running ``impl(direct, *args)`` forward, with the op's autograd formula
    (the same setup_context and backward as its register_autograd)."""

    def forward(ctx, *args):
        out = impl(direct, *args)
        setup_context(ctx, args, out)
        return out

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                     "backward": staticmethod(backward)})


def eager_mode() -> bool:
    """Not under torch.compile, no dispatch mode, no functorch transform."""
    return not (_is_compiling() or _dispatch_modes() or _functorch_level() is not None)


def launchable(tensors) -> bool:
    """Whether plain eager may launch the kernels on ``tensors`` (None: absent) itself: not under torch.compile,
    no dispatch mode, no functorch transform, and each a plain tensor Triton runs here (check_device's test,
    inline). Otherwise call takes the library op (and check_device raises for a tensor Triton cannot run)."""
    if _is_compiling() or _dispatch_modes() or _functorch_level() is not None:  # eager_mode, inline
        return False
    if INTERPRET:  # CPU or CUDA tensors, not bfloat16
        for x in tensors:
            if x is not None and (type(x) not in PLAIN_TYPES or x.dtype is _BF16 or not (x.is_cpu or x.is_cuda)):
                return False
    else:
        for x in tensors:
            if x is not None and (type(x) not in PLAIN_TYPES or not x.is_cuda):
                return False
    return True


def needs_grad(diff) -> bool:
    """Whether autograd is on and a tensor of ``diff`` (None: absent) requires grad."""
    if _grad_enabled():
        for x in diff:
            if x is not None and x.requires_grad:
                return True
    return False


def call(op, impl, fn, args, tensors, diff=(), inner=False):
    """Run one op on ``args``: its launcher directly, its autograd.Function ``fn`` when an input in ``diff``
    requires grad, or the library ``op`` when not launchable. ``tensors``: every tensor argument a caller gave
    (None: absent; the schedule table, made here, may be left out). Raises BackendUnavailableError
    (_runtime.check_device) if one of them cannot run on Triton here, except for an ``inner`` call (a backward
    of an op already called: a GPU-less torch.compile traces those with CPU tensors)."""
    if not launchable(tensors):
        if not inner:
            check_device(*tensors)  # raises, unless the call is only not plain eager
        return op(*args)
    if fn is not None and needs_grad(diff):
        return fn.apply(*args)
    return impl(direct, *args)
