"""Bytes each op must move: the compulsory memory traffic of one call, given shapes and dtypes.

A fused kernel that reads every input it depends on once and writes every output once moves
exactly this many bytes; ``ddpm-fast bench`` divides it by the measured time to get GB/s. The
count is a lower bound for any implementation (the eager reference moves much more).

Each op's function (ddpm_fast.traffic.<op>) is declared beside the op, in its ddpm_fast.ops family module
(register(traffic=...)); the helpers are ddpm_fast.ops._registry's. Conventions (shared by every function):
- ``shape`` is the shape of x0 / x_t, [B, C, ...]; a learned variance (var_type "learned" or
  "learned_range") doubles model_output's channels (dim 1). ``dtype`` is the inputs' dtype.
- Elementwise outputs are written in ``dtype``; per-sample [B] results in float32 (float64 for
  float64 inputs), as in ddpm_fast.reference.
- Every op that takes t reads t (int64, 8 bytes per sample) and one row of the schedule's packed
  table per sample (len(COLUMNS) float32 values; float64 for float64 inputs).
- An input the result does not depend on is not counted (e.g. x0 for the epsilon-target MSE loss).
- Backward (training_losses(..., backward=True)) is counted as a separate pass after the forward:
  it reads the [B] output gradients and, again, every input of the forward, and writes the
  gradient of model_output (the only input that needs one).
- Dynamic thresholding needs a per-sample quantile of |x0| before any output can be written:
  it adds one more read of the inputs that x0 is predicted from.
- A step given ``noise`` reads it; one drawing its own noise (seed / generator) does not.

All results are Traffic(read, written) in bytes; ``.total`` is their sum.
"""
from __future__ import annotations

from .ops import REGISTRY
from .ops._registry import Traffic, copy  # noqa: F401

__all__ = ["Traffic", "copy", *(name for name, spec in REGISTRY.items() if spec.traffic is not None)]


def __getattr__(name: str):
    """ddpm_fast.traffic.<op>: the op's traffic model, declared beside it in its ddpm_fast.ops family module."""
    spec = REGISTRY.get(name)
    if spec is None or spec.traffic is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return spec.traffic
