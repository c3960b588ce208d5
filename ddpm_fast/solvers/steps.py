"""Functional sampler steps -- the reference formulas of DPM-Solver++, Euler, Euler ancestral and UniPC.

Every step is elementwise math over (model_output, sample, the history, one row of a SolverTable from
ddpm_fast.solvers.tables): no host sync, no host-to-device copy once the table is on the device.

Shapes and dtypes: model_output and sample [B, ...] (model_output [2B, ...] with guidance_scale: the
unconditional half first, as diffusers' pipelines concatenate it); fp16 / bf16 / fp32 compute in float32,
float64 in float64; results in sample's dtype. step_index: a Python int (every sample at that step) or
an int64 tensor [B] (each sample at its own step). steps_done: the steps each sample has taken since its
loop began (int or int64 [B]; default step_index, a loop begun at step 0): a multistep method uses
order min(max_order[step_index], steps_done + 1) (its warm-up).

history: the device-resident ring buffer of the converted model outputs, [solver_order, B, ...] in the
compute dtype (``new_history``): the output of step j sits in slot j % solver_order. A step writes its
slot in place. UniPC also keeps last_sample [B, ...] (the corrected sample the predictor started from),
updated in place.

Formulas (table columns in tables.py):
- DPM-Solver++: x0 = conv_sample x + conv_model out (optionally dynamically thresholded: the one
  per-sample reduction, reference.py's); x_prev = c_sample x + c_m0 x0 + c_h1 x0[i-1] + c_h2 x0[i-2]
  + c_noise noise (noise: the SDE variant's, float32 standard normal). UniPC's m likewise.
- Euler: gamma = min(s_churn / N, sqrt(2) - 1) where s_tmin <= sigma <= s_tmax, else 0; sigma_hat =
  sigma (1 + gamma); x <- x + s_noise noise sqrt(sigma_hat^2 - sigma^2); x0 = x - sigma_hat eps
  (epsilon) | -sigma / sqrt(sigma^2 + 1) v + x / (sigma^2 + 1) (v) | out (sample);
  x_prev = x + (x - x0) / sigma_hat (sigma_next - sigma_hat).
- Euler ancestral: x0 as Euler's with gamma = 0; x_prev = x + (x - x0) / sigma (sigma_down - sigma)
  + sigma_up noise.
- UniPC: m = conv_sample x + conv_model out; x_c = c_this x + c_last last_sample + c_model m
  + c_h1 m[i-1] + c_h2 m[i-2] + c_h3 m[i-3] (UniC); x_prev = p_sample x_c + p_m0 m + p_h1 m[i-1]
  + p_h2 m[i-2] (UniP).
- Classifier-free guidance (``cfg_combine``): out = uncond + s (cond - uncond); with guidance_rescale
  r: out <- r out std(cond) / std(out) + (1 - r) out, std per sample over all other dims (unbiased).
"""
from __future__ import annotations

import numpy as np
import torch

from ..reference import _process_xstart, compute_dtype
from .tables import SolverTable

__all__ = ["cfg_combine", "new_history", "dpm_solver_step", "euler_churns", "euler_step", "euler_ancestral_step",
           "unipc_step"]


# -- helpers ------------------------------------------------------------------------------------------
def _check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{name}: expected a tensor [B, ...], got a 0-dim tensor")


def _check_table(table, kind):
    if not isinstance(table, SolverTable):
        raise TypeError(f"table: expected a SolverTable, got {type(table).__name__}")
    if table.kind != kind:
        raise ValueError(f"table: expected a {kind} table, got a {table.kind} table")


