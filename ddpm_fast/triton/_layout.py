"""Addressing plan shared by every launcher: each operand as [B, D1, D2, D3] with its own strides.

A kernel program handles a chunk of one sample's N = D1 * D2 * D3 elements. The per-sample dims are
the operands' dims after the batch dim with size-1 dims dropped, permuted into the memory order of
the first operand (so a channels_last tensor walks its memory linearly) and merged wherever every
operand allows it. Element order within a sample is irrelevant to every op (elementwise maps and
per-sample sums), so the permutation is free. When every operand ends up as one unit-stride dim the
plan is FLAT and a kernel addresses ``b * stride_b + n`` (contiguous, vectorisable loads).
More than three unmergeable dims: the inputs are copied contiguous first (one extra pass, rare).

With ``logical=True`` the plan carries one more stride set after the operands: the row-major strides of
the shape (batch stride N), so that a kernel can compute each element's logical index b * N + (row-major
index within the sample) whatever the walk order; in-kernel noise is drawn at that index, so a seed gives
the same noise for any layout, as on the CPU and CUDA backends. Dims then merge only where the row-major
order allows it too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._runtime import device_guard, launch_config

MAX_DIMS = 3
CACHE_SIZE = 1024  # cached (plan, launch config) pairs, keyed by operand shapes and strides
_CACHE: dict = {}
# the backend functions' prepared launches (see keep_prepared), kept and cleared with the plans
PREPARED: dict = {}


class LayoutError(ValueError):
    """The operands' layouts leave more than MAX_DIMS unmergeable dims."""


@dataclass(frozen=True)
class Plan:
    """sizes: (D1, D2, D3); strides: per operand (sb, s1, s2, s3); flat: every operand one unit-stride dim;
    args: every operand's strides concatenated (the kernels' argument order); n: elements per sample
    (D1 * D2 * D3, a field: read at every launch)."""

    sizes: tuple
    strides: tuple
    flat: bool
    args: tuple
    n: int

    def __hash__(self):  # launchers key caches on plans: hash the fields once (a plan is immutable)
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.sizes, self.strides, self.flat, self.args, self.n))
            object.__setattr__(self, "_hash", h)
        return h


def _merge(shape, strides_list):
    """Drop size-1 dims, sort by the first operand's strides (descending), merge mergeable neighbours."""
    dims = [d for d in range(len(shape)) if shape[d] != 1]
    dims.sort(key=lambda d: -abs(strides_list[0][d]))
    sizes = [shape[d] for d in dims]
    strides = [[s[d] for d in dims] for s in strides_list]
    i = 0
    while i + 1 < len(sizes):
        if all(st[i] == st[i + 1] * sizes[i + 1] for st in strides):
            sizes[i] *= sizes[i + 1]
            for st in strides:
                st[i] = st[i + 1]
                del st[i + 1]
            del sizes[i + 1]
        else:
            i += 1
    return sizes, strides


def _row_major(sizes) -> tuple:
    """Strides of a contiguous tensor of these sizes (in elements)."""
    strides, s = [], 1
    for size in reversed(sizes):
        strides.append(s)
        s *= size
    return tuple(reversed(strides))


def _strides_at(x, shape: tuple) -> tuple:
    """x's strides for addressing ``shape`` (see plan): a missing leading dim, or a size-1 dim where the shape's
    is larger, broadcasts (stride 0); a dim at least the shape's size is addressed by x's own stride (its leading
    box). ValueError for any other size."""
    offset = len(shape) - x.ndim
    if offset < 0:
        raise ValueError(f"operand: shape {tuple(x.shape)} has more dims than {shape}")
    strides = [0] * len(shape)
    for d, (have, step) in enumerate(zip(x.shape, x.stride())):
        want = shape[offset + d]
        if have >= want:
            strides[offset + d] = step
        elif have != 1:
            raise ValueError(f"operand: shape {tuple(x.shape)} neither holds nor broadcasts to {shape}")
    return tuple(strides)


