"""Functional sampler steps -- DPM-Solver(++), Euler, Euler ancestral and UniPC, each one fused op call.

Every step is argument checks, the choice of one coefficient row of its SolverTable
(ddpm_fast.solvers.tables: ``fused_rows``, built once per set of timesteps) and one call of
ddpm_fast.ops.solver_update (its arguments checked here once: ops.solvers.solver_update_checked, which on
CPU tensors calls the compiled op straight away), whose reference (ddpm_fast.reference.solver_update) is the
one formula of every sampler: no host sync, no host-to-device copy once the table is on the device (a host
step index maps to a cached row_index tensor; a per-sample index computes it with a few int ops on the
device).

Shapes and dtypes: model_output and sample [B, ...] (model_output [2B, ...] with guidance_scale: the
unconditional half first, as diffusers' pipelines concatenate it); fp16 / bf16 / fp32 compute in float32,
float64 in float64; results in sample's dtype. step_index: a Python int (every sample at that step) or
an int64 tensor [B] (each sample at its own step). steps_done: the steps each sample has taken since its
loop began (int or int64 [B]; default step_index, a loop begun at step 0): a multistep method uses
order min(max_order[step_index], steps_done + 1) (its warm-up).

history: the device-resident ring buffer of the converted model outputs, [solver_order, B, ...] in the
compute dtype (``new_history``): the output of step j sits in slot j % solver_order. A step writes its
slot in place (the op's m_out). With a host step index the op reads and writes the slots themselves;
with a per-sample index [B] each sample's slots differ, so the step gathers them
(history[slot, arange(B)], one copy per entry read) before the op and scatters its output back after it
(index_put_): that path is not one kernel. UniPC also keeps last_sample [B, ...] (the corrected sample the predictor
started from), updated in place by the op.

Per-sample reductions run before the op and enter it as [B] factors: classifier-free guidance's
guidance_rescale (cfg_factor: r std(cond) / std(guided) + 1 - r, diffusers' rescale_noise_cfg) and
dynamic thresholding (thresh: the p-quantile of |x0| clamped to [1, sample_max_value], from a first
op call that only computes x0). Noise the step needs and is not given is drawn inside the same op call
(solver_update's draw_noise: in-kernel Philox on the fused backends, from seed or generator, the stream of
p_sample_step; the reference backend draws from torch.Generator(seed) / generator): no separate pass.

The rows (tables.py's FUSED_COLUMNS): DPM-Solver m = conv_sample x + conv_model out (x0, or epsilon for
dpmsolver / sde-dpmsolver), x_prev = c_sample x + c_m0 m + c_h1 m[i-1] + c_h2 m[i-2] + c_noise noise;
Euler with churn gamma: x <- x + s_noise sqrt(sigma_hat^2 - sigma^2) noise, x_prev = x + (x - x0) /
sigma_hat (sigma_next - sigma_hat); Euler ancestral likewise to sigma_down plus sigma_up noise; UniPC the
UniC corrector then the UniP predictor.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import ops
from ..ops import _checks as check
from ..ops.solvers import solver_update_checked
from ..reference import compute_dtype, per_sample
from .tables import FUSED, FUSED_COLUMNS, SolverTable

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


def _check_number(name, value):
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")


def _check_thresholding(dynamic_threshold, sample_max_value, table):
    """The dynamic-thresholding arguments; thresholding acts on the converted output as an x0, so a
    predict_x0=False table (epsilon) takes none."""
    for name, value in (("dynamic_threshold", dynamic_threshold), ("sample_max_value", sample_max_value)):
        if value is not None:
            _check_number(name, value)
    if dynamic_threshold is not None and not 0.0 < dynamic_threshold <= 1.0:
        raise ValueError(f"dynamic_threshold: expected a value in (0, 1], got {dynamic_threshold}")
    if not sample_max_value >= 1.0:
        raise ValueError(f"sample_max_value: expected a value >= 1, got {sample_max_value}")
    if dynamic_threshold is not None and not table.predict_x0:
        raise ValueError("dynamic_threshold: thresholds the x0 prediction; this table predicts epsilon "
                         "(predict_x0=False)")


_GUIDANCE_ROWS: dict = {}  # (device, dtype) -> the one row [1, 14] whose x_prev is the guided output


def _guidance_row(device, dtype) -> torch.Tensor:
    rows = _GUIDANCE_ROWS.get((device, dtype))
    if rows is None:
        row = np.zeros((1, len(FUSED_COLUMNS)))
        row[0, FUSED["conv_model"]] = row[0, FUSED["p_m0"]] = 1.0  # m = g, x_prev = m
        rows = _GUIDANCE_ROWS[(device, dtype)] = torch.as_tensor(row, dtype=dtype).to(device)
    return rows


def _guide(uncond, cond, guidance_scale, cfg_factor=None):
    """(uncond + guidance_scale (cond - uncond)) (* cfg_factor) by the fused op: (in uncond's dtype, in its
    compute dtype)."""
    dtype = compute_dtype(uncond.dtype)
    rows = _guidance_row(uncond.device, dtype)
    guided = torch.empty(uncond.shape, dtype=dtype, device=uncond.device)
    out = ops.solver_update(uncond, uncond, rows, torch.zeros(uncond.shape[0], dtype=torch.int64, device=uncond.device),
                            guided, model_cond=cond, guidance_scale=guidance_scale, cfg_factor=cfg_factor,
                            validate=False)
    return out, guided


def _rescale_factor(uncond, cond, guidance_scale, guidance_rescale):
    """diffusers' rescale_noise_cfg as one factor per sample [B] (compute dtype): r std(cond) / std(guided) + 1 - r,
    std over every non-batch dim (unbiased)."""
    _, guided = _guide(uncond, cond, guidance_scale)
    ratio = per_sample(cond.to(guided.dtype)).std(dim=1) / per_sample(guided).std(dim=1)
    return (guidance_rescale * ratio + (1.0 - guidance_rescale)).contiguous()


def _split_guidance(model_output, guidance_scale, guidance_rescale):
    """(uncond, cond, cfg_factor or None) of a [2B, ...] model output."""
    _check_number("guidance_scale", guidance_scale)
    _check_number("guidance_rescale", guidance_rescale)
    if model_output.shape[0] % 2:
        raise ValueError(f"model_output: classifier-free guidance needs [2B, ...] (unconditional half first), "
                         f"got batch {model_output.shape[0]}")
    uncond, cond = model_output.chunk(2)
    factor = _rescale_factor(uncond, cond, guidance_scale, guidance_rescale) if guidance_rescale else None
    return uncond, cond, factor


class _Guided:
    """A step's model output as solver_update takes it: uncond (the model output, its unconditional half with
    guidance), cond, scale (guidance_scale), cfg_factor; in sample's dtype or the compute dtype ``dtype``.
    ``checked`` builds it from a step's arguments; the drop-in schedulers, which check their own, may build it
    directly."""

    def __init__(self, uncond, dtype, cond=None, scale=1.0, cfg_factor=None):
        self.uncond, self.dtype, self.cond, self.scale, self.cfg_factor = uncond, dtype, cond, scale, cfg_factor

    @classmethod
    def checked(cls, model_output, sample, guidance_scale, guidance_rescale):
        _check_tensor("model_output", model_output)
        _check_tensor("sample", sample)
        dtype = compute_dtype(sample.dtype)
        cond = cfg_factor = None
        scale = 1.0
        if guidance_scale is not None:
            uncond, cond, cfg_factor = _split_guidance(model_output, guidance_scale, guidance_rescale)
            scale = float(guidance_scale)
        else:
            uncond = model_output
        if uncond.shape != sample.shape:
            what = "[2B, ...] of" if guidance_scale is not None else ""
            raise ValueError(f"model_output: expected the shape {what}sample {tuple(sample.shape)}, got "
                             f"{tuple(model_output.shape)}")
        if uncond.dtype != sample.dtype and uncond.dtype != dtype:
            uncond = uncond.to(dtype)
            cond = None if cond is None else cond.to(dtype)
        if uncond.device != sample.device:
            raise ValueError(f"model_output: expected a tensor on {sample.device} (like sample), got {uncond.device}")
        return cls(uncond, dtype, cond, scale, cfg_factor)

    def update(self, sample, rows, row_index, m_out, **kwargs):
        """ops.solver_update of this output (the steps' arguments checked: no host read of row_index; on the
        CPU the compiled op without a second Python check: solver_update_checked)."""
        return solver_update_checked(sample, self.uncond, rows, row_index, m_out, model_cond=self.cond,
                                     guidance_scale=self.scale, cfg_factor=self.cfg_factor, **kwargs)

    def thresh(self, sample, rows, row_index, noise, dynamic_threshold, sample_max_value):
        """Dynamic thresholding's per-sample scale [B] (compute dtype), or None: the p-quantile of |x0| clamped
        to [1, sample_max_value], x0 from an op call that writes only it (no history, no last_sample)."""
        if dynamic_threshold is None:
            return None
        x0 = torch.empty_like(sample, dtype=self.dtype, memory_format=torch.contiguous_format)
        self.update(sample, rows, row_index, x0, noise=noise)
        scale = torch.quantile(per_sample(x0.abs()), dynamic_threshold, dim=1)
        return scale.clamp(min=1.0, max=sample_max_value).contiguous()


def cfg_combine(model_output: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance: uncond + guidance_scale (cond - uncond), optionally rescaled (diffusers'
    rescale_noise_cfg with guidance_rescale), as one fused op (ddpm_fast.ops.solver_update's guidance).

    model_output: [2B, ...] (unconditional half first); returns [B, ...] in model_output's dtype (math in
    float32, float64 for float64).

    >>> out = torch.cat([torch.zeros(1, 2), torch.ones(1, 2)])
    >>> cfg_combine(out, 7.5)
    tensor([[7.5000, 7.5000]])
    """
    _check_tensor("model_output", model_output)
    uncond, cond, factor = _split_guidance(model_output, guidance_scale, guidance_rescale)
    return _guide(uncond, cond, guidance_scale, factor)[0]


