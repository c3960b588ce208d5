"""Shared helpers for the cross-backend tests: which backends run here, and one valid call per op.

A "case" calls a public op with small valid inputs that a test may override one at a time.
"""
from __future__ import annotations

import functools

import torch

import ddpm_fast as F
from ddpm_fast.ops import REGISTRY

SCHEDULE = F.NoiseSchedule.named("linear", 100)


def backends_here():
    """Backends that can run on this machine's tensors: CPU ones always, CUDA ones with a GPU."""
    names = []
    for name, (ok, _) in F.availability().items():
        if not ok:
            continue
        if name == "cuda" and not torch.cuda.is_available():
            continue
        names.append(name)
    return names


def device_for(backend: str) -> str:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def inputs(B=2, C=3, spatial=(4,), dtype=torch.float32, device="cpu", learned=True, seed=0):
    """Valid inputs: x0 in [-1, 1], noise, x_t, model_output (doubled channels when learned), eps, t."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, C, *spatial)
    x0 = (torch.rand(shape, generator=g) * 2 - 1).to(dtype).to(device)
    noise = torch.randn(shape, generator=g).to(dtype).to(device)
    x_t = torch.randn(shape, generator=g).to(dtype).to(device)
    mo_shape = (B, 2 * C, *spatial) if learned else shape
    mo = (torch.randn(mo_shape, generator=g) * 0.5).to(dtype).to(device)
    t = torch.randint(0, SCHEDULE.num_timesteps, (B,), generator=g).to(device)
    eps = torch.randn(shape, generator=g).to(dtype).to(device)  # a mean-only model output
    return dict(x0=x0, noise=noise, x_t=x_t, model_output=mo, eps=eps, t=t)


# One valid call per op and the named inputs it reads (so a bad-input case applies only where it means
# something), both declared beside the op (ddpm_fast.ops.<family>: register(test_case=..., reads=...)).
OPS = {name: functools.partial(spec.test_case, schedule=SCHEDULE) for name, spec in REGISTRY.items()
       if spec.test_case is not None}
READS = {name: REGISTRY[name].reads for name in OPS}


def flatten(out):
    """Every tensor of an op's result, in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return list(out)
