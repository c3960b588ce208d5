"""`ddpm-fast bench` (first cut): list the backends and time q_sample on the reference."""
from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None) -> int:
    import torch

    from . import NoiseSchedule, q_sample
    from .info import report

    p = argparse.ArgumentParser(prog="ddpm-fast bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="a few runs only")
    args = p.parse_args(argv)
    print(report())
    schedule = NoiseSchedule.named("linear", 1000)
    x0 = torch.randn(64, 3, 64, 64)
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (64,))
    runs = 5 if args.quick else 50
    for _ in range(3):
        q_sample(x0, t, noise, schedule, backend="reference")
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        q_sample(x0, t, noise, schedule, backend="reference")
        times.append((time.perf_counter() - start) * 1e3)
    print(f"q_sample reference, cpu float32 64x3x64x64: median {statistics.median(times):.3f} ms over {runs} runs")
    return 0