def new_history(table: SolverTable, sample: torch.Tensor) -> torch.Tensor:
    """A zeroed history ring buffer for table's sampler: [table.solver_order, B, ...] in sample's compute
    dtype, on sample's device (zeros: a warm-up coefficient of 0 times a zero stays 0)."""
    _check_tensor("sample", sample)
    return sample.new_zeros((max(table.solver_order, 1), *sample.shape), dtype=compute_dtype(sample.dtype))


class _Index:
    """A step's fused row and history slots, for a host int step index or a device int64 tensor [B]."""

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
                lo, hi = check.int_range(step_index)
                if lo is not None and (lo < 0 or hi >= n):
                    raise ValueError(f"step_index: expected values in [0, {n})")
                lo, _ = check.int_range(steps_done)
                if lo is not None and lo < 0:
                    raise ValueError("steps_done: expected values >= 0")
            self.batch_range = torch.arange(batch, device=device)
        self.step_index, self.steps_done, self.table = step_index, steps_done, table
        self.batch, self.device, self.dtype = batch, device, dtype
        self.history = history

    def order(self, offset=0):
        """min(max_order[i + offset], steps_done + 1 + offset) -- the predictor's (offset 0) or the previous
        step's order (offset -1, the UniC corrector's); a host int or a device tensor [B]."""
        if self.host:
            return min(int(self.table.max_order[max(self.step_index + offset, 0)]), self.steps_done + 1 + offset)
        max_order = self.table.on(self.device, self.dtype)["max_order"][(self.step_index + offset).clamp_min(0)]
        return torch.minimum(max_order, self.steps_done + 1 + offset)

    def rows(self, churn=None):
        return self.table.fused(self.device, self.dtype, churn)

    def row_index(self, order=1, corrector_order=0):
        """The fused row of each sample: a cached int64 [B] (host index) or computed on the device."""
        row = self.table.row_of(self.step_index, order, corrector_order)
        return self.table.row_index(row, self.batch, self.device) if self.host else row

    def slots(self, count):
        """(h1, ..., h_count: the outputs of steps i-1, ..., i-count; m_out: where this step's goes): the
        history's slots (host index) or per-sample gathers of them and a fresh m_out (tensor index; store
        scatters it back)."""
        size, i = self.history.shape[0], self.step_index
        if self.host:
            views = _slot_views(self.history)
            return tuple(views[(i - back) % size] for back in range(1, count + 1)), views[i % size]
        gathered = tuple(self.history[torch.remainder(i - back, size), self.batch_range]
                         for back in range(1, count + 1))
        return gathered, torch.empty_like(gathered[0] if gathered else self.history[0])

    def store(self, m_out):
        if not self.host:
            self.history.index_put_((torch.remainder(self.step_index, self.history.shape[0]), self.batch_range), m_out)


