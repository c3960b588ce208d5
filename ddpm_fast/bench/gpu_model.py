"""A modelled GPU table: what each op should cost on an H100 / H200 before one is measured.

For each benchmark case at a GPU-sized shape it gives the bytes a fused kernel must move
(ddpm_fast.traffic: every input read once, every output written once), the bytes the eager
reference moves (counted: every aten op it launches reads its tensor inputs and writes its outputs;
views move nothing) and the number of ops it launches, and the time those bytes take at a memory
bandwidth of 3.35 TB/s (H100 SXM) and 4.8 TB/s (H200). It is a bandwidth model: it says nothing
of launch latency (which favours the fused op further on small inputs) or of achieved bandwidth
(real kernels reach some 80-90% of it at best). Nothing here is a measurement of a GPU.

    python -m ddpm_fast.bench.gpu_model [--size 256x4x64x64] [--dtype float32]
    ddpm-fast bench --device cuda --dry-run [--sizes ...] [--dtype ...] [--ops ...]   (no GPU needed)
"""
from __future__ import annotations

import argparse
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import reference
from .cases import CASES

BANDWIDTHS = (("H100 SXM", 3.35e12), ("H200", 4.8e12))
COUNT_BATCH = 4  # the eager reference is run on this many samples and its bytes scaled to the batch


def _distinct_bytes(x: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``x`` (a broadcast dim, stride 0, is read once)."""
    n = math.prod(s for s, st in zip(x.shape, x.stride()) if st != 0) if x.ndim else 1
    return n * x.element_size()


class ByteCounter(TorchDispatchMode):
    """Adds up the bytes every aten op reads (its tensor arguments) and writes (its tensor results),
    skipping view ops, and counts the ops."""

    def __init__(self):
        super().__init__()
        self.read = self.written = self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "is_view", False):
            return out
        self.ops += 1
        flat_in = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        flat_out = torch.utils._pytree.tree_leaves(out)
        self.read += sum(_distinct_bytes(a) for a in flat_in if isinstance(a, torch.Tensor))
        self.written += sum(_distinct_bytes(o) for o in flat_out if isinstance(o, torch.Tensor))
        return out


def eager_bytes(case, shape, dtype) -> tuple[int, int]:
    """(bytes the eager reference moves for one call at ``shape``, aten ops it launches), counted on
    COUNT_BATCH samples on the CPU and scaled linearly to shape[0] (every op here is per sample)."""
    small = (min(COUNT_BATCH, shape[0]), *shape[1:])
    gen = torch.Generator().manual_seed(0)
    args = case.inputs(small, dtype, "cpu", gen).args
    counter = ByteCounter()
    with counter:
        case.run(getattr(reference, case.op), args, explicit_noise=bool(case.options.get("noise_given")))
    return (counter.read + counter.written) * shape[0] // small[0], counter.ops


def rows(shape=(256, 4, 64, 64), dtype=torch.float32, cases=None) -> list[dict]:
    """One row per benchmark case (``cases``, default all of bench.cases.CASES) at ``shape`` (BxCxHxW)
    and storage ``dtype`` (float32 / float16 / bfloat16): fused and eager bytes, eager op count, and
    microseconds at each of BANDWIDTHS."""
    out = []
    for case in CASES if cases is None else cases:
        fused = case.traffic(shape, dtype).total
        eager, launches = eager_bytes(case, shape, dtype)
        row = {"op": case.label, "size": "x".join(map(str, shape)), "dtype": str(dtype)[6:],
               "fused_bytes": fused, "eager_bytes": eager, "eager_ops": launches}
        for name, bw in BANDWIDTHS:
            row[f"fused_us_{name}"] = fused / bw * 1e6
            row[f"eager_us_{name}"] = eager / bw * 1e6
        out.append(row)
    return out


def table_text(table: list[dict]) -> str:
    head = (f"{'op':<32} {'fused MB':>9} {'eager MB':>9} {'ratio':>6} {'eager ops':>9} "
            + " ".join(f"{'us @' + name:>15}" for name, _ in BANDWIDTHS))
    lines = [f"Modelled at memory bandwidth only, {table[0]['size']} {table[0]['dtype']} "
             "(fused = every input read once, every output written once; eager = counted aten traffic):", head]
    for r in table:
        times = " ".join(f"{r[f'fused_us_{n}']:>6.1f} / {r[f'eager_us_{n}']:<7.1f}" for n, _ in BANDWIDTHS)
        lines.append(f"{r['op']:<32} {r['fused_bytes'] / 1e6:>9.1f} {r['eager_bytes'] / 1e6:>9.1f} "
                     f"{r['eager_bytes'] / r['fused_bytes']:>5.1f}x {r['eager_ops']:>9} {times}")
    lines.append("us columns: fused / eager time at that bandwidth; not a GPU measurement.")
    return "\n".join(lines)


def dry_run(sizes, dtypes, cases=None) -> int:
    """``ddpm-fast bench --device cuda --dry-run``: the modelled table for each of ``sizes`` (BxCxHxW
    tuples) and ``dtypes`` on stdout, without a GPU; returns the exit status 0."""
    for dtype in dtypes:
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise SystemExit(f"--dtype: the GPU model covers float32, float16 and bfloat16, not {str(dtype)[6:]} "
                             "(float64 CUDA inputs run the reference path)")
    print("ddpm-fast bench --dry-run: a bandwidth model of the GPU run, not a measurement (no GPU used)")
    for shape in sizes:
        for dtype in dtypes:
            print()
            print(table_text(rows(shape, dtype, cases)))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.bench.gpu_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="256x4x64x64", help="BxCxHxW (default 256x4x64x64)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    a = p.parse_args(argv)
    shape = tuple(int(s) for s in a.size.lower().split("x"))
    print(table_text(rows(shape, getattr(torch, a.dtype))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
