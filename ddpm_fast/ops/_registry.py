"""The op registry: each public op declared once, with everything the rest of the library derives from it.

An op family module (ddpm_fast.ops.noising, ...) decorates each public function with ``register(...)``:

- ``tensors``: the op's tensor inputs, the batched one ([B, ...], whose B the others follow) first, in the
  order it hands them to ddpm_fast.backends.route (whose capability table names the ones a backend cannot
  differentiate);
- ``fakes``: the fake (meta) implementations of its torch.ops.ddpm_fast ops (ddpm_fast.native registers them);
- ``traffic``: its compulsory memory traffic in bytes (ddpm_fast.traffic.<op>; see that module's conventions);
- ``bench``: its benchmark cases, as ddpm_fast.bench.cases.Case fields (plus ``traffic(case, shape, dtype)``,
  by default the op's traffic model of (shape, dtype));
- ``test_case`` / ``reads``: one valid call on tests/backend_cases.inputs(), and the inputs it reads;
- ``compiled``: the compiled backends' adapter, ``compiled(kernel, *args, **kwargs)`` with the reference op's
  arguments: it calls ``kernel.op`` (the op's torch.ops overload) with the schema's arguments (``kernel.table``
  and the other helpers of ddpm_fast.native.Kernel) and shapes the result like the reference's;
- ``kernel_no_grad``: the tensor inputs the fused kernels (compiled and Triton) cannot differentiate, or
  backends.ALL_INPUTS; the router runs the reference when one of them requires grad.

ddpm_fast.ops.__all__, ddpm_fast's exports, native's fakes, ddpm_fast.traffic, bench.cases.CASES and
tests/backend_cases.py iterate REGISTRY instead of listing the ops again; ddpm_fast.native builds its ops from
``compiled`` and ddpm_fast.backends its gradient fallbacks from ``kernel_no_grad``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..options import COLUMNS, LEARNED_VAR_TYPES


@dataclass(frozen=True)
class OpSpec:
    """One public op and its derived declarations (see the module docstring)."""

    name: str
    function: Callable
    tensors: tuple
    fakes: dict = field(default_factory=dict)
    traffic: Callable | None = None
    bench: tuple = ()
    test_case: Callable | None = None
    reads: tuple = ()
    compiled: Callable | None = None
    kernel_no_grad: tuple | str = ()


REGISTRY: dict = {}  # op name -> OpSpec, in registration order


def register(*, tensors, fakes=None, traffic=None, bench=(), test_case=None, reads=(), compiled=None,
             kernel_no_grad=()):
    """Decorator: declare the public op it decorates (returned unchanged) in REGISTRY."""
    def add(function):
        no_grad = kernel_no_grad if isinstance(kernel_no_grad, str) else tuple(kernel_no_grad)
        spec = OpSpec(function.__name__, function, tuple(tensors), dict(fakes or {}), traffic, tuple(bench),
                      test_case, tuple(reads), compiled, no_grad)
        REGISTRY[spec.name] = spec
        return function

    return add


# -- traffic: bytes one call must move (conventions: ddpm_fast.traffic's docstring) ------------------------
@dataclass(frozen=True)
class Traffic:
    """Bytes read and written by one call."""

    read: int
    written: int

    @property
    def total(self) -> int:
        return self.read + self.written

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.read + other.read, self.written + other.written)


def copy(nbytes: int) -> Traffic:
    """A device-to-device copy of ``nbytes``: read once, written once."""
    return Traffic(int(nbytes), int(nbytes))


def check_shape(shape, dtype) -> tuple:
    """``shape`` as a tuple of ints, checked to be batched; ``dtype`` checked to be floating."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or any(s < 0 for s in shape):
        raise ValueError(f"shape: expected a batched shape [B, ...] of sizes >= 0, got {shape}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    return shape


def numel(shape) -> int:
    return math.prod(shape)


def element_bytes(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def per_sample_bytes(dtype) -> int:
    """Bytes of one [B] result: float64 for float64 inputs, else float32."""
    return 8 if dtype == torch.float64 else 4


def t_and_rows(shape, dtype) -> int:
    """t (int64) plus one packed-table row per sample."""
    return shape[0] * (8 + len(COLUMNS) * per_sample_bytes(dtype))


def model_output_factor(var_type: str) -> int:
    """model_output's channels over x_t's: 2 with a learned variance half, else 1."""
    return 2 if var_type in LEARNED_VAR_TYPES else 1


def xstart_input_bytes(shape, dtype, mean_type) -> int:
    """Bytes read to predict x0: the model's mean half, plus x_t unless the model predicts x0."""
    n, e = numel(shape), element_bytes(dtype)
    return n * e if mean_type == "x0" else 2 * n * e


# -- fakes: the layouts of the compiled ops' outputs (csrc/layout.h) -----------------------------------------
def plan_strides(x):
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


def like_plan(x, dtype=None):
    """An empty tensor of x's shape in make_plan's layout."""
    return torch.empty_strided(x.shape, plan_strides(x), dtype=dtype or x.dtype, device=x.device)


def per_sample(x, dtype):
    """An empty [B] tensor."""
    return x.new_empty((x.shape[0],), dtype=dtype)


def saved_grad(need, x, compute):
    """The forward's saved gradient buffer: plan-shaped when needed, else None (the op does not make it)."""
    return like_plan(x, compute) if need else None


def broadcast_outputs(n, xs, dtype):
    """n empty tensors of the broadcast shape of xs."""
    shape = torch.broadcast_shapes(*[x.shape for x in xs])
    return tuple(xs[0].new_empty(shape, dtype=dtype) for _ in range(n))


def broadcast_compute(xs):
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
