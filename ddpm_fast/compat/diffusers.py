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
table once on the host.

Where the fused ops cannot express the parent exactly, ``step`` calls the parent (same result,
parent speed):
- DDPM ``variance_type="fixed_large_log"`` (the parent takes sqrt(log beta): NaN for t > 0);
- a DDIM step t -> t - T // n that is not a step of one respaced process: with diffusers' spacings
  (whose steps are at least T // n apart) only ``set_alpha_to_one=False`` with a final step at t = 0
  (e.g. "leading" without steps_offset, "linspace"), where the parent steps from abar_0 to abar_0;
  per-sample timesteps then raise ValueError;
- ``thresholding`` with ``sample_max_value < 1``; a scalar timestep that is not in ``self.timesteps``
  (after ``set_timesteps``) or out of range.
Partly fused (ops plus a few elementwise torch ops on the device table; still no sync), because the
ops have no option for it yet: DDIM with clipping or thresholding and use_clipped_model_output=False
(diffusers' default: clipped x0 but the model's own eps) or clip_sample_range != 1; DDPM with
clip_sample_range != 1; a DDPM last step whose t > 0 (steps_offset, "trailing"), where the parent
still adds noise. DDPM variance_type="learned" (diffusers: the variance itself) is passed to the op
as its log.
Differences: a per-sample or CUDA timestep tensor draws the DDPM variance noise even at t = 0 (the
parent draws none there; the result is the same, the generator advances once more); elementwise
math is float32 for 16-bit inputs (more accurate than the parent's 16-bit arithmetic).
"""
from __future__ import annotations

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

from .. import ops
from ..schedule import COLUMN, NoiseSchedule

__all__ = ["FastDDPMScheduler", "FastDDIMScheduler"]

_MEAN_TYPE = {"epsilon": "epsilon", "sample": "x0", "v_prediction": "v"}
_LOG_1E20 = math.log(1e-20)  # the parent's floor on the posterior variance, as a log


class _Plan:
    """A respaced schedule and the map original timestep -> its row (-1: not a step)."""

    def __init__(self, schedule: NoiseSchedule, rows: np.ndarray, final_t: int, ok: np.ndarray):
        self.schedule = schedule
        self.rows = rows  # int64 [T]: row of each original timestep in schedule, -1 if none
        self.ok = ok  # bool [T]: the fused step reproduces the parent at this timestep
        self.final_t = final_t  # original timestep of row 0
        self.all_ok = bool(ok[rows >= 0].all()) if (rows >= 0).any() else True
        self._rows_dev: dict = {}

    def rows_on(self, device):
        r = self._rows_dev.get(device)
        if r is None:
            r = self._rows_dev[device] = torch.as_tensor(self.rows).to(device)
        return r


class _FastMixin:
    """Shared by both schedulers: the float64 base schedule, the fused add_noise / get_velocity."""

    backend = "auto"  # the ddpm_fast backend of every op
    validate = None  # check per-sample timesteps on the host (None: for CPU tensors only, where it is free)

    def _base_schedule(self) -> NoiseSchedule:
        base = self.__dict__.get("_ddpm_fast_base")
        if base is None:
            # The parent's own float32 betas (its schedule, rescaling included), tables in float64.
            base = NoiseSchedule(self.betas.detach().cpu().double())
            self.__dict__["_ddpm_fast_base"] = base
        return base

    def _plan(self) -> _Plan:
        plan = self.__dict__.get("_ddpm_fast_plan")
        if plan is None:
            plan = self.__dict__["_ddpm_fast_plan"] = self._make_plan()
        return plan

    def set_timesteps(self, *args, **kwargs):
        out = super().set_timesteps(*args, **kwargs)
        self.__dict__.pop("_ddpm_fast_plan", None)
        return out

    @staticmethod
    def _timesteps_arg(timesteps, device):
        if isinstance(timesteps, (int, np.integer)) and not isinstance(timesteps, bool):
            return int(timesteps)
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.as_tensor(timesteps)
        return timesteps.to(device)

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise; float32 table whatever the dtype.

        original_samples, noise: [B, ...]; timesteps: int tensor [B] (original timesteps)."""
        if noise.dtype != original_samples.dtype:
            noise = noise.to(original_samples.dtype)
        t = self._timesteps_arg(timesteps, original_samples.device)
        return ops.q_sample(original_samples, t, noise, self._base_schedule(), backend=self.backend,
                            validate=self.validate)

    def get_velocity(self, sample, noise, timesteps):
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) sample (q_sample of noise with -sample as its noise)."""
        if noise.dtype != sample.dtype:
            noise = noise.to(sample.dtype)
        t = self._timesteps_arg(timesteps, sample.device)
        return ops.q_sample(noise, t, -sample, self._base_schedule(), backend=self.backend, validate=self.validate)

    # -- step helpers --------------------------------------------------------------------------------
    def _rows(self, plan, timestep, batch, device):
        """(row tensor [B] or None if the parent must run, draw-noise flag or None if unknown)."""
        T = plan.rows.shape[0]
        if isinstance(timestep, torch.Tensor) and timestep.ndim == 0 and timestep.device.type == "cpu":
            timestep = int(timestep)  # a host value: free to read
        if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
            t = int(timestep)
            if not 0 <= t < T or plan.rows[t] < 0 or not plan.ok[t]:
                return None, None
            return torch.full((batch,), int(plan.rows[t]), dtype=torch.int64, device=device), t > 0
        if not isinstance(timestep, torch.Tensor) or timestep.is_floating_point():
            raise TypeError(f"timestep: expected an int or an integer tensor, got {timestep!r}")
        if timestep.ndim == 0 and not plan.all_ok:
            return None, None  # a scalar on the device in an inexpressible config: the parent's step
        t = timestep.to(device=device, dtype=torch.int64)
        if t.ndim == 0:
            t = t.expand(batch)
        elif t.shape != (batch,):
            raise ValueError(f"timestep: expected a scalar or shape ({batch},), got {tuple(t.shape)}")
        if not plan.all_ok:
            raise ValueError(
                "timestep: this scheduler's timestep spacing cannot be run as one fused per-sample step "
                "(see FastDDIMScheduler's docstring); pass a scalar timestep"
            )
        if self.validate or (self.validate is None and device.type == "cpu"):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= T):
                raise ValueError(f"timestep: expected values in [0, {T})")
            rows = plan.rows_on(device)[t]
            if (rows < 0).any():
                raise ValueError(f"timestep: every value must be one of self.timesteps, got {t.tolist()}")
            return rows, None
        return plan.rows_on(device)[t.clamp(0, T - 1)], None

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
        ok = np.ones(T, dtype=bool)
        if self.custom_timesteps or self.num_inference_steps:
            keep = sorted(set(int(v) for v in self.timesteps.cpu().tolist()))  # once, at set-up
            schedule = base.respace(keep)
            rows = np.full(T, -1, dtype=np.int64)
            rows[keep] = np.arange(len(keep))
            return _Plan(schedule, rows, keep[0], ok)
        return _Plan(base, np.arange(T, dtype=np.int64), 0, ok)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """x_t -> x_{t_prev}. model_output: [B, C, ...] (or [B, 2C, ...] for learned variances);
        timestep: int, 0-dim tensor or per-sample int tensor [B]; sample: [B, C, ...]."""
        var = self.config.variance_type
        mean_type = _MEAN_TYPE.get(self.config.prediction_type)
        thresholding = bool(self.config.thresholding)
        if var == "fixed_large_log" or mean_type is None or (thresholding and self.config.sample_max_value < 1):
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        plan = self._plan()
        B, C = sample.shape[0], sample.shape[1]
        rows, draw = self._rows(plan, timestep, B, sample.device)
        if rows is None:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        learned = var in ("learned", "learned_range")
        if learned and model_output.shape[1] != 2 * C:
            raise ValueError(f"model_output: variance_type={var!r} needs {2 * C} channels (mean and variance), "
                             f"got shape {tuple(model_output.shape)}")
        if model_output.dtype != sample.dtype:
            model_output = model_output.to(sample.dtype)
        var_part = model_output[:, C:] if learned else None
        if var == "learned":
            # diffusers' "learned" output is the variance itself; the op's is its log.
            model_output = torch.cat([model_output[:, :C], torch.log(var_part)], dim=1)
        op_var = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small"}.get(var, var)
        r = float(self.config.clip_sample_range)
        clip_in_op = bool(self.config.clip_sample) and not thresholding and r == 1.0
        noise = None
        if draw is not False:
            noise = self._noise(sample.shape, generator, model_output.device, model_output.dtype, sample)
        shape = (-1, *([1] * (sample.ndim - 1)))
        if self.config.clip_sample and not thresholding and r != 1.0:
            # Clipping to [-r, r] (the op clips to [-1, 1]): the fused p(x_{t-1}|x_t) unclipped, clip,
            # then the fused posterior mean of the clipped x0, and the noise from the device table.
            pmv = ops.p_mean_variance(model_output, sample, rows, plan.schedule, mean_type=mean_type, var_type=op_var,
                                      backend=self.backend, validate=False)
            pred = pmv["pred_xstart"].clamp(-r, r)
            prev = ops.q_posterior(pred, sample, rows, plan.schedule, backend=self.backend, validate=False)[0]
            if noise is not None:
                nonzero = (rows != 0).reshape(shape)
                prev = (prev.float() + torch.where(nonzero, torch.exp(0.5 * pmv["log_variance"].float()), 0.0)
                        * noise.float()).to(sample.dtype)
        else:
            out = ops.p_sample_step(
                model_output, sample, rows, plan.schedule, mean_type=mean_type, var_type=op_var,
                clip_denoised=clip_in_op,
                dynamic_threshold=self.config.dynamic_thresholding_ratio if thresholding else None,
                sample_max_value=float(self.config.sample_max_value), noise=noise,
                seed=0 if noise is None else None, backend=self.backend, validate=False,
            )
            prev, pred = out["sample"], out["pred_xstart"]
        table = plan.schedule.table(sample.device)
        if plan.final_t > 0 and noise is not None:
            # The parent still adds noise at its last step when that step's t > 0 (abar_prev = 1, so
            # the posterior variance is 0, floored at 1e-20); the respaced row 0 adds none.
            last = (rows == 0).reshape(shape)
            log_beta = table[rows, COLUMN["log_betas"]].reshape(last.shape)
            if var in ("fixed_small", "fixed_small_log"):
                log_var = torch.full_like(log_beta, _LOG_1E20)
            elif var == "fixed_large":
                log_var = log_beta
            elif var == "learned":
                log_var = torch.log(var_part.float())
            else:  # learned_range
                frac = (var_part.float() + 1) / 2
                log_var = frac * log_beta + (1 - frac) * _LOG_1E20
            extra = torch.where(last, torch.exp(0.5 * log_var) * noise.float(), 0.0)
            prev = (prev.float() + extra).to(sample.dtype)
        if not return_dict:
            return (prev, pred)
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=pred)


class FastDDIMScheduler(_FastMixin, DDIMScheduler):
    """diffusers' DDIMScheduler with a fused, sync-free ``step`` / ``add_noise`` / ``get_velocity``.

    See the module docstring for the exact equivalence and the configs that run the parent's step.
    """

    def _make_plan(self) -> _Plan:
        base = self._base_schedule()
        T = base.num_timesteps
        ratio = T // self.num_inference_steps
        ts = sorted(set(int(v) for v in self.timesteps.cpu().tolist()))  # once, at set-up
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
        ok = np.zeros(T, dtype=bool)
        for t in ts:
            i = rows[t]
            pred = keep[i - 1] if i > 0 else None  # the step the fused op goes to
            if t - ratio >= 0:
                ok[t] = pred == t - ratio
            elif one:
                ok[t] = pred is None
            else:
                ok[t] = t > 0 and pred == 0
        rows_steps = np.full(T, -1, dtype=np.int64)
        rows_steps[ts] = rows[ts]
        return _Plan(base.respace(keep), rows_steps, keep[0], ok)

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True):
        """One DDIM step. model_output, sample: [B, C, ...]; timestep: int, 0-dim or per-sample tensor [B]."""
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        mean_type = _MEAN_TYPE.get(self.config.prediction_type)
        thresholding = bool(self.config.thresholding)
        args = (model_output, timestep, sample, eta, use_clipped_model_output, generator, variance_noise, return_dict)
        if mean_type is None or (thresholding and self.config.sample_max_value < 1):
            return super().step(*args)
        plan = self._plan()
        rows, _ = self._rows(plan, timestep, sample.shape[0], sample.device)
        if rows is None:
            return super().step(*args)
        if model_output.dtype != sample.dtype:
            model_output = model_output.to(sample.dtype)
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
            elif noise.dtype != sample.dtype:
                noise = noise.to(sample.dtype)
        r = float(self.config.clip_sample_range)
        clipping = thresholding or bool(self.config.clip_sample)
        if not clipping or (use_clipped_model_output and (thresholding or r == 1.0)):
            out = ops.ddim_step(
                model_output, sample, rows, plan.schedule, eta=float(eta), mean_type=mean_type,
                clip_denoised=clipping and not thresholding,
                dynamic_threshold=self.config.dynamic_thresholding_ratio if thresholding else None,
                sample_max_value=float(self.config.sample_max_value), noise=noise, backend=self.backend,
                validate=False,
            )
            prev, pred = out["sample"], out["pred_xstart"]
        else:
            # diffusers' default (clip x0 but keep the model's eps) or clipping to [-r, r]: ops.ddim_step
            # always re-derives eps from the clipped x0, so: the fused x0 prediction, then the update
            # from the float32 device table (a few elementwise ops; no sync).
            prev, pred = self._ddim_unfused(model_output, sample, rows, plan, mean_type, float(eta), noise,
                                            use_clipped_model_output, thresholding, r)
        if not return_dict:
            return (prev, pred)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=pred)

    def _ddim_unfused(self, model_output, sample, rows, plan, mean_type, eta, noise, use_clipped, thresholding, r):
        raw = ops.predict_xstart(model_output, sample, rows, plan.schedule, mean_type=mean_type,
                                 backend=self.backend, validate=False)
        pred = self._threshold_sample(raw) if thresholding else raw.clamp(-r, r)
        table = plan.schedule.table(sample.device)
        shape = (-1, *([1] * (sample.ndim - 1)))
        col = lambda name: table[rows, COLUMN[name]].reshape(shape)  # noqa: E731
        x, mo, x0 = sample.float(), model_output.float(), pred.float()
        sqrt_abar, sqrt_1m_abar = col("sqrt_alphas_cumprod"), col("sqrt_one_minus_alphas_cumprod")
        if use_clipped:
            eps = (x - sqrt_abar * x0) / sqrt_1m_abar
        elif mean_type == "epsilon":
            eps = mo
        elif mean_type == "x0":
            eps = (x - sqrt_abar * mo) / sqrt_1m_abar
        else:  # v
            eps = sqrt_abar * mo + sqrt_1m_abar * x
        # sigma^2 = eta^2 (1 - abar_prev) beta_t / (1 - abar) and 1 - abar_prev - sigma^2, written with
        # the table's 1 - abar columns (no cancellation of 1 - abar_prev in float32).
        ratio = col("betas") / (sqrt_1m_abar * sqrt_1m_abar)
        sqrt_1m_prev = col("sqrt_one_minus_alphas_cumprod_prev")
        std = eta * sqrt_1m_prev * torch.sqrt(ratio)
        # ratio <= 1 exactly (beta_t <= 1 - abar_t), = 1 on the first row: clamp float32 rounding below 0.
        direction = torch.sqrt((1 - eta**2 * ratio).clamp(min=0.0)) if eta <= 1 else torch.sqrt(1 - eta**2 * ratio)
        prev = col("sqrt_alphas_cumprod_prev") * x0 + sqrt_1m_prev * direction * eps
        if noise is not None:
            prev = prev + std * noise.float()
        return prev.to(sample.dtype), pred