def _check_thresholding(dynamic_threshold, sample_max_value):
    for name, value in (("dynamic_threshold", dynamic_threshold), ("sample_max_value", sample_max_value)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if dynamic_threshold is not None and not 0.0 < dynamic_threshold <= 1.0:
        raise ValueError(f"dynamic_threshold: expected a value in (0, 1], got {dynamic_threshold}")
    if not sample_max_value >= 1.0:
        raise ValueError(f"sample_max_value: expected a value >= 1, got {sample_max_value}")


def _guided(model_output, sample, guidance_scale, guidance_rescale):
    """The model output the step uses, in the compute dtype: cfg-combined when guidance_scale is given."""
    _check_tensor("model_output", model_output)
    _check_tensor("sample", sample)
    dtype = compute_dtype(sample.dtype)
    if guidance_scale is not None:
        out = _cfg(model_output, guidance_scale, guidance_rescale, dtype)
    else:
        out = model_output.to(dtype)
    if out.shape != sample.shape:
        what = "[2B, ...] of" if guidance_scale is not None else ""
        raise ValueError(f"model_output: expected the shape {what}sample {tuple(sample.shape)}, got "
                         f"{tuple(model_output.shape)}")
    return out, dtype


def _cfg(model_output, guidance_scale, guidance_rescale, dtype):
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise TypeError(f"guidance_scale: expected a number, got {type(guidance_scale).__name__}")
    if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, (int, float)):
        raise TypeError(f"guidance_rescale: expected a number, got {type(guidance_rescale).__name__}")
    if model_output.shape[0] % 2:
        raise ValueError(f"model_output: classifier-free guidance needs [2B, ...] (unconditional half first), "
                         f"got batch {model_output.shape[0]}")
    uncond, cond = model_output.to(dtype).chunk(2)
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale:
        dims = list(range(1, guided.ndim))
        ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
        guided = guidance_rescale * (guided * ratio) + (1.0 - guidance_rescale) * guided
    return guided


def cfg_combine(model_output: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance: uncond + guidance_scale (cond - uncond), optionally rescaled (diffusers'
    rescale_noise_cfg with guidance_rescale).

    model_output: [2B, ...] (unconditional half first); returns [B, ...] in model_output's dtype (math in
    float32, float64 for float64).

    >>> out = torch.cat([torch.zeros(1, 2), torch.ones(1, 2)])
    >>> cfg_combine(out, 7.5)
    tensor([[7.5000, 7.5000]])
    """
    _check_tensor("model_output", model_output)
    return _cfg(model_output, guidance_scale, guidance_rescale, compute_dtype(model_output.dtype)).to(
        model_output.dtype)


def new_history(table: SolverTable, sample: torch.Tensor) -> torch.Tensor:
    """A zeroed history ring buffer for table's sampler: [table.solver_order, B, ...] in sample's compute
    dtype, on sample's device (zeros: a warm-up coefficient of 0 times a zero stays 0)."""
    _check_tensor("sample", sample)
    return sample.new_zeros((max(table.solver_order, 1), *sample.shape), dtype=compute_dtype(sample.dtype))


class _Index:
    """A step's table rows and history slots, for a host int step index or a device int64 tensor [B]."""

    def __init__(self, step_index, steps_done, table, sample, dtype, validate, history=None):
        n, batch, device = table.num_steps, sample.shape[0], sample.device
        self.host = not isinstance(step_index, torch.Tensor)
        if self.host:
            if isinstance(step_index, bool) or not isinstance(step_index, (int, np.integer)):
                raise TypeError(f"step_index: expected an int or an int64 tensor [B], got {type(step_index).__name__}")
            step_index = int(step_index)
            if not 0 <= step_index < n:
                raise ValueError(f"step_index: expected a value in [0, {n}), got {step_index}")
            if steps_done is None:
                steps_done = step_index
            if isinstance(steps_done, bool) or not isinstance(steps_done, (int, np.integer)):
                raise TypeError("steps_done: with an int step_index, expected an int")
            steps_done = int(steps_done)
            if steps_done < 0:
                raise ValueError(f"steps_done: expected a value >= 0, got {steps_done}")
        else:
            if step_index.dtype not in (torch.int64, torch.int32) or step_index.shape != (batch,):
                raise ValueError(f"step_index: expected an int64 tensor [B] = [{batch}], got {step_index.dtype} "
                                 f"{tuple(step_index.shape)}")
            step_index = step_index.to(device=device, dtype=torch.int64)
            if steps_done is None:
                steps_done = step_index
            elif isinstance(steps_done, torch.Tensor):
                if steps_done.shape not in ((batch,), ()):
                    raise ValueError(f"steps_done: expected an int64 tensor [B] = [{batch}], got "
                                     f"{tuple(steps_done.shape)}")
                steps_done = steps_done.to(device=device, dtype=torch.int64).expand(batch)
            else:
                steps_done = torch.full((batch,), int(steps_done), dtype=torch.int64, device=device)
            if validate or (validate is None and device.type == "cpu"):  # a host read: free on the CPU only
                if batch and (int(step_index.min()) < 0 or int(step_index.max()) >= n):
                    raise ValueError(f"step_index: expected values in [0, {n})")
                if batch and int(steps_done.min()) < 0:
                    raise ValueError("steps_done: expected values >= 0")
            self.batch_range = torch.arange(batch, device=device)
        self.step_index, self.steps_done, self.table = step_index, steps_done, table
        self.device_tables = table.on(device, dtype)  # cached: no copy after the first call
        self.history = history

    def order(self, offset=0):
        """min(max_order[i + offset], steps_done + 1 + offset) -- the predictor's (offset 0) or the previous
        step's order (offset -1, the UniC corrector's); a host int or a device tensor [B]."""
        if self.host:
            return min(int(self.table.max_order[max(self.step_index + offset, 0)]), self.steps_done + 1 + offset)
        max_order = self.device_tables["max_order"][(self.step_index + offset).clamp_min(0)]
        return torch.minimum(max_order, self.steps_done + 1 + offset)

    def columns(self, name, order, ndim):
        """The coefficients at (step_index, order -- 0-based in the table) as a tuple of tensors that
        broadcast against [B, ...] of ndim dims: 0-dim views made once per table (host index; no op per
        step) or [B, 1, ...] gathered per sample (tensor index)."""
        if self.host:
            return self.device_tables[name + "_columns"][self.step_index][order]
        rows = self.device_tables[name][self.step_index, order]  # [B, columns]
        return rows.t().reshape(rows.shape[1], rows.shape[0], *([1] * (ndim - 1))).unbind(0)

    def slot(self, back):
        """History slot of the output of step i - back: an int, or a device tensor [B]."""
        size = self.history.shape[0]
        if self.host:
            return (self.step_index - back) % size
        return torch.remainder(self.step_index - back, size)

    def read(self, back):
        s = self.slot(back)
        return self.history[s] if self.host else self.history[s, self.batch_range]

    def write(self, value):
        s = self.slot(0)
        if self.host:
            self.history[s].copy_(value)
        else:
            self.history.index_put_((s, self.batch_range), value)


