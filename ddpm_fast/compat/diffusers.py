"""Fused drop-in schedulers for diffusers: FastDDPMScheduler, FastDDIMScheduler.

    from ddpm_fast.compat.diffusers import FastDDPMScheduler as DDPMScheduler
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)   # or DDPMScheduler(**config)

Subclasses of diffusers' DDPMScheduler / DDIMScheduler with the same config and methods.
``add_noise``, ``get_velocity`` and ``step`` give the parent's results (for every beta schedule,
prediction type, variance type, clip_sample / clip_sample_range and thresholding setting, given
the same variance noise: the same ``generator`` draws the same noise) but:

- run through ddpm_fast's fused ops, with no host sync (no ``.item()``, no ``nonzero``);
- read the schedule from a float32 device table whatever the sample dtype (the parent casts
  alphas_cumprod to the sample dtype: in bfloat16 its add_noise returns x_0 unchanged at small t);
- ``step`` also takes a per-sample timestep tensor [B] (each sample at its own step).

diffusers' timestep conventions are kept: DDPM steps to the next entry of ``self.timesteps``
(t - 1 before ``set_timesteps``); DDIM steps to t - T // num_inference_steps, with
``final_alpha_cumprod`` (``set_alpha_to_one``) below 0. ``set_timesteps`` builds the respaced
table once on the host (at the first step after it; rebuilt if ``self.timesteps`` is reassigned).

A drop-in class never raises where its parent does not: where a configuration, schedule, timestep or
input is outside what the fused ops express, the call runs the parent's own code (same result, parent
speed), logged once per reason at debug level. docs/compatibility.md lists, for every parent method and
option, whether it is fused, partly fused, the parent's path, or differs (and why). In short:
- parent's path: DDPM ``variance_type="fixed_large_log"``; betas outside (0, 1] (diffusers runs them);
  an epsilon model at a step where alphas_cumprod = 0 (zero terminal SNR); ``thresholding`` with
  ``sample_max_value < 1``; DDIM ``eta < 0``; a DDIM step that is not one step of one respaced process
  (``set_alpha_to_one=False`` with a last step at t = 0); DDIM ``eta > 1`` on a step composed of several
  ops (below: the parent's direction term is then nan); a timestep not in ``self.timesteps`` or out of
  range; model_output / sample of different dtypes; add_noise timesteps that are neither one per sample
  nor one for all. Per-sample timestep tensors (our extension) raise ValueError on such calls.
- partly fused (several fused ops, plus at most a clamp / thresholding and a swap of x0 on the device
  table; still no sync): DDIM with clipping or thresholding and use_clipped_model_output=False
  (diffusers' default) or clip_sample_range != 1; DDPM with clip_sample_range != 1; a DDPM last step
  whose t > 0 (its variance: reference's model log variance on the parent's last-step table). Every
  update formula is an op's: this module writes none of its own.
- an unknown ``variance_type`` is the parent's fall-through, fixed_small; "learned" (the variance itself)
  is passed to the op as its log.
Differences: a per-sample or CUDA timestep tensor draws the DDPM variance noise even at t = 0 (the
parent draws none there; the result is the same, the generator advances once more); elementwise
math is float32 for 16-bit inputs (more accurate than the parent's 16-bit arithmetic).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

try:
    from diffusers import DDIMScheduler, DDPMScheduler
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as exc:  # pragma: no cover - exercised only without diffusers
    raise ImportError(
        "ddpm_fast.compat.diffusers needs the optional 'diffusers' package: pip install 'ddpm-fast[diffusers]'"
    ) from exc

from .. import ops, reference
from ..options import LEARNED_VAR_TYPES
from ..schedule import COLUMN, NoiseSchedule, betas_problem
from .diffusers_solvers import (FastDPMSolverMultistepScheduler, FastEulerAncestralDiscreteScheduler,
                                FastEulerDiscreteScheduler, FastUniPCMultistepScheduler, _output, _say_once)

__all__ = ["FastDDPMScheduler", "FastDDIMScheduler", "FastDPMSolverMultistepScheduler", "FastEulerDiscreteScheduler",
           "FastEulerAncestralDiscreteScheduler", "FastUniPCMultistepScheduler"]

_log = logging.getLogger(__name__)

_MEAN_TYPE = {"epsilon": "epsilon", "sample": "x0", "v_prediction": "v"}
_LOG_1E20 = math.log(1e-20)  # the parent's floor on the posterior variance, as a log


class _Plan:
    """A respaced schedule and the map original timestep -> its row (-1: the parent's step runs there)."""

    def __init__(self, schedule: NoiseSchedule, rows: np.ndarray, final_t: int, all_ok: bool):
        self.schedule = schedule
        self.rows = rows  # int64 [T]: row in schedule of each timestep the fused step reproduces, else -1
        self.final_t = final_t  # original timestep of row 0
        self.all_ok = all_ok  # every step of the scheduler's loop is fused (per-sample tensors allowed)
        self.source = None  # the self.timesteps tensor the plan was built from
        self._rows_dev: dict = {}
        self._row_tensors: dict = {}

    def rows_on(self, device):
        r = self._rows_dev.get(device)
        if r is None:
            r = self._rows_dev[device] = torch.as_tensor(self.rows).to(device)
        return r

    def row_tensor(self, row: int, batch: int, device) -> torch.Tensor:
        """int64 [batch] filled with row on device, cached (a host timestep's rows: no allocation, no copy per
        step). The ops only read it."""
        key = (row, batch, device)
        r = self._row_tensors.get(key)
        if r is None:
            if len(self._row_tensors) >= 4096:
                self._row_tensors.clear()
            r = self._row_tensors[key] = torch.full((batch,), row, dtype=torch.int64, device=device)
        return r

    def last_step(self) -> "_ParentLastStep":
        step = self.__dict__.get("_last_step")
        if step is None:
            step = self._last_step = _ParentLastStep(self.schedule)
        return step


class _ParentLastStep:
    """The schedule table diffusers' DDPM variance reads at a last step whose t > 0 (abar_prev = 1): the plan's
    float32 table with the posterior log variance at log(1e-20) (the parent's floor on its zero variance) and
    fixed_large's log variance at log(beta). Stands in for a NoiseSchedule in reference._model_log_variance."""

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule
        self._tables: dict = {}

    def table(self, device, dtype=torch.float32):
        key = (torch.device(device), dtype)
        tab = self._tables.get(key)
        if tab is None:
            tab = self.schedule.table(device).clone()
            tab[:, COLUMN["posterior_log_variance_clipped"]] = _LOG_1E20
            tab[:, COLUMN["fixed_large_log_variance"]] = tab[:, COLUMN["log_betas"]]
            tab = self._tables[key] = tab.to(dtype)
        return tab


def _fusable_steps(steps, base: NoiseSchedule, mean_type):
    """(steps the fused ops can take, whether that is all of them). Left to the parent: timesteps past
    the betas (trained_betas shorter than num_train_timesteps) and, for an epsilon model, steps with
    alphas_cumprod = 0 (zero terminal SNR: x_0 = (x_t - eps) / 0, where the parent returns inf / nan,
    or a clipped value)."""
    T = base.num_timesteps
    abar = base.alphas_cumprod.numpy()
    good = [t for t in steps if 0 <= t < T and not (mean_type == "epsilon" and abar[t] == 0.0)]
    return good, len(good) == len(steps)


_UNSET = object()
_INT_DTYPES = frozenset((torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
                         torch.uint64))


def _outside(t: torch.Tensor, T: int) -> bool:
    """Whether a CPU integer tensor holds a value outside [0, T): one host read (a list for small tensors,
    cheaper than two reductions and two .item() calls)."""
    if t.numel() <= 64:
        values = t.tolist() if t.ndim else [t.item()]
        return bool(values) and (min(values) < 0 or max(values) >= T)
    lo, hi = torch.aminmax(t)
    return int(lo) < 0 or int(hi) >= T


def _host_timestep(timestep):
    """The timestep as a Python int where it is one on the host (an int, a numpy integer, a one-element integer
    CPU tensor), else None (a device tensor, several timesteps, or something the parent takes)."""
    if type(timestep) is int or isinstance(timestep, np.integer):
        return int(timestep)
    if (isinstance(timestep, torch.Tensor) and timestep.is_cpu and timestep.numel() == 1
            and not (timestep.is_floating_point() or timestep.is_complex() or timestep.dtype == torch.bool)):
        return int(timestep)
    return None


class _FastMixin:
    """Shared by both schedulers: the float64 base schedule, the fused add_noise / get_velocity."""

    backend = "auto"  # the ddpm_fast backend of every op
    validate = None  # check per-sample timesteps on the host (None: for CPU tensors only, where it is free)

    def _base_schedule(self):
        """The parent's own float32 betas (its schedule, rescaling included) as float64 tables; None when
        a NoiseSchedule cannot hold them (a beta outside (0, 1]: diffusers runs those, so the parent does)."""
        base = self.__dict__.get("_ddpm_fast_base", _UNSET)
        if base is _UNSET:
            betas = self.betas.detach().cpu().double()
            problem = betas_problem(betas.numpy()) if betas.ndim == 1 and betas.numel() else "betas: empty"
            base = None if problem else NoiseSchedule(betas)
            self.__dict__["_ddpm_fast_base"] = base
            if problem:
                self._say(problem)
        return base

    def _say(self, reason):
        """Log once per scheduler and reason, at debug level, that the parent's code runs."""
        _say_once(self, reason, _log)

    def _plan(self) -> _Plan:
        plan = self.__dict__.get("_ddpm_fast_plan")
        # Rebuilt when self.timesteps is another tensor (a pipeline may assign a slice of it): the parent
        # reads self.timesteps at every step. An identity check, no host read.
        if plan is None or plan.source is not self.timesteps:
            plan = self.__dict__["_ddpm_fast_plan"] = self._make_plan()
            plan.source = self.timesteps
        return plan

    def set_timesteps(self, *args, **kwargs):
        out = super().set_timesteps(*args, **kwargs)
        self.__dict__.pop("_ddpm_fast_plan", None)
        return out

    def _noising_timesteps(self, timesteps, batch, device, T):
        """timesteps as the fused q_sample takes them (an int, or an int64 tensor [B] or 0-dim), or None
        where the parent must run: diffusers flattens the tensor and broadcasts it against the batch, so a
        one-element tensor means every sample; values outside [0, T) (checked on the host where that is
        free) and other shapes are the parent's."""
        if isinstance(timesteps, (int, np.integer)) and not isinstance(timesteps, bool):
            t = int(timesteps)
            return t if 0 <= t < T else None
        if not isinstance(timesteps, torch.Tensor):
            try:
                timesteps = torch.as_tensor(timesteps)
            except (TypeError, ValueError, RuntimeError):
                return None
        if timesteps.dtype not in _INT_DTYPES:
            return None
        n = timesteps.numel()
        if timesteps.ndim == 1 and n == batch:
            t = timesteps
        elif n == 1:
            t = timesteps.reshape(())
        elif n == batch:
            t = timesteps.reshape(batch)
        else:
            return None
        if self.validate or (self.validate is None and t.is_cpu):  # a host read: free on the CPU
            if _outside(t if t.is_cpu else t.cpu(), T):
                return None
            if t.ndim == 0 and t.is_cpu:
                return int(t)
        return t if t.device == device else t.to(device)

    def _noising(self, x, noise, timesteps, velocity):
        base = self.__dict__.get("_ddpm_fast_base", _UNSET)
        if base is _UNSET:
            base = self._base_schedule()
        t = why = None
        if base is None:
            why = "betas outside (0, 1]"
        elif not (isinstance(x, torch.Tensor) and isinstance(noise, torch.Tensor) and x.is_floating_point()
                  and noise.is_floating_point() and x.ndim >= 1 and noise.shape == x.shape):
            why = "inputs that are not two float tensors of one shape"
        else:
            t = self._noising_timesteps(timesteps, x.shape[0], x.device, base.num_timesteps)
            if t is None:
                why = "timesteps are not integers in range, one per sample or one for all"
        if why is not None:
            self._say(why)
            parent = super().get_velocity if velocity else super().add_noise
            return parent(x, noise, timesteps)
        if x.dtype != noise.dtype:
            dtype = torch.promote_types(x.dtype, noise.dtype)  # the parent's result dtype
            x, noise = x.to(dtype), noise.to(dtype)
        if velocity:
            # v = sqrt(abar) noise - sqrt(1 - abar) sample: the v-parametrisation's x0 formula,
            # x0 = sqrt(abar) x_t - sqrt(1 - abar) v, with x_t := noise and v := sample (one fused op)
            return ops.predict_xstart(x, noise, t, base, mean_type="v", backend=self.backend, validate=False)
        return ops.q_sample(x, t, noise, base, backend=self.backend, validate=False)

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise; float32 table whatever the dtype.

        original_samples, noise: [B, ...]; timesteps: int tensor [B], [1] or 0-dim (original timesteps)."""
        return self._noising(original_samples, noise, timesteps, False)

    def get_velocity(self, sample, noise, timesteps):
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) sample."""
        return self._noising(sample, noise, timesteps, True)

    # -- step helpers --------------------------------------------------------------------------------
    def _rows(self, plan, timestep, batch, device):
        """(row tensor [B], draw-noise flag or None if unknown), or (None, None) where the parent must run.

        A one-element tensor is one timestep for every sample (the parent's reading); an integer tensor
        [B] is our extension (each sample at its own step). Anything else is the parent's to take."""
        T = plan.rows.shape[0]
        if isinstance(timestep, torch.Tensor):
            if timestep.is_floating_point() or timestep.is_complex() or timestep.dtype == torch.bool:
                return None, None
            if timestep.numel() == 1:
                # a host value is free to read
                timestep = int(timestep) if timestep.is_cpu else timestep.reshape(())
        if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
            t = int(timestep)
            if not 0 <= t < T or plan.rows[t] < 0:
                return None, None
            return plan.row_tensor(int(plan.rows[t]), batch, device), t > 0
        if not isinstance(timestep, torch.Tensor):
            return None, None
        if timestep.ndim == 0 and not plan.all_ok:
            return None, None  # a scalar on the device in a partly fused config: the parent's step
        t = timestep.to(device=device, dtype=torch.int64)
        if t.ndim == 0:
            t = t.expand(batch)
        elif t.shape != (batch,):
            return None, None  # the parent's (it raises for a tensor of several timesteps)
        if not plan.all_ok:
            raise ValueError(
                "timestep: this scheduler's configuration cannot run every step as one fused per-sample step "
                "(see docs/compatibility.md); pass one timestep for the batch"
            )
        if self.validate or (self.validate is None and device.type == "cpu"):
            if _outside(t.cpu(), T):
                raise ValueError(f"timestep: expected values in [0, {T})")
            rows = plan.rows_on(device)[t]
            if (rows < 0).any():
                raise ValueError(f"timestep: every value must be one of self.timesteps, got {t.tolist()}")
            return rows, None
        return plan.rows_on(device)[t.clamp(0, T - 1)], None

    @staticmethod
    def _per_sample(timestep):
        """The parent cannot take several timesteps: say so in one ValueError instead of its obscure one."""
        if isinstance(timestep, torch.Tensor) and timestep.numel() > 1:
            raise ValueError(
                "timestep: per-sample timesteps (one per sample) run only on the fused path, and this call "
                "takes diffusers' own code (see docs/compatibility.md); pass one timestep for the batch"
            )

    def _inputs_why(self, model_output, sample):
        """Why the parent must run for these tensors, or None."""
        if not (isinstance(model_output, torch.Tensor) and isinstance(sample, torch.Tensor)):
            return "inputs that are not tensors"
        if not sample.is_floating_point() or model_output.dtype != sample.dtype or sample.ndim < 2:
            return "model_output and sample of different dtypes (the parent promotes), or not float [B, C, ...]"
        config = self.config
        if config.thresholding and not (config.sample_max_value >= 1 and 0 < config.dynamic_thresholding_ratio <= 1):
            return "thresholding with sample_max_value < 1 or a ratio outside (0, 1]"
        return None

    @staticmethod
    def _noise(shape, generator, device, dtype, like):
        z = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return z if z.dtype == like.dtype else z.to(like.dtype)


class FastDDPMScheduler(_FastMixin, DDPMScheduler):
    """diffusers' DDPMScheduler with a fused, sync-free ``step`` / ``add_noise`` / ``get_velocity``.

    See the module docstring for the exact equivalence and the configs that run the parent's step.
    """

    def _make_plan(self) -> _Plan:
        base = self._base_schedule()
        T = base.num_timesteps
        mean_type = _MEAN_TYPE.get(self.config.prediction_type)
        if self.custom_timesteps or self.num_inference_steps:
            steps = sorted(set(int(v) for v in self.timesteps.cpu().tolist()))  # once, at set-up
        else:
            steps = list(range(T))
        keep, all_ok = _fusable_steps(steps, base, mean_type)
        rows = np.full(T, -1, dtype=np.int64)
        if not keep:
            return _Plan(base, rows, 0, False)
        rows[keep] = np.arange(len(keep))
        if keep == list(range(T)):
            return _Plan(base, rows, 0, all_ok)
        return _Plan(base.respace(keep), rows, keep[0], all_ok)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """x_t -> x_{t_prev}. model_output: [B, C, ...] (or [B, 2C, ...] for learned variances);
        timestep: int, 0-dim tensor or per-sample int tensor [B]; sample: [B, C, ...]."""
        var = self.variance_type  # what the parent's step reads (its _get_variance reads the config)
        mean_type = _MEAN_TYPE.get(self.config.prediction_type)
        thresholding = bool(self.config.thresholding)
        why = self._inputs_why(model_output, sample)
        if why is None:
            learned = var in LEARNED_VAR_TYPES
            if self._base_schedule() is None:
                why = "betas outside (0, 1]"
            elif var != self.config.variance_type or var == "fixed_large_log":
                why = "variance_type 'fixed_large_log' (the parent takes sqrt(log beta)) or changed after set-up"
            elif mean_type is None:
                why = "an unknown prediction_type"
            elif model_output.shape != ((sample.shape[0], 2 * sample.shape[1], *sample.shape[2:]) if learned
                                        else sample.shape):
                why = "a model_output without the variance half (or of another shape)"
        rows = None
        if why is None:
            plan = self._plan()
            B, C = sample.shape[0], sample.shape[1]
            rows, draw = self._rows(plan, timestep, B, sample.device)
            if rows is None:
                why = "a timestep the fused step does not take (see docs/compatibility.md)"
        if why is not None:
            self._say(why)
            self._per_sample(timestep)
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        var_part = model_output[:, C:] if learned else None
        if var == "learned":
            # diffusers' "learned" output is the variance itself; the op's is its log.
            model_output = torch.cat([model_output[:, :C], torch.log(var_part)], dim=1)
        # fixed_small_log: the parent's std is exp(0.5 log var), i.e. fixed_small's; an unknown variance_type
        # falls through every branch of the parent's _get_variance: fixed_small too.
        op_var = var if var in ("fixed_large", "learned", "learned_range") else "fixed_small"
        r = float(self.config.clip_sample_range)
        clip_in_op = bool(self.config.clip_sample) and not thresholding and r == 1.0
        noise = None
        if draw is not False:
            noise = self._noise(sample.shape, generator, model_output.device, model_output.dtype, sample)
        shape = (-1, *([1] * (sample.ndim - 1)))
        if self.config.clip_sample and not thresholding and r != 1.0:
            # Clipping to [-r, r] (the op clips to [-1, 1]): the fused x0 prediction, clip, then the fused
            # ancestral step of an "x0" model whose output is the clipped x0 (its posterior mean, the noise).
            mean_half = model_output[:, :C] if learned else model_output
            pred = ops.predict_xstart(mean_half, sample, rows, plan.schedule, mean_type=mean_type,
                                      backend=self.backend, validate=False).clamp(-r, r)
            x0_output = torch.cat([pred, model_output[:, C:]], dim=1) if learned else pred
            prev = ops.p_sample_step(x0_output, sample, rows, plan.schedule, mean_type="x0", var_type=op_var,
                                     clip_denoised=False, noise=noise, seed=0 if noise is None else None,
                                     backend=self.backend, validate=False)["sample"]
        else:
            out = ops.p_sample_step(
                model_output, sample, rows, plan.schedule, mean_type=mean_type, var_type=op_var,
                clip_denoised=clip_in_op,
                dynamic_threshold=self.config.dynamic_thresholding_ratio if thresholding else None,
                sample_max_value=float(self.config.sample_max_value), noise=noise,
                seed=0 if noise is None else None, backend=self.backend, validate=False,
            )
            prev, pred = out["sample"], out["pred_xstart"]
        if plan.final_t > 0 and noise is not None:
            # The parent still adds noise at its last step when that step's t > 0 (abar_prev = 1, so
            # the posterior variance is 0, floored at 1e-20); the respaced row 0 adds none. Its log variance:
            # reference's model log variance on the parent's last-step table (_ParentLastStep).
            last = (rows == 0).reshape(shape)
            var_in = None if var_part is None else (torch.log(var_part.float()) if var == "learned"
                                                    else var_part.float())
            log_var = reference._model_log_variance(var_in, rows, plan.last_step(), op_var, prev.float())
            extra = torch.where(last, torch.exp(0.5 * log_var) * noise.float(), 0.0)
            prev = (prev.float() + extra).to(sample.dtype)
        if not return_dict:
            return (prev, pred)
        return _output(DDPMSchedulerOutput, prev, pred)


class FastDDIMScheduler(_FastMixin, DDIMScheduler):
    """diffusers' DDIMScheduler with a fused, sync-free ``step`` / ``add_noise`` / ``get_velocity``.

    See the module docstring for the exact equivalence and the configs that run the parent's step.
    """

    def _make_plan(self) -> _Plan:
        base = self._base_schedule()
        T = base.num_timesteps
        ratio = self.config.num_train_timesteps // self.num_inference_steps  # the parent's step size
        steps = sorted(set(int(v) for v in self.timesteps.cpu().tolist()))  # once, at set-up
        ts, all_ok = _fusable_steps(steps, base, _MEAN_TYPE.get(self.config.prediction_type))
        one = bool(self.config.set_alpha_to_one)
        keep = set(ts)
        for t in ts:
            if t - ratio >= 0:
                keep.add(t - ratio)
            elif not one:
                keep.add(0)  # final_alpha_cumprod = alphas_cumprod[0]: step down to row of t = 0
        keep = sorted(keep)
        rows = np.full(T, -1, dtype=np.int64)
        rows[keep] = np.arange(len(keep))
        rows_steps = np.full(T, -1, dtype=np.int64)
        for t in ts:
            i = rows[t]
            pred = keep[i - 1] if i > 0 else None  # the step the fused op goes to
            if t - ratio >= 0:
                ok = pred == t - ratio
            elif one:
                ok = pred is None
            else:
                ok = t > 0 and pred == 0
            if ok:
                rows_steps[t] = i
            all_ok = all_ok and ok
        if not keep:
            return _Plan(base, rows_steps, 0, False)
        plan = _Plan(base.respace(keep), rows_steps, keep[0], all_ok)
        # Steps where diffusers' default clipping (clipped x0, the model's eps) runs as one fused step plus
        # a swap of x0 (see step): the swap cancels sqrt(abar_prev) x0 against itself, a rounding of size
        # sqrt(abar_prev / abar) |x_t - sqrt(1 - abar) eps|; kept where that ratio is <= 2 (all but the last
        # steps of schedules whose abar collapses, e.g. cosine at t = T - 1).
        ab, abp = plan.schedule.alphas_cumprod.numpy(), plan.schedule.alphas_cumprod_prev.numpy()
        swap = np.zeros(T, dtype=bool)
        good = rows_steps >= 0
        swap[good] = abp[rows_steps[good]] <= 4.0 * ab[rows_steps[good]]
        if self.config.prediction_type == "sample":  # x0 is the model's output itself: no large x0 to cancel
            swap[good] = True
        plan.swap = swap
        plan.sqrt_abar_prev32 = plan.schedule.table("cpu")[:, COLUMN["sqrt_alphas_cumprod_prev"]].numpy()
        plan.swap_all = bool(swap[good].all()) if good.any() else False
        return plan

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True):
        """One DDIM step. model_output, sample: [B, C, ...]; timestep: int, 0-dim or per-sample tensor [B]."""
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        config = self.config
        mean_type = _MEAN_TYPE.get(config.prediction_type)
        thresholding = bool(config.thresholding)
        args = (model_output, timestep, sample, eta, use_clipped_model_output, generator, variance_noise, return_dict)
        why = self._inputs_why(model_output, sample)
        if why is None:
            try:
                eta_f = float(eta)
            except (TypeError, ValueError, RuntimeError):
                eta_f = float("nan")
            if self._base_schedule() is None:
                why = "betas outside (0, 1]"
            elif mean_type is None:
                why = "an unknown prediction_type"
            elif model_output.shape != sample.shape:
                why = "a model_output of another shape than sample"
            elif not eta_f >= 0:
                why = "eta < 0 (the parent adds no noise and shrinks the direction term)"
            elif eta_f > 0 and variance_noise is not None and (
                    not isinstance(variance_noise, torch.Tensor) or variance_noise.shape != sample.shape
                    or variance_noise.dtype != sample.dtype):
                why = "a variance_noise of another shape or dtype than sample"
        rows = None
        r = float(config.clip_sample_range)
        clipping = thresholding or bool(config.clip_sample)
        if why is None:
            plan = self._plan()
            t_host = _host_timestep(timestep)
            rows, _ = self._rows(plan, timestep if t_host is None else t_host, sample.shape[0], sample.device)
            if rows is None:
                why = "a timestep the fused step does not take (see docs/compatibility.md)"
            elif not clipping or (use_clipped_model_output and (thresholding or r == 1.0)):
                path = "fused"
            elif not use_clipped_model_output and self._swap_ok(plan, t_host):
                path = "swap"
            elif eta_f > 1:
                why = "eta > 1 off the fused step (the parent's direction term is the square root of a negative)"
            else:
                path = "composed"
        if why is not None:
            self._say(why)
            self._per_sample(timestep)
            return super().step(*args)
        eta = eta_f
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError(
                    "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                    " `variance_noise` stays `None`."
                )
            noise = variance_noise
            if noise is None:
                noise = self._noise(model_output.shape, generator, model_output.device, model_output.dtype, sample)
        if path == "fused":
            out = ops.ddim_step(
                model_output, sample, rows, plan.schedule, eta=float(eta), mean_type=mean_type,
                clip_denoised=clipping and not thresholding,
                dynamic_threshold=config.dynamic_thresholding_ratio if thresholding else None,
                sample_max_value=float(config.sample_max_value), noise=noise, backend=self.backend,
                validate=False,
            )
            prev, pred = out["sample"], out["pred_xstart"]
        elif path == "swap":
            # diffusers' default: x0 clipped (or thresholded) but the model's own eps in the direction term.
            # ops.ddim_step re-derives eps from the clipped x0 when it clips, so: one fused unclipped step
            # (the parent's update with the unclipped x0), then swap x0 for the clipped x0 in its first term:
            # prev = prev_unclipped + sqrt(abar_prev) (x0_clipped - x0). Three elementwise ops, no sync.
            out = ops.ddim_step(model_output, sample, rows, plan.schedule, eta=float(eta), mean_type=mean_type,
                                clip_denoised=False, noise=noise, backend=self.backend, validate=False)
            raw = out["pred_xstart"]
            pred = self._threshold_sample(raw) if thresholding else raw.clamp(-r, r)
            coef = self._swap_coef(plan, t_host, rows, sample)
            if sample.dtype == torch.float32:
                prev = torch.add(out["sample"], pred - raw, alpha=coef) if type(coef) is float else torch.addcmul(
                    out["sample"], coef, pred - raw)
            elif type(coef) is float:
                prev = torch.add(out["sample"].float(), pred.float() - raw.float(), alpha=coef).to(sample.dtype)
            else:
                prev = torch.addcmul(out["sample"].float(), coef.to(torch.promote_types(coef.dtype, sample.dtype)),
                                     pred.float() - raw.float()).to(sample.dtype)
        else:
            # use_clipped_model_output with clip_sample_range != 1, or a step where the swap above would lose
            # precision: composed of fused ops (a few calls; no sync).
            prev, pred = self._ddim_composed(model_output, sample, rows, plan, mean_type, float(eta), noise,
                                             use_clipped_model_output, thresholding, r)
        if not return_dict:
            return (prev, pred)
        return _output(DDIMSchedulerOutput, prev, pred)

    @staticmethod
    def _swap_coef(plan, t_host, rows, sample):
        """sqrt(abar_prev) of the step, from the float32 device table: a Python float (its float32 value) for a
        host timestep t_host, else a [B, 1, ...] tensor gathered at rows."""
        if t_host is not None and sample.dtype != torch.float64:
            return float(plan.sqrt_abar_prev32[plan.rows[t_host]])
        coef = plan.schedule.table(sample.device)[rows, COLUMN["sqrt_alphas_cumprod_prev"]]
        return coef.reshape(-1, *([1] * (sample.ndim - 1)))

    @staticmethod
    def _swap_ok(plan, t_host):
        """Whether the clip swap is precise at this step (every step of the plan for a timestep on the device)."""
        return bool(plan.swap[t_host]) if t_host is not None else plan.swap_all

    def _ddim_composed(self, model_output, sample, rows, plan, mean_type, eta, noise, use_clipped, thresholding, r):
        """(prev, pred) of a DDIM step whose x0 is clipped to [-r, r] (or thresholded) outside the op, from ops
        alone: ops.ddim_step of an "x0" model whose output is the clipped x0 re-derives eps from it as
        (x_t - sqrt(abar) x0) / sqrt(1 - abar). With use_clipped that is the parent's eps; else the parent's
        eps is the model's own, eps_model, so x_t is replaced by q_sample(x0, eps_model), from which the op
        re-derives eps_model. Computed in float32 (16-bit inputs: rounded once, at the end)."""
        bk = {"backend": self.backend, "validate": False}
        raw = ops.predict_xstart(model_output, sample, rows, plan.schedule, mean_type=mean_type, **bk)
        pred = self._threshold_sample(raw) if thresholding else raw.clamp(-r, r)
        x, x0 = sample.float(), pred.float()
        if not use_clipped:
            if mean_type == "epsilon":
                eps_model = model_output.float()
            else:  # v (an x0 model takes the swap: see _make_plan): eps = sqrt(abar) v + sqrt(1 - abar) x_t
                eps_model = ops.q_sample(model_output.float(), rows, x, plan.schedule, **bk)
            x = ops.q_sample(x0, rows, eps_model, plan.schedule, **bk)
        prev = ops.ddim_step(x0, x, rows, plan.schedule, eta=eta, clip_denoised=False, mean_type="x0",
                             noise=None if noise is None else noise.float(), **bk)["sample"]
        return prev.to(sample.dtype), pred