def _slot_views(history):
    """history.unbind(0), made once per history tensor (kept on it) and remade if its storage moved."""
    views = getattr(history, "_ddpm_fast_slots", None)
    if views is None or views[0].data_ptr() != history.data_ptr() or len(views) != history.shape[0]:
        views = history.unbind(0)
        history._ddpm_fast_slots = views
    return views


def _check_history(history, table, sample, dtype):
    size = max(table.solver_order, 1)
    if not isinstance(history, torch.Tensor):
        raise TypeError(f"history: expected a tensor [{size}, B, ...] (see new_history), got {type(history).__name__}")
    if history.shape != (size, *sample.shape) or history.dtype != dtype or history.device != sample.device:
        raise ValueError(f"history: expected a {dtype} tensor {(size, *sample.shape)} on {sample.device} (see "
                         f"new_history), got {history.dtype} {tuple(history.shape)} on {history.device}")


def _noise(noise, generator, seed, sample, dtype):
    """solver_update's noise keywords for a step that adds noise: {"noise": the given standard normal in
    sample's dtype or the compute dtype ``dtype``}, else a draw inside the op (draw_noise, from seed, else
    generator; seed checked by the step)."""
    if noise is None:
        check.generator(generator, sample.device)
        return {"draw_noise": True, "generator": generator, "seed": seed}
    if not isinstance(noise, torch.Tensor) or noise.shape != sample.shape:
        raise ValueError(f"noise: expected a tensor of sample's shape {tuple(sample.shape)}")
    if noise.device != sample.device or (noise.dtype != sample.dtype and noise.dtype != dtype):
        noise = noise.to(device=sample.device, dtype=dtype)
    return {"noise": noise}