def _check_history(history, table, sample, dtype):
    size = max(table.solver_order, 1)
    if not isinstance(history, torch.Tensor):
        raise TypeError(f"history: expected a tensor [{size}, B, ...] (see new_history), got {type(history).__name__}")
    if history.shape != (size, *sample.shape) or history.dtype != dtype or history.device != sample.device:
        raise ValueError(f"history: expected a {dtype} tensor {(size, *sample.shape)} on {sample.device} (see "
                         f"new_history), got {history.dtype} {tuple(history.shape)} on {history.device}")


def _noise(noise, generator, sample, dtype, name="noise"):
    if noise is None:
        return torch.randn(sample.shape, generator=generator, device=sample.device, dtype=dtype)
    if not isinstance(noise, torch.Tensor) or noise.shape != sample.shape:
        raise ValueError(f"{name}: expected a tensor of sample's shape {tuple(sample.shape)}")
    return noise.to(device=sample.device, dtype=dtype)


# -- DPM-Solver++ -------------------------------------------------------------------------------------
def dpm_solver_step(model_output, sample, step_index, table: SolverTable, history, *, steps_done=None,
                    noise=None, generator=None, guidance_scale=None, guidance_rescale=0.0, dynamic_threshold=None,
                    sample_max_value=1.0, validate=None):
    """One DPM-Solver++ multistep step (orders 1-3, midpoint / heun, ODE or SDE).

    Args:
        model_output: the model's prediction [B, ...] of the table's prediction_type ([2B, ...], the
            unconditional half first, with guidance_scale); any float dtype.
        sample: x at this step [B, ...], fp16 / bf16 / fp32 / fp64.
        step_index: int (every sample at that step) or int64 tensor [B] (each sample at its own), in
            [0, table.num_steps).
        table: the SolverTable of this sampler (tables.py), built once per set of timesteps.
        history: the ring buffer [solver_order, B, ...] (new_history); this step's x0 prediction is
            written into slot step_index % solver_order, in place.
        steps_done: steps since the loop began (int or int64 [B]; default step_index): the warm-up order.
        noise: the SDE variant's standard normal [B, ...]; None: drawn in float32 from generator on
            sample's device. The ODE variant ignores both.
        generator: a torch.Generator on sample's device, or None.
        guidance_scale: None, or the classifier-free guidance scale s: uncond + s (cond - uncond).
        guidance_rescale: diffusers' rescale_noise_cfg factor (0: none); with guidance_scale only.
        dynamic_threshold: None, or the quantile p in (0, 1] of Imagen's dynamic thresholding of the x0
            prediction (diffusers' thresholding / dynamic_thresholding_ratio): s = the per-sample p-quantile
            of |x0| clamped to [1, sample_max_value], x0 = clamp(x0, -s, s) / s (a per-sample reduction).
        sample_max_value: the largest s (>= 1).
        validate: range-check a step_index tensor on the host (a sync on a GPU; None: CPU tensors only).

    Returns:
        x_prev [B, ...] in sample's dtype.

    Example:
        >>> from ddpm_fast.solvers import dpm_solver_table
        >>> sigmas = torch.tensor([14.6, 4.0, 1.0, 0.2, 0.0])
        >>> table = dpm_solver_table(sigmas, solver_order=2)
        >>> x = torch.randn(2, 4, 8, 8)
        >>> history = new_history(table, x)
        >>> for i in range(table.num_steps):
        ...     x = dpm_solver_step(torch.tanh(x), x, i, table, history)
        >>> x.shape, history.shape
        (torch.Size([2, 4, 8, 8]), torch.Size([2, 2, 4, 8, 8]))
    """
    _check_table(table, "dpm_solver")
    _check_thresholding(dynamic_threshold, sample_max_value)
    out, dtype = _guided(model_output, sample, guidance_scale, guidance_rescale)
    _check_history(history, table, sample, dtype)
    idx = _Index(step_index, steps_done, table, sample, dtype, validate, history)
    order = idx.order()
    x = sample.to(dtype)
    conv_sample, conv_model, c_sample, c_m0, c_h1, c_h2, c_noise = idx.columns("coef", order - 1, x.ndim)
    x0 = torch.addcmul(conv_sample * x, conv_model, out)
    if dynamic_threshold is not None:
        x0 = _process_xstart(x0, False, dynamic_threshold, sample_max_value)
    idx.write(x0)
    x_prev = torch.addcmul(c_sample * x, c_m0, x0)
    for back, c_history in zip(range(1, table.solver_order), (c_h1, c_h2)):
        x_prev.addcmul_(c_history, idx.read(back))
    if table.sde:
        x_prev.addcmul_(c_noise, _noise(noise, generator, sample, dtype))
    return x_prev.to(sample.dtype)


