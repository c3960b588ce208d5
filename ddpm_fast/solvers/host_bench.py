"""Time per step of the drop-in solver schedulers against diffusers' own (host overhead and compute).

    python -m ddpm_fast.solvers.host_bench [--loops 40] [--steps 25] [--threads 1]

For each sampler (DPM-Solver++ 2M, DPM-Solver++ 3M SDE, UniPC bh2 order 3, Euler, Euler ancestral) and
each shape (1x4x8x8: the host overhead; 1x4x64x64: an SD latent), float32 on the CPU: the median over
``--loops`` sampling loops of the time per step (scale_model_input + step, the model output fixed), and
the ops one step dispatches (full-size results + the rest, mostly 0-dim; host reads: .item() / nonzero).
A measurement for reports, not a test; run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..compat.diffusers_solvers import (DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                                        EulerDiscreteScheduler, FastDPMSolverMultistepScheduler,
                                        FastEulerAncestralDiscreteScheduler, FastEulerDiscreteScheduler,
                                        FastUniPCMultistepScheduler, UniPCMultistepScheduler)

SAMPLERS = (
    ("DPM++ 2M", DPMSolverMultistepScheduler, FastDPMSolverMultistepScheduler, {}),
    ("DPM++ 3M SDE", DPMSolverMultistepScheduler, FastDPMSolverMultistepScheduler,
     {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}),
    ("UniPC bh2 o3", UniPCMultistepScheduler, FastUniPCMultistepScheduler, {"solver_order": 3}),
    ("Euler", EulerDiscreteScheduler, FastEulerDiscreteScheduler, {}),
    ("Euler a", EulerAncestralDiscreteScheduler, FastEulerAncestralDiscreteScheduler, {}),
)
SHAPES = ((1, 4, 8, 8), (1, 4, 64, 64))


class _CountOps(TorchDispatchMode):
    """Counts dispatched ops: results of at least ``numel`` elements, the rest, and host reads."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.full, self.small, self.host_reads = numel, 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero):
            self.host_reads += 1
        if isinstance(out, torch.Tensor) and out.numel() >= self.numel:
            self.full += 1
        else:
            self.small += 1
        return out


def _step(scheduler, model_output, t, x, generator):
    kwargs = {} if isinstance(scheduler, UniPCMultistepScheduler) else {"generator": generator}
    return scheduler.step(model_output, t, scheduler.scale_model_input(x, t), **kwargs).prev_sample


def _loop_seconds_per_step(scheduler, x, model_output, steps, generator):
    scheduler.set_timesteps(steps)
    start = time.perf_counter()
    for t in scheduler.timesteps:
        x = _step(scheduler, model_output, t, x, generator)
    return (time.perf_counter() - start) / steps


def _ops_of_one_step(scheduler, x, model_output, steps, generator, at=5):
    """The ops of step ``at`` (past the multistep warm-up) of a loop."""
    scheduler.set_timesteps(steps)
    counter = _CountOps(x.numel())
    for i, t in enumerate(scheduler.timesteps):
        if i == at:
            with counter:
                _step(scheduler, model_output, t, x, generator)
        else:
            _step(scheduler, model_output, t, x, generator)
    return counter


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loops", type=int, default=40)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    for shape in SHAPES:
        print(f"{'x'.join(map(str, shape))} fp32, {args.threads} thread(s), {args.steps}-step loops: us per step "
              f"(median of {args.loops}), parent / ours; ops per step: full-size + other (host reads)")
        gen = torch.Generator().manual_seed(0)
        x, model_output = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        for name, parent_cls, fast_cls, cfg in SAMPLERS:
            row = {}
            for label, cls in (("parent", parent_cls), ("ours", fast_cls)):
                scheduler = cls(**cfg)
                for _ in range(3):  # warm-up
                    _loop_seconds_per_step(scheduler, x, model_output, args.steps, gen)
                times = [_loop_seconds_per_step(scheduler, x, model_output, args.steps, gen)
                         for _ in range(args.loops)]
                ops = _ops_of_one_step(scheduler, x, model_output, args.steps, gen)
                row[label] = (statistics.median(times) * 1e6, ops)
            (tp, op), (to, oo) = row["parent"], row["ours"]
            print(f"  {name:14s} {tp:8.1f} / {to:8.1f}  x{tp / to:4.1f}   ops {op.full}+{op.small} ({op.host_reads})"
                  f" / {oo.full}+{oo.small} ({oo.host_reads})")


if __name__ == "__main__":
    main()