_PARAGRAPHS = {  # the Args paragraphs every step shares (``_document``)
    "inputs": ("model_output: the model's prediction [B, ...] of the table's prediction_type ([2B, ...], the\n"
               "    unconditional half first, with guidance_scale); any float dtype.\n"
               "sample: x at this step [B, ...], fp16 / bf16 / fp32 / fp64.\n"
               "step_index: int (every sample at that step) or int64 tensor [B] (each sample at its own), in\n"
               "    [0, table.num_steps).\n"
               "table: the SolverTable of this sampler (tables.py), built once per set of timesteps."),
    "guidance": ("guidance_scale: None, or the classifier-free guidance scale s: uncond + s (cond - uncond).\n"
                 "guidance_rescale: diffusers' rescale_noise_cfg factor (0: none); with guidance_scale only."),
    "validate": "validate: range-check a step_index tensor on the host (a sync on a GPU; None: CPU tensors only).",
    "generator": ("generator: used when noise and seed are None: a torch.Generator on sample's device (default:\n"
                  "    torch's global generator); the fused backends take one Philox seed from it per step, the\n"
                  "    reference backend its standard normal.\n"
                  "seed: an int in [0, 2**63): draw the noise from this seed; fused backends generate it\n"
                  "    in-kernel (Philox-4x32-10, the stream of p_sample_step), the reference backend from\n"
                  "    torch.Generator(seed); a seed gives the same noise on every call. Takes precedence over\n"
                  "    generator."),
}


def _document(function):
    """Replace each docstring line ``<name>`` by the shared Args paragraph ``name`` (_PARAGRAPHS)."""
    lines = []
    for line in function.__doc__.split("\n"):
        key = line.strip()[1:-1]
        if line.strip().startswith("<") and key in _PARAGRAPHS:
            indent = line[: len(line) - len(line.lstrip())]
            line = "\n".join(indent + text for text in _PARAGRAPHS[key].split("\n"))
        lines.append(line)
    function.__doc__ = "\n".join(lines)
    return function