# -- Euler --------------------------------------------------------------------------------------------
def _euler_x0(prediction_type, out, x, sigma, sigma_hat, input_scale):
    if prediction_type == "epsilon":
        return x - sigma_hat * out
    if prediction_type == "v_prediction":
        return out * (-sigma * input_scale) + x * (input_scale * input_scale)
    return out


def euler_churns(table: SolverTable, step_index, s_churn, s_tmin, s_tmax) -> bool:
    """Whether an Euler step at the host step_index adds churn noise (gamma > 0), decided on the host
    table; for step_index None (a per-sample tensor) whether any sample may (s_churn > 0)."""
    if min(s_churn / (table.num_sigmas - 1), 2 ** 0.5 - 1) <= 0:
        return False
    return step_index is None or s_tmin <= float(table.coef[step_index, 0, 0]) <= s_tmax


def euler_step(model_output, sample, step_index, table: SolverTable, *, s_churn=0.0, s_tmin=0.0,
               s_tmax=float("inf"), s_noise=1.0, noise=None, generator=None, guidance_scale=None,
               guidance_rescale=0.0, validate=None):
    """One Euler step, with Karras et al.'s churn.

    Args:
        model_output: the model's prediction [B, ...] of the table's prediction_type ([2B, ...], the
            unconditional half first, with guidance_scale); any float dtype.
        sample: x at this step [B, ...], fp16 / bf16 / fp32 / fp64.
        step_index: int (every sample at that step) or int64 tensor [B] (each sample at its own), in
            [0, table.num_steps).
        table: the SolverTable of this sampler (tables.py), built once per set of timesteps.
        s_churn, s_tmin, s_tmax, s_noise: the churn: gamma = min(s_churn / N, sqrt(2) - 1) where
            s_tmin <= sigma <= s_tmax (N = table.num_sigmas - 1), noise scaled by s_noise.
        noise: the churn's standard normal [B, ...], used only where gamma > 0; None: drawn from generator
            (with a host step_index only when gamma > 0 there; with a tensor [B] whenever s_churn > 0).
        generator: a torch.Generator on sample's device, or None.
        guidance_scale: None, or the classifier-free guidance scale s: uncond + s (cond - uncond).
        guidance_rescale: diffusers' rescale_noise_cfg factor (0: none); with guidance_scale only.
        validate: range-check a step_index tensor on the host (a sync on a GPU; None: CPU tensors only).

    Returns:
        (x_prev, x0_pred): [B, ...] each; x_prev in sample's dtype, x0_pred in the compute dtype.

    Example:
        >>> from ddpm_fast.solvers import euler_table
        >>> table = euler_table(torch.tensor([14.6, 4.0, 1.0, 0.2, 0.0]))
        >>> x = torch.randn(2, 4, 8, 8) * 14.6
        >>> for i in range(table.num_steps):
        ...     x_in = x * float(table.coef[i, 0, 2])  # scale_model_input: x / sqrt(sigma^2 + 1)
        ...     x, x0 = euler_step(torch.tanh(x_in), x, i, table)
        >>> x.shape
        torch.Size([2, 4, 8, 8])
    """
    _check_table(table, "euler")
    for name, value in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_tmax", s_tmax), ("s_noise", s_noise)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    out, dtype = _guided(model_output, sample, guidance_scale, guidance_rescale)
    idx = _Index(step_index, None, table, sample, dtype, validate)
    x = sample.to(dtype)
    sigma, sigma_next, input_scale = idx.columns("coef", 0, x.ndim)
    max_gamma = min(s_churn / (table.num_sigmas - 1), 2 ** 0.5 - 1)
    if euler_churns(table, step_index if idx.host else None, s_churn, s_tmin, s_tmax):
        gamma = torch.where((sigma >= s_tmin) & (sigma <= s_tmax), max_gamma, 0.0)
        sigma_hat = sigma * (gamma + 1.0)
        x = x + _noise(noise, generator, sample, dtype) * s_noise * (sigma_hat * sigma_hat - sigma * sigma).sqrt()
    else:
        sigma_hat = sigma
    x0 = _euler_x0(table.prediction_type, out, x, sigma, sigma_hat, input_scale)
    x_prev = x + (x - x0) / sigma_hat * (sigma_next - sigma_hat)
    return x_prev.to(sample.dtype), x0


