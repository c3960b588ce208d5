"""Bytes each op must move: the compulsory memory traffic of one call, given shapes and dtypes.

A fused kernel that reads every input it depends on once and writes every output once moves
exactly this many bytes; ``ddpm-fast bench`` divides it by the measured time to get GB/s. The
count is a lower bound for any implementation (the eager reference moves much more).

Conventions (shared by every function here):
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

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .reference import LEARNED_VAR_TYPES
from .schedule import COLUMNS

__all__ = [
    "Traffic",
    "copy",
    "q_sample",
    "q_posterior",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "predict_xstart",
    "p_mean_variance",
    "vb_terms_bpd",
    "prior_bpd",
    "training_losses",
    "p_sample_step",
    "ddim_step",
]


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


# -- helpers ----------------------------------------------------------------------------------
def _check(shape, dtype) -> tuple:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or any(s < 0 for s in shape):
        raise ValueError(f"shape: expected a batched shape [B, ...] of sizes >= 0, got {shape}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    return shape


def _n(shape) -> int:
    return math.prod(shape)


def _e(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _per_sample(dtype) -> int:
    """Bytes of one [B] result: float64 for float64 inputs, else float32."""
    return 8 if dtype == torch.float64 else 4


def _t_and_rows(shape, dtype) -> int:
    """t (int64) plus one packed-table row per sample."""
    return shape[0] * (8 + len(COLUMNS) * _per_sample(dtype))


def _mo_factor(var_type: str) -> int:
    return 2 if var_type in LEARNED_VAR_TYPES else 1


# -- ops --------------------------------------------------------------------------------------
def copy(nbytes: int) -> Traffic:
    """A device-to-device copy of ``nbytes``: read once, written once."""
    return Traffic(int(nbytes), int(nbytes))


def q_sample(shape, dtype) -> Traffic:
    """Reads x0 and noise, writes x_t."""
    shape = _check(shape, dtype)
    n, e = _n(shape), _e(dtype)
    return Traffic(2 * n * e + _t_and_rows(shape, dtype), n * e)


def q_posterior(shape, dtype) -> Traffic:
    """Reads x0 and x_t; writes the mean and the [B, 1, ...] variance and log variance."""
    shape = _check(shape, dtype)
    n, e, b = _n(shape), _e(dtype), shape[0]
    return Traffic(2 * n * e + _t_and_rows(shape, dtype), n * e + 2 * b * e)


def normal_kl(shapes: Sequence, dtype) -> Traffic:
    """Reads mean1, logvar1, mean2, logvar2 (``shapes``: their four shapes); writes the broadcast KL."""
    if len(shapes) != 4:
        raise ValueError(f"shapes: expected the four argument shapes, got {len(shapes)}")
    shapes = [tuple(int(s) for s in sh) for sh in shapes]
    _check(shapes[0] or (1,), dtype)
    e = _e(dtype)
    return Traffic(sum(_n(sh) for sh in shapes) * e, _n(torch.broadcast_shapes(*shapes)) * e)


def discretized_gaussian_log_likelihood(shape, dtype, *, log_scales_shape=None) -> Traffic:
    """Reads x, means and log_scales (x's shape unless given); writes the log-likelihood."""
    shape = _check(shape, dtype)
    n, e = _n(shape), _e(dtype)
    scales = n if log_scales_shape is None else _n(tuple(log_scales_shape))
    return Traffic((2 * n + scales) * e, n * e)


def _xstart_inputs(shape, dtype, mean_type) -> int:
    """Bytes read to predict x0: the model's mean half, plus x_t unless the model predicts x0."""
    n, e = _n(shape), _e(dtype)
    return n * e if mean_type == "x0" else 2 * n * e


def predict_xstart(shape, dtype, *, mean_type) -> Traffic:
    """Reads the model's mean half (and x_t unless mean_type is x0); writes x0."""
    shape = _check(shape, dtype)
    return Traffic(_xstart_inputs(shape, dtype, mean_type) + _t_and_rows(shape, dtype), _n(shape) * _e(dtype))


def p_mean_variance(shape, dtype, *, mean_type, var_type, dynamic_threshold=None) -> Traffic:
    """Reads model_output and x_t; writes mean, pred_xstart and the variance and log variance
    ([B, 1, ...] for fixed types, [B, C, ...] for learned ones)."""
    shape = _check(shape, dtype)
    n, e, b = _n(shape), _e(dtype), shape[0]
    read = (_mo_factor(var_type) + 1) * n * e + _t_and_rows(shape, dtype)
    if dynamic_threshold is not None:
        read += _xstart_inputs(shape, dtype, mean_type)
    var = n if var_type in LEARNED_VAR_TYPES else b
    return Traffic(read, 2 * n * e + 2 * var * e)


def vb_terms_bpd(shape, dtype, *, var_type) -> Traffic:
    """Reads model_output, x0 and x_t; writes one [B] result."""
    shape = _check(shape, dtype)
    n, e = _n(shape), _e(dtype)
    read = (_mo_factor(var_type) + 2) * n * e + _t_and_rows(shape, dtype)
    return Traffic(read, shape[0] * _per_sample(dtype))


def prior_bpd(shape, dtype) -> Traffic:
    """Reads x0 (and the table's last row); writes one [B] result."""
    shape = _check(shape, dtype)
    return Traffic(_n(shape) * _e(dtype), shape[0] * _per_sample(dtype))


def _loss_inputs(shape, dtype, mean_type, var_type, loss_type) -> int:
    """Bytes of the inputs a loss depends on (model_output, and x0 / noise as needed)."""
    n, e = _n(shape), _e(dtype)
    if loss_type in ("kl", "rescaled_kl") or var_type in LEARNED_VAR_TYPES:
        # The vb term needs the posterior at x_t = q_sample(x0, noise): the whole model_output, x0, noise.
        return (_mo_factor(var_type) + 2) * n * e
    target = {"epsilon": 1, "x0": 1, "v": 2, "x_prev": 2}[mean_type]  # noise; x0; both; both
    return (1 + target) * n * e


def training_losses(shape, dtype, *, mean_type, var_type, loss_type, backward=False) -> Traffic:
    """Forward: reads what the loss depends on, writes "loss" and "mse" / "vb" ([B] each).

    backward=True adds the backward pass: reads the [B] gradients and the inputs again, writes
    d loss / d model_output.
    """
    shape = _check(shape, dtype)
    n, e, b, ps = _n(shape), _e(dtype), shape[0], _per_sample(dtype)
    inputs = _loss_inputs(shape, dtype, mean_type, var_type, loss_type) + _t_and_rows(shape, dtype)
    kl = loss_type in ("kl", "rescaled_kl")
    outputs = 2 if kl else (3 if var_type in LEARNED_VAR_TYPES else 2)
    fwd = Traffic(inputs, outputs * b * ps)
    if not backward:
        return fwd
    return fwd + Traffic(inputs + outputs * b * ps, _mo_factor(var_type) * n * e)


def p_sample_step(shape, dtype, *, mean_type="epsilon", var_type, noise_given=False,
                  dynamic_threshold=None) -> Traffic:
    """Reads model_output, x_t (and noise if given); writes sample and pred_xstart."""
    shape = _check(shape, dtype)
    n, e = _n(shape), _e(dtype)
    read = (_mo_factor(var_type) + 1 + int(noise_given)) * n * e + _t_and_rows(shape, dtype)
    if dynamic_threshold is not None:
        read += _xstart_inputs(shape, dtype, mean_type)
    return Traffic(read, 2 * n * e)


def ddim_step(shape, dtype, *, mean_type="epsilon", eta=0.0, noise_given=False, dynamic_threshold=None) -> Traffic:
    """Reads the model's mean half and x_t (and noise if given and eta > 0); writes sample and
    pred_xstart. A variance half in model_output is not read."""
    shape = _check(shape, dtype)
    n, e = _n(shape), _e(dtype)
    read = 2 * n * e + int(noise_given and eta != 0.0) * n * e + _t_and_rows(shape, dtype)
    if dynamic_threshold is not None:
        read += _xstart_inputs(shape, dtype, mean_type)
    return Traffic(read, 2 * n * e)