# -- DPM-Solver ---------------------------------------------------------------------------------------
@_document
def dpm_solver_step(model_output, sample, step_index, table: SolverTable, history, *, steps_done=None,
                    noise=None, generator=None, seed=None, guidance_scale=None, guidance_rescale=0.0,
                    dynamic_threshold=None, sample_max_value=1.0, validate=None):
    """One DPM-Solver multistep step (orders 1-3, midpoint / heun, ODE or SDE): the table's algorithm_type,
    dpmsolver++ / sde-dpmsolver++ (data prediction) or dpmsolver / sde-dpmsolver (noise prediction, orders
    1-2 for the SDE; table.predict_x0 False).

    Args:
        <inputs>
        history: the ring buffer [solver_order, B, ...] (new_history); this step's converted output (the x0
            prediction, epsilon for a predict_x0=False table) is written into slot step_index % solver_order,
            in place.
        steps_done: steps since the loop began (int or int64 [B]; default step_index): the warm-up order.
        noise: the SDE variants' standard normal [B, ...], or None (default) to draw it inside the step's
            fused op from seed or generator. The ODE variants ignore noise, generator and seed.
        <generator>
        <guidance>
        dynamic_threshold: None, or the quantile p in (0, 1] of Imagen's dynamic thresholding of the x0
            prediction (predict_x0 tables only; diffusers' thresholding / dynamic_thresholding_ratio):
            s = the per-sample p-quantile of |x0| clamped to [1, sample_max_value], x0 = clamp(x0, -s, s) / s
            (a per-sample reduction).
        sample_max_value: the largest s (>= 1).
        <validate>

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
    check.seed(seed)
    _check_thresholding(dynamic_threshold, sample_max_value, table)
    out = _Guided.checked(model_output, sample, guidance_scale, guidance_rescale)
    _check_history(history, table, sample, out.dtype)
    idx = _Index(step_index, steps_done, table, sample, out.dtype, validate, history)
    rows, row_index = idx.rows(), idx.row_index(idx.order())
    noise_args = _noise(noise, generator, seed, sample, out.dtype) if table.sde else {}
    thresh = out.thresh(sample, rows, row_index, None, dynamic_threshold, sample_max_value)
    previous, m_out = idx.slots(table.solver_order - 1)
    x_prev = out.update(sample, rows, row_index, m_out, thresh=thresh, history=previous, **noise_args)
    idx.store(m_out)
    return x_prev


# -- Euler --------------------------------------------------------------------------------------------
def euler_churns(table: SolverTable, step_index, s_churn, s_tmin, s_tmax) -> bool:
    """Whether an Euler step at the host step_index adds churn noise (gamma > 0), decided on the host
    table; for step_index None (a per-sample tensor) whether any sample may (s_churn > 0)."""
    if min(s_churn / (table.num_sigmas - 1), 2 ** 0.5 - 1) <= 0:
        return False
    return step_index is None or s_tmin <= float(table.coef[step_index, 0, 0]) <= s_tmax


def _euler_update(out: _Guided, sample, step_index, table: SolverTable, noise=None, churn=None, **draw):
    """(x_prev, x0_pred) of an Euler step (churn: its (s_churn, s_tmin, s_tmax, s_noise) as floats, or None) or
    an Euler ancestral step at step_index (a host int, or an int64 tensor [B] on sample's device) with its
    noise (or None; draw: solver_update's draw_noise / generator / seed, to draw it in the op): the step's one
    solver_update call. The callers (the two steps below, the drop-in schedulers of
    ddpm_fast.compat.diffusers_solvers) have checked the arguments."""
    device = sample.device
    if isinstance(step_index, torch.Tensor):
        rows, row_index = table.fused(device, out.dtype, churn), table.row_of(step_index)
    else:
        rows, row_index = table.host_rows(device, out.dtype, sample.shape[0], churn)[step_index]
    x0 = torch.empty_like(sample, dtype=out.dtype, memory_format=torch.contiguous_format)
    return out.update(sample, rows, row_index, x0, noise=noise, **draw), x0


@_document
def euler_step(model_output, sample, step_index, table: SolverTable, *, s_churn=0.0, s_tmin=0.0,
               s_tmax=float("inf"), s_noise=1.0, noise=None, generator=None, seed=None, guidance_scale=None,
               guidance_rescale=0.0, validate=None):
    """One Euler step, with Karras et al.'s churn.

    Args:
        <inputs>
        s_churn, s_tmin, s_tmax, s_noise: the churn: gamma = min(s_churn / N, sqrt(2) - 1) where
            s_tmin <= sigma <= s_tmax (N = table.num_sigmas - 1), noise scaled by s_noise.
        noise: the churn's standard normal [B, ...], used only where gamma > 0, or None (default) to draw it
            inside the step's fused op from seed or generator (with a host step_index only when gamma > 0
            there; with a tensor [B] whenever s_churn > 0, each sample's draw times its churn coefficient).
        <generator>
        <guidance>
        <validate>

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
    check.seed(seed)
    for name, value in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_tmax", s_tmax), ("s_noise", s_noise)):
        _check_number(name, value)
    out = _Guided.checked(model_output, sample, guidance_scale, guidance_rescale)
    idx = _Index(step_index, None, table, sample, out.dtype, validate)
    churns = euler_churns(table, idx.step_index if idx.host else None, s_churn, s_tmin, s_tmax)
    noise_args = _noise(noise, generator, seed, sample, out.dtype) if churns else {}
    churn = (float(s_churn), float(s_tmin), float(s_tmax), float(s_noise)) if s_churn > 0 else None
    return _euler_update(out, sample, idx.step_index, table, churn=churn, **noise_args)


@_document
def euler_ancestral_step(model_output, sample, step_index, table: SolverTable, *, noise=None, generator=None,
                         seed=None, guidance_scale=None, guidance_rescale=0.0, validate=None):
    """One Euler ancestral step: Euler to sigma_down, then sigma_up times a standard normal.

    Args:
        <inputs>
        noise: the standard normal [B, ...] (the step adds sigma_up times it), or None (default) to draw it
            inside the step's fused op from seed or generator.
        <generator>
        <guidance>
        <validate>

    Returns:
        (x_prev, x0_pred) as euler_step's.

    Example:
        >>> from ddpm_fast.solvers import euler_ancestral_table
        >>> table = euler_ancestral_table(torch.tensor([14.6, 4.0, 1.0, 0.2, 0.0]))
        >>> x, x0 = euler_ancestral_step(torch.zeros(2, 3), torch.ones(2, 3), 0, table, generator=torch.Generator())
        >>> x.dtype, x0.shape
        (torch.float32, torch.Size([2, 3]))
    """
    _check_table(table, "euler_ancestral")
    check.seed(seed)
    out = _Guided.checked(model_output, sample, guidance_scale, guidance_rescale)
    idx = _Index(step_index, None, table, sample, out.dtype, validate)
    return _euler_update(out, sample, idx.step_index, table, **_noise(noise, generator, seed, sample, out.dtype))


# -- UniPC --------------------------------------------------------------------------------------------
@_document
def unipc_step(model_output, sample, step_index, table: SolverTable, history, last_sample, *, steps_done=None,
               guidance_scale=None, guidance_rescale=0.0, dynamic_threshold=None, sample_max_value=1.0,
               validate=None):
    """One UniPC step: the UniC corrector of sample (skipped at a loop's first step and where the table
    disables it), then the UniP predictor.

    Args:
        <inputs>
        history: the ring buffer [solver_order, B, ...] (new_history); this step's converted output is
            written into slot step_index % solver_order, in place.
        last_sample: [B, ...] in the compute dtype (zeros before the first step): the corrected sample the
            previous predictor started from; this step's corrected sample is written into it, in place.
        steps_done: steps since the loop began (int or int64 [B]; default step_index): the warm-up order
            and, at 0, no correction.
        <guidance>
        dynamic_threshold: None, or the quantile p in (0, 1] of Imagen's dynamic thresholding of the x0
            prediction (predict_x0 tables only; diffusers' thresholding / dynamic_thresholding_ratio):
            s = the per-sample p-quantile of |x0| clamped to [1, sample_max_value], x0 = clamp(x0, -s, s) / s
            (a per-sample reduction).
        sample_max_value: the largest s (>= 1).
        <validate>

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
    _check_thresholding(dynamic_threshold, sample_max_value, table)
    out = _Guided.checked(model_output, sample, guidance_scale, guidance_rescale)
    _check_history(history, table, sample, out.dtype)
    if (not isinstance(last_sample, torch.Tensor) or last_sample.shape != sample.shape
            or last_sample.dtype != out.dtype or last_sample.device != sample.device):
        raise ValueError(f"last_sample: expected a {out.dtype} tensor {tuple(sample.shape)} on {sample.device}")
    idx = _Index(step_index, steps_done, table, sample, out.dtype, validate, history)
    # UniC: order 0 (the identity) at the first step, else the previous step's predictor order
    if idx.host:
        corrector_order = 0 if idx.steps_done == 0 or idx.step_index == 0 else idx.order(-1)
    else:
        corrector_order = torch.where((idx.steps_done == 0) | (idx.step_index == 0), 0, idx.order(-1))
    rows, row_index = idx.rows(), idx.row_index(idx.order(), corrector_order)
    thresh = out.thresh(sample, rows, row_index, None, dynamic_threshold, sample_max_value)
    previous, m_out = idx.slots(table.solver_order)
    x_prev = out.update(sample, rows, row_index, m_out, thresh=thresh, history=previous, last_sample=last_sample)
    idx.store(m_out)
    return x_prev