def euler_ancestral_step(model_output, sample, step_index, table: SolverTable, *, noise=None, generator=None,
                         guidance_scale=None, guidance_rescale=0.0, validate=None):
    """One Euler ancestral step.

    Args:
        model_output: the model's prediction [B, ...] of the table's prediction_type ([2B, ...], the
            unconditional half first, with guidance_scale); any float dtype.
        sample: x at this step [B, ...], fp16 / bf16 / fp32 / fp64.
        step_index: int (every sample at that step) or int64 tensor [B] (each sample at its own), in
            [0, table.num_steps).
        table: the SolverTable of this sampler (tables.py), built once per set of timesteps.
        noise: standard normal [B, ...]; None: drawn from generator on sample's device.
        generator: a torch.Generator on sample's device, or None.
        guidance_scale: None, or the classifier-free guidance scale s: uncond + s (cond - uncond).
        guidance_rescale: diffusers' rescale_noise_cfg factor (0: none); with guidance_scale only.
        validate: range-check a step_index tensor on the host (a sync on a GPU; None: CPU tensors only).

    Returns:
        (x_prev, x0_pred): [B, ...] each; x_prev in sample's dtype, x0_pred in the compute dtype.

    Example:
        >>> from ddpm_fast.solvers import euler_ancestral_table
        >>> table = euler_ancestral_table(torch.tensor([14.6, 4.0, 1.0, 0.2, 0.0]))
        >>> x = torch.randn(2, 4, 8, 8) * 14.6
        >>> x, x0 = euler_ancestral_step(torch.tanh(x * 0.068), x, 0, table, generator=torch.Generator())
        >>> x.dtype
        torch.float32
    """
    _check_table(table, "euler_ancestral")
    out, dtype = _guided(model_output, sample, guidance_scale, guidance_rescale)
    idx = _Index(step_index, None, table, sample, dtype, validate)
    x = sample.to(dtype)
    sigma, sigma_up, sigma_down, input_scale, _ = idx.columns("coef", 0, x.ndim)
    x0 = _euler_x0(table.prediction_type, out, x, sigma, sigma, input_scale)
    x_prev = x + (x - x0) / sigma * (sigma_down - sigma) + _noise(noise, generator, sample, dtype) * sigma_up
    return x_prev.to(sample.dtype), x0


