"""Addressing plan shared by every launcher: each operand as [B, D1, D2, D3] with its own strides.

A kernel program handles a chunk of one sample's N = D1 * D2 * D3 elements. The per-sample dims are
the operands' dims after the batch dim with size-1 dims dropped, permuted into the memory order of
the first operand (so a channels_last tensor walks its memory linearly) and merged wherever every
operand allows it. Element order within a sample is irrelevant to every op (elementwise maps and
per-sample sums), so the permutation is free. When every operand ends up as one unit-stride dim the
plan is FLAT and a kernel addresses ``b * stride_b + n`` (contiguous, vectorisable loads).
More than three unmergeable dims: the inputs are copied contiguous first (one extra pass, rare).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_DIMS = 3


@dataclass(frozen=True)
class Plan:
    """sizes: (D1, D2, D3); strides: per operand (sb, s1, s2, s3); n: elements per sample."""

    sizes: tuple
    strides: tuple
    flat: bool

    @property
    def n(self) -> int:
        return self.sizes[0] * self.sizes[1] * self.sizes[2]


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


def plan(operands) -> Plan:
    """Plan for tensors of one shape [B, ...] (views are fine). Raises ValueError if > 3 dims remain."""
    shape = tuple(operands[0].shape)
    if any(tuple(x.shape) != shape for x in operands):
        raise ValueError(f"operands: expected one shape {shape}, got {[tuple(x.shape) for x in operands]}")
    rest = shape[1:]
    sizes, strides = _merge(rest, [x.stride()[1:] for x in operands])
    if len(sizes) > MAX_DIMS:
        raise ValueError("layout: more than 3 unmergeable dims")
    pad = MAX_DIMS - len(sizes)
    sizes = [1] * pad + sizes
    strides = [[0] * pad + st for st in strides]
    flat = sizes[0] == 1 and sizes[1] == 1 and (sizes[2] == 1 or all(st[2] == 1 for st in strides))
    batch_strides = [x.stride()[0] if shape and shape[0] != 1 else 0 for x in operands]
    if not shape:
        batch_strides = [0] * len(operands)
    return Plan(tuple(sizes), tuple((sb, *st) for sb, st in zip(batch_strides, strides)), flat)


def flat_strides(p: Plan) -> tuple:
    """Every operand's (sb, s1, s2, s3), concatenated in operand order (the kernels' argument order)."""
    return tuple(s for st in p.strides for s in st)


def run(inputs, outputs, launch) -> None:
    """launch(inputs, outputs, plan) on a common plan; if the layouts do not fit one, on contiguous
    copies (outputs copied back afterwards: an extra pass, only for > 3 unmergeable dims)."""
    try:
        p = plan(list(inputs) + list(outputs))
    except ValueError:
        ci = [x.contiguous() for x in inputs]
        co = [torch.empty(o.shape, dtype=o.dtype, device=o.device) for o in outputs]
        launch(ci, co, plan(ci + co))
        for o, c in zip(outputs, co):
            o.copy_(c)
        return
    launch(list(inputs), list(outputs), p)