def plan(operands, logical: bool = False, shape=None) -> Plan:
    """Plan for tensors of one shape [B, ...] (views are fine). Raises ValueError if > 3 dims remain.

    logical: add the row-major strides of the shape as a last stride set (see the module docstring).
    shape: plan this shape instead, each operand addressed by its own strides from index 0: an operand larger
    than the shape in a dim is read in its leading box (a model output [B, 2C, ...] planned at [B, C, ...] is its
    mean half), one of size 1 there or lacking leading dims broadcasts (stride 0, no expand view); ValueError for
    any other operand shape."""
    if shape is None:
        shape = tuple(operands[0].shape)
        if any(tuple(x.shape) != shape for x in operands):
            raise ValueError(f"operands: expected one shape {shape}, got {[tuple(x.shape) for x in operands]}")
        all_strides = [x.stride() for x in operands]
    else:
        shape = tuple(shape)
        all_strides = [_strides_at(x, shape) for x in operands]
    rest = shape[1:]
    stride_sets = [st[1:] for st in all_strides] + ([_row_major(rest)] if logical else [])
    sizes, strides = _merge(rest, stride_sets)
    if len(sizes) > MAX_DIMS:
        raise LayoutError("layout: more than 3 unmergeable dims")
    pad = MAX_DIMS - len(sizes)
    sizes = [1] * pad + sizes
    strides = [[0] * pad + st for st in strides]
    flat = sizes[0] == 1 and sizes[1] == 1 and (sizes[2] == 1 or all(st[2] == 1 for st in strides))
    n = 1
    for size in rest:
        n *= size
    batch_strides = [st[0] if shape and shape[0] != 1 else 0 for st in all_strides]
    if logical:
        batch_strides.append(n if shape and shape[0] != 1 else 0)
    if not shape:
        batch_strides = [0] * len(stride_sets)
    sets = tuple((sb, *st) for sb, st in zip(batch_strides, strides))
    return Plan(tuple(sizes), sets, flat, tuple(s for st in sets for s in st), sizes[0] * sizes[1] * sizes[2])


def philox_blocks_whole(p: Plan) -> bool:
    """Whether in-kernel noise may draw four per Philox block over plan p (planned with logical=True): a flat
    plan walks each sample in row-major order, and with N % 4 == 0 every chunk (a BLOCK of a multiple of 4
    elements) starts at a counter b * N + chunk * BLOCK that is a multiple of 4."""
    return p.flat and p.n % 4 == 0


def _holds(x, shape) -> bool:
    """Whether x has shape's dims, each at least as large (plan reads its leading box: no broadcasting)."""
    return x.ndim == len(shape) and all(have >= want for have, want in zip(x.shape, shape))


def flat_strides(p: Plan) -> tuple:
    """Every operand's (sb, s1, s2, s3), concatenated in operand order (the kernels' argument order)."""
    return p.args


def clear_cache() -> None:
    """Forget every cached plan and prepared launch, and the ops' bound calls made from them (after changing the
    launch constants in _runtime, e.g. in tests)."""
    from ..ops import _bound  # (the ops' bound calls hold prepared launches)

    _CACHE.clear()
    PREPARED.clear()
    _bound.clear()


# plan_key: the plan of contiguous operands (torch's is_contiguous) is a function of their shapes alone: plan drops
# size-1 dims, the only ones whose strides is_contiguous leaves free; a prepared launch's key then leaves the
# strides out


def keep_prepared(key, value):
    """Keep a backend function's prepared launch (what a launch needs besides the call's own tensors: the table,
    the plan and config, options) under ``key`` (what it was made from: the kernel, the schedule itself, so
    that its identity stays its own, the options and every operand's shape and strides) in PREPARED, which
    holds at most CACHE_SIZE; returns value."""
    if len(PREPARED) >= CACHE_SIZE:
        PREPARED.clear()
    PREPARED[key] = value
    return value


def current_device(x) -> bool:
    """Whether x is a CPU tensor or on the current CUDA device (where Triton launches: run switches to the
    inputs' device otherwise; a prepared launch does not)."""
    return not x.is_cuda or x.get_device() == torch.cuda.current_device()