# -- UniPC --------------------------------------------------------------------------------------------
def unipc_step(model_output, sample, step_index, table: SolverTable, history, last_sample, *, steps_done=None,
               guidance_scale=None, guidance_rescale=0.0, dynamic_threshold=None, sample_max_value=1.0,
               validate=None):
    """One UniPC step: the UniC corrector of sample (skipped at a loop's first step and where the table
    disables it), then the UniP predictor.

    Args:
        model_output: the model's prediction [B, ...] of the table's prediction_type ([2B, ...], the
            unconditional half first, with guidance_scale); any float dtype.
        sample: x at this step [B, ...], fp16 / bf16 / fp32 / fp64.
        step_index: int (every sample at that step) or int64 tensor [B] (each sample at its own), in
            [0, table.num_steps).
        table: the SolverTable of this sampler (tables.py), built once per set of timesteps.
        history: the ring buffer [solver_order, B, ...] (new_history); this step's converted output is
            written into slot step_index % solver_order, in place.
        last_sample: [B, ...] in the compute dtype (zeros before the first step): the corrected sample the
            previous predictor started from; this step's corrected sample is written into it, in place.
        steps_done: steps since the loop began (int or int64 [B]; default step_index): the warm-up order
            and, at 0, no correction.
        guidance_scale: None, or the classifier-free guidance scale s: uncond + s (cond - uncond).
        guidance_rescale: diffusers' rescale_noise_cfg factor (0: none); with guidance_scale only.
        dynamic_threshold: None, or the quantile p in (0, 1] of Imagen's dynamic thresholding of the x0
            prediction (predict_x0 tables only; diffusers' thresholding / dynamic_thresholding_ratio):
            s = the per-sample p-quantile of |x0| clamped to [1, sample_max_value], x0 = clamp(x0, -s, s) / s
            (a per-sample reduction).
        sample_max_value: the largest s (>= 1).
        validate: range-check a step_index tensor on the host (a sync on a GPU; None: CPU tensors only).

    Returns:
        x_prev [B, ...] in sample's dtype.

    Example:
        >>> from ddpm_fast.solvers import unipc_table
        >>> table = unipc_table(torch.tensor([14.6, 4.0, 1.0, 0.2, 0.0]), solver_order=3)
        >>> x = torch.randn(2, 4, 8, 8)
        >>> history, last_sample = new_history(table, x), torch.zeros(2, 4, 8, 8)
        >>> for i in range(table.num_steps):
        ...     x = unipc_step(torch.tanh(x), x, i, table, history, last_sample)
        >>> x.shape
        torch.Size([2, 4, 8, 8])
    """
    _check_table(table, "unipc")
    _check_thresholding(dynamic_threshold, sample_max_value)
    if dynamic_threshold is not None and not table.predict_x0:
        raise ValueError("dynamic_threshold: thresholds the x0 prediction; this table predicts epsilon "
                         "(predict_x0=False)")
    out, dtype = _guided(model_output, sample, guidance_scale, guidance_rescale)
    _check_history(history, table, sample, dtype)
    if (not isinstance(last_sample, torch.Tensor) or last_sample.shape != sample.shape
            or last_sample.dtype != dtype or last_sample.device != sample.device):
        raise ValueError(f"last_sample: expected a {dtype} tensor {tuple(sample.shape)} on {sample.device}")
    idx = _Index(step_index, steps_done, table, sample, dtype, validate, history)
    x = sample.to(dtype)
    # UniC: order 0 (the identity) at the first step, else the previous step's predictor order
    if idx.host:
        corrector_order = 0 if idx.steps_done == 0 or idx.step_index == 0 else idx.order(-1)
    else:
        corrector_order = torch.where((idx.steps_done == 0) | (idx.step_index == 0), 0, idx.order(-1))
    c_this, c_last, c_model, *c_history = idx.columns("corrector", corrector_order, x.ndim)
    conv_sample, conv_model, p_sample, p_m0, *p_history = idx.columns("coef", idx.order() - 1, x.ndim)
    m = torch.addcmul(conv_sample * x, conv_model, out)
    if dynamic_threshold is not None:
        m = _process_xstart(m, False, dynamic_threshold, sample_max_value)
    corrected = torch.addcmul(c_this * x, c_last, last_sample).addcmul_(c_model, m)
    for back in range(1, table.solver_order + 1):
        corrected.addcmul_(c_history[back - 1], idx.read(back))
    x_prev = torch.addcmul(p_sample * corrected, p_m0, m)
    for back in range(1, table.solver_order):
        x_prev.addcmul_(p_history[back - 1], idx.read(back))
    idx.write(m)
    last_sample.copy_(corrected)
    return x_prev.to(sample.dtype)