def _lookup(operands, logical: bool, shape=None, like=None) -> tuple:
    """(the cache key of these operands, their cached (Plan, LaunchConfig) or None); key None while tracing.
    like: (input index, number of outputs) when the outputs are left out of the key (see run)."""
    key, previous = [logical, shape, like], None
    for x in operands:  # an operand repeated (x_t standing in for an absent noise, ...) keys as None
        if x is previous:
            key.append(None)
        else:
            key.append(x.shape)
            key.append(x.stride())
        previous = x
    key = tuple(key)
    try:
        return key, _CACHE.get(key)
    except TypeError:  # symbolic sizes while tracing: not hashable, planned each time
        return None, None


def _plan_and_keep(key, operands, logical: bool, shape) -> tuple:
    """(Plan, LaunchConfig) of the operands, kept in the cache under key (None: not kept)."""
    p = plan(operands, logical, shape)
    hit = (p, launch_config(p.n, (shape or operands[0].shape)[0]))
    if key is not None:
        if len(_CACHE) >= CACHE_SIZE:
            _CACHE.clear()
        _CACHE[key] = hit
    return hit


def planned(operands, logical: bool = False, shape=None) -> tuple:
    """(Plan, _runtime.LaunchConfig) for operands of one shape [B, ...] (or planned at ``shape``, see plan),
    cached by their shapes and strides: a repeated call costs one dict lookup. Raises LayoutError (> 3
    unmergeable dims), or ValueError from launch_config."""
    key, hit = _lookup(operands, logical, shape)
    return hit if hit is not None else _plan_and_keep(key, operands, logical, shape)


def run(inputs, outputs, launch, logical: bool = False, shape=None, like=None, args=()) -> None:
    """launch(inputs, outputs, plan, config, *args) on a common plan of the operands (inputs [B, ...] then
    outputs, one shape, or planned at ``shape`` (see plan); the row-major stride set last if logical), on the
    inputs' CUDA device; if the layouts do not fit one plan, on contiguous copies (outputs copied back afterwards:
    an extra pass, only for > 3 unmergeable dims). args: what else launch takes (a module-level launch with its
    arguments costs less per call than a closure made per call).

    like: the index of the input every output was allocated from by ``torch.empty_like`` (then the outputs'
    layout is a function of that input's shape and strides, and the cache key leaves them out: a cheaper
    lookup). Only for outputs made that way."""
    if like is None:
        key, hit = _lookup((*inputs, *outputs), logical, shape)
    else:
        key, hit = _lookup(inputs, logical, shape, (like, len(outputs)))
    first = inputs[0]
    # Triton launches on the current CUDA device: switch only when the inputs are on another one (the context
    # manager costs a few microseconds); CPU tensors (the interpreter) have no current device
    if not current_device(first):
        with device_guard(first.device):
            if hit is None:
                _run(inputs, outputs, launch, logical, shape, key, args)
            else:
                launch(inputs, outputs, *hit, *args)
        return
    if hit is None:  # planned on first use (or each time while tracing)
        _run(inputs, outputs, launch, logical, shape, key, args)
    else:
        if CHECK_LIKE and like is not None:
            _check_like(hit, inputs, outputs, logical, shape)
        launch(inputs, outputs, *hit, *args)


CHECK_LIKE = False  # tests: check each cached plan run() finds by ``like`` against the outputs' own layouts


def _check_like(hit, inputs, outputs, logical, shape):
    """Raise AssertionError if the plan cached for these inputs (outputs left out of its key) is not the plan of
    every operand, the outputs included: a caller passed ``like`` for outputs not made by empty_like."""
    want = planned([*inputs, *outputs], logical, shape)
    if want != hit:
        raise AssertionError(f"run(like=...): cached plan {hit} != the operands' {want}")


def _run(inputs, outputs, launch, logical, shape, key, args):
    """run's launch on a plan made now and kept under run's key (None while tracing: not kept)."""
    try:
        p, c = _plan_and_keep(key, [*inputs, *outputs], logical, shape)
    except LayoutError:  # (an input broadcast to ``shape`` is materialised at it)
        ci = [x.contiguous() if shape is None or _holds(x, shape) else x.expand(shape).contiguous() for x in inputs]
        co = [torch.empty(o.shape, dtype=o.dtype, device=o.device) for o in outputs]
        p, c = planned(ci + co, logical, shape)
        launch(ci, co, p, c, *args)
        for o, copy in zip(outputs, co):
            o.copy_(copy)
        return
    launch(inputs, outputs, p, c, *args)
