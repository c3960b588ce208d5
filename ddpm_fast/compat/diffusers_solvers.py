"""Drop-in diffusers schedulers over ddpm_fast.solvers: FastDPMSolverMultistepScheduler,
FastEulerDiscreteScheduler, FastEulerAncestralDiscreteScheduler, FastUniPCMultistepScheduler.

    from ddpm_fast.compat.diffusers_solvers import FastDPMSolverMultistepScheduler as DPMSolverMultistepScheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

Subclasses of diffusers' schedulers with the same config, methods and public state. After
``set_timesteps`` (which builds the step table on the host in float64 from the parent's own ``sigmas``,
so Karras / exponential / beta / Lu sigmas, every timestep_spacing, final_sigmas_type and
rescale_betas_zero_snr only change the table) ``step`` is elementwise math on the device with a
device-resident history: one fused op (ddpm_fast.ops.solver_update), no host sync, no host-to-device
copy, no torch.linalg.solve per step.

The first step finds its step index without reading the device when the timestep is an element of
``self.timesteps`` (``for t in scheduler.timesteps``: a view, located by its storage offset) or when
``set_begin_index`` was called; any other timestep tensor is located by the parent's own code (one
sync, as the parent). Later steps follow ``step_index`` (the parent ignores the timestep there too).

Drop-in rule: never raise where the parent does not. The parent's own code runs (same results,
parent speed; logged once per reason at debug level) for: DPM-Solver's noise-prediction algorithm_type
"dpmsolver" / "sde-dpmsolver" (deprecated upstream; fused otherwise) with thresholding (the parent
thresholds the x0 made from epsilon and converts back) or flow_prediction (the parent raises),
"sde-dpmsolver" with solver_order 3 (the parent raises at its third-order step), thresholding with
sample_max_value < 1, UniPC's solver_p, UniPC flow_prediction with predict_x0=False (the parent
raises), model_output and sample of different dtypes or shapes (after DPM's learned-variance slice),
Euler called with an integer timestep (the parent raises), and every step after such a call until the
next set_timesteps.
Fused beyond the elementwise math: flow sigmas (use_flow_sigmas, flow_shift, dynamic shifting) and
flow_prediction (alpha_t = 1 - sigma, sigma_t = sigma in the table); thresholding (the per-sample
quantile of |x0|, ddpm_fast.reference's dynamic thresholding, on the device: still no sync).

What differs:
- ``model_outputs`` (DPM-Solver, UniPC) hold views of the history ring buffer (x0, or epsilon for
  dpmsolver / sde-dpmsolver and UniPC predict_x0=False, as the parents') in float32 (float64 for
  float64 inputs), not the model's dtype; UniPC's ``last_sample`` likewise. When the parent's code takes
  over mid-loop they are handed over in the parent's dtypes.
- math is float32 for 16-bit inputs (the parents' UniPC computes in the sample's 16-bit dtype), float64
  for float64 inputs (the parents upcast to float32 only); the coefficients come from float64.
- scale_model_input (Euler) multiplies by 1 / sqrt(sigma^2 + 1) from the table (the parent divides).
- noise (DPM-Solver's SDE variants, Euler's churn, Euler ancestral) is drawn by diffusers' randn_tensor
  exactly as the parent draws it (same generator, same values); a CPU generator with CUDA samples
  therefore still draws on the CPU and copies, as the parent does: pass a generator on the samples'
  device to avoid it. ``in_kernel_noise`` (below) trades these values for speed.
- UniPC bh1 stepping to a final sigma of 0 (final_sigmas_type "zero", the default): the parent's last
  step returns NaN (its B(h) = -inf times a zero history term); ours returns the order-1 result, the x0
  prediction. Elsewhere where the parent produces NaN (predict_x0=False stepping to sigma 0; repeated
  sigmas with lower_order_final=False) so do we: the coefficients are the same expressions.

Beyond the parent (keyword-only, off by default; where the parent's own code runs they are applied
before it):
- ``step(..., guidance_scale=s, guidance_rescale=r)``: model_output is the model's [2B, ...] output
  (unconditional half first); uncond + s (cond - uncond), rescaled as diffusers' rescale_noise_cfg with r,
  is combined inside the step's one fused op (the rescale's per-sample std ratio is computed before it).
- ``scheduler.in_kernel_noise = True`` (an attribute, not a config entry: saved configs stay the parent's): the
  fused steps draw their noise inside the step's one op (counter-based Philox normals, the stream of
  ddpm_fast.ops.p_sample_step and the functional steps' ``generator``), seeded by one torch.randint draw of
  the step's generator per step (torch's default generator for the samples' device when it is None; a
  generator on another device, such as a CPU generator for CUDA samples, gives that seed on the host with no
  device sync). The same generator state gives the same samples, but not the parent's values: randn_tensor's
  pass over the sample, which bounds the Euler ancestral and SDE steps' speed-up, is gone. A list of
  generators (one per sample, as randn_tensor takes) and the configurations the parent's code runs keep the
  parent's draw.
- per-sample timesteps: a [B] timestep tensor where the parent raises (before the loop's first step,
  without set_begin_index, B neither 1 nor the number of timesteps) steps each sample at its own step
  index, located on the device by the parent's rule (no host read); the Euler pair's scale_model_input
  likewise. step_index stays None then, the multistep warm-up counts each sample's steps on the device,
  and the parent's model_outputs / lower_order_nums / this_order are not updated.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from functools import partial

import numpy as np
import torch

try:
    from diffusers import (DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                           UniPCMultistepScheduler)
    from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
    from diffusers.schedulers.scheduling_euler_discrete import logger as _euler_logger
    from diffusers.schedulers.scheduling_utils import SchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as exc:  # pragma: no cover - exercised only without diffusers
    raise ImportError(
        "ddpm_fast.compat.diffusers_solvers needs the optional 'diffusers' package: pip install 'ddpm-fast[diffusers]'"
    ) from exc

from ..native import Kernel
from ..ops import solvers as solvers_ops
from ..ops._checks import is_compiling as check_compiling
from ..reference import compute_dtype
from ..solvers import steps, tables

__all__ = ["FastDPMSolverMultistepScheduler", "FastEulerDiscreteScheduler", "FastEulerAncestralDiscreteScheduler",
           "FastUniPCMultistepScheduler"]

_log = logging.getLogger(__name__)

_SCALE_WARNING = ("The `scale_model_input` function should be called before `step` to ensure correct denoising. "
                  "See `StableDiffusionPipeline` for a usage example.")


def _numbers(*values) -> bool:
    """Whether every value is an int or a float (not a bool)."""
    for value in values:
        if type(value) is not float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return False
    return True


def _say_once(scheduler, reason, log):
    """Log once per scheduler and reason, at debug level on ``log``, that the parent's code runs (the drop-ins
    of this module and of ddpm_fast.compat.diffusers)."""
    said = scheduler.__dict__.setdefault("_ddpm_fast_said", set())
    if reason not in said:
        said.add(reason)
        log.debug("%s runs diffusers' own code where %s", type(scheduler).__name__, reason)


def _output(cls, prev, pred):
    """cls(prev_sample=prev, pred_original_sample=pred) (a diffusers BaseOutput: an OrderedDict with the same
    fields as attributes), built without the dataclass __init__ / __post_init__ (about 4 us a step)."""
    out = cls.__new__(cls)
    OrderedDict.__setitem__(out, "prev_sample", prev)
    OrderedDict.__setitem__(out, "pred_original_sample", pred)
    object.__setattr__(out, "prev_sample", prev)
    object.__setattr__(out, "pred_original_sample", pred)
    return out


class _SolverMixin:
    """Shared state handling: the table per set_timesteps, the step index without a sync, the fallback."""

    in_kernel_noise = False  # True: the fused steps draw their noise in the op (the module docstring)

    def _noise(self, generator, sample, draw) -> dict:
        """A fused step's noise keywords (solver_update's): {"noise": draw()}, the parent's randn_tensor draw; with
        in_kernel_noise and generator None or one torch.Generator, a draw inside the op: {"draw_noise": True,
        "generator": generator} (a generator on sample's device type, or None), else {"draw_noise": True,
        "seed": one draw of the generator, read on the host} (a generator on another device: for a CPU generator
        with CUDA samples, no device sync)."""
        if not self.in_kernel_noise or not (generator is None or isinstance(generator, torch.Generator)):
            return {"noise": draw()}
        if generator is not None and generator.device.type != sample.device.type:
            # the steps take only a generator on sample's device: the op's seed drawn here, as philox_seed draws it
            return {"draw_noise": True, "seed": Kernel.philox_seed(None, generator, sample.device)[0]}
        return {"draw_noise": True, "generator": generator}

    def _unsupported(self) -> str | None:
        """Why this configuration runs the parent's step (None: it is fused)."""
        raise NotImplementedError

    def _build_table(self) -> tables.SolverTable:
        raise NotImplementedError

    def _say(self, reason):
        _say_once(self, reason, _log)

    # -- per set_timesteps ----------------------------------------------------------------------------
    def set_timesteps(self, *args, **kwargs):
        out = super().set_timesteps(*args, **kwargs)
        self.__dict__["_ddpm_fast"] = {"history": None, "last_sample": None, "parent_only": False}
        self._fast_refresh(self.__dict__["_ddpm_fast"])
        return out

    def _fast_refresh(self, state):
        """Build the table from the parent's sigmas (host, float64), put it on the timesteps' device, keep a
        host copy of the timesteps (set_timesteps time: one read). The loop's buffers are kept."""
        state.update({"table": None, "host_timesteps": None, "sigmas": self.sigmas, "timesteps": self.timesteps,
                      "input_scales": {}})
        reason = self._unsupported()
        if reason is None:
            try:
                state["table"] = self._build_table()
            except (ValueError, ArithmeticError) as exc:  # sigmas the table cannot hold: the parent's
                reason = f"the schedule is outside the fused steps ({exc})"
        if reason is not None:
            self._say(reason)
            return
        state["host_timesteps"] = self.timesteps.detach().cpu().numpy()
        state["table"].on(self.timesteps.device)
        state["table"].fused(self.timesteps.device)  # the step's coefficient rows (float32) on the device

    def _fast_state(self):
        """The fused state, None before set_timesteps. Reassigned sigmas / timesteps (an identity check, no
        device read) rebuild the table, as the parent reads them at every step; the history stays."""
        state = self.__dict__.get("_ddpm_fast")
        if state is not None and (state["sigmas"] is not self.sigmas or state["timesteps"] is not self.timesteps):
            self._fast_refresh(state)
        return state

    # -- the step index -------------------------------------------------------------------------------
    def _index_of_value(self, host_timesteps, value):
        """The parent's index_for_timestep rule on the host copy: the second match if several, the last
        index if none (DPM-Solver / UniPC; Euler's parent has no match only for foreign timesteps)."""
        matches = np.nonzero(host_timesteps == value)[0]
        if len(matches) == 0:
            return len(host_timesteps) - 1
        return int(matches[1] if len(matches) > 1 else matches[0])

    def _init_step_index(self, timestep):
        state = self.__dict__.get("_ddpm_fast")
        ts = self.timesteps
        if (self.begin_index is None and state is not None and state.get("host_timesteps") is not None
                and isinstance(timestep, torch.Tensor) and timestep.numel() == 1 and ts.ndim == 1
                and timestep.dtype == ts.dtype and timestep.device == ts.device and ts.numel()
                and timestep.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr()):
            offset = timestep.storage_offset() - ts.storage_offset()
            position, rest = divmod(offset, ts.stride(0)) if ts.stride(0) else (-1, 1)
            if rest == 0 and 0 <= position < ts.numel():  # an element of self.timesteps: read its host copy
                value = state["host_timesteps"][position]
                self._step_index = self._index_of_value(state["host_timesteps"], value)
                return
        super()._init_step_index(timestep)

    def _per_sample_index(self, timestep, sample):
        """Each sample's step index, int64 [B] on sample's device, for a [B] timestep tensor the parent cannot
        take (before its first step, without begin_index, its index_for_timestep compares the [N] timesteps
        with [B] values: it raises unless B is 1 or N); else None. The parent's rule on the device (the second
        match if several, the last index if none): a few small ops, no host read."""
        ts = self.timesteps
        if (self.step_index is not None or self.begin_index is not None or not isinstance(timestep, torch.Tensor)
                or not isinstance(sample, torch.Tensor) or timestep.ndim != 1 or sample.ndim < 1
                or timestep.shape[0] != sample.shape[0] or not isinstance(ts, torch.Tensor) or ts.ndim != 1
                or timestep.shape[0] in (1, ts.shape[0]) or timestep.is_complex()):
            return None
        hits = (ts.to(sample.device)[None, :] == timestep.to(device=sample.device, dtype=ts.dtype)[:, None]).long()
        count, first = hits.sum(1), hits.argmax(1)
        second = hits.scatter(1, first[:, None], 0).argmax(1)
        return torch.where(count > 1, second, torch.where(count > 0, first, ts.shape[0] - 1))

    # -- the fused or the parent's step ---------------------------------------------------------------
    def _fused_ready(self, model_output, sample):
        """The state when this call can take the fused step, else None (the parent's step runs)."""
        state = self._fast_state()
        if state is None or state["table"] is None:
            return None
        if state["parent_only"]:
            return None
        if not (isinstance(model_output, torch.Tensor) and isinstance(sample, torch.Tensor)
                and model_output.is_floating_point() and model_output.dtype == sample.dtype
                and model_output.shape == sample.shape and sample.ndim >= 1
                and model_output.device == sample.device):
            self._say("model_output and sample are not float tensors of one dtype, shape and device")
            self._hand_over(state)
            return None
        return state

    def _hand_over(self, state):
        """The parent's code takes the rest of the loop: give it its state in its own dtypes."""
        state["parent_only"] = True

    # -- classifier-free guidance in the step (keyword-only arguments the parents do not have) ---------------
    @staticmethod
    def _guidance(guidance_scale, guidance_rescale) -> dict:
        """The steps' guidance keywords ({} without guidance)."""
        if guidance_scale is None:
            return {}
        return {"guidance_scale": guidance_scale, "guidance_rescale": guidance_rescale}

    @staticmethod
    def _unconditional(model_output, guidance):
        """What the readiness checks see: the unconditional half of a [2B, ...] output with guidance."""
        if (guidance and isinstance(model_output, torch.Tensor) and model_output.ndim >= 1
                and model_output.shape[0] % 2 == 0):
            return model_output[: model_output.shape[0] // 2]
        return model_output

    @staticmethod
    def _for_parent(model_output, guidance):
        """The model output the parent's step takes: combined (cfg_combine) with guidance."""
        return steps.cfg_combine(model_output, **guidance) if guidance else model_output


class _MultistepMixin(_SolverMixin):
    """DPM-Solver++ and UniPC: the history ring buffer and the parent's model_outputs / lower_order_nums."""

    def _buffers(self, state, sample):
        """The history ring buffer for this sample (made at the loop's first step), or None when the loop
        changed shape, dtype or device midway (the parent's code takes over then)."""
        history = state["history"]
        if history is None:
            dtype = compute_dtype(sample.dtype)
            history = state["history"] = steps.new_history(state["table"], sample)
            state["slots"] = history.unbind(0)  # the slots' views, made once
            state["last_sample"] = torch.zeros(sample.shape, dtype=dtype, device=sample.device)
            state["dtype"] = sample.dtype
        elif (history.shape[1:] != sample.shape or state["dtype"] != sample.dtype
              or history.device != sample.device):
            self._say("the sample's shape, dtype or device changed within the loop")
            self._hand_over(state)
            return None
        return history

    def _publish(self, state, step_index):
        """model_outputs as the parent keeps it (oldest first): views of the ring buffer's slots."""
        order = self.config.solver_order
        slots = state["slots"]
        self.model_outputs = [slots[(step_index - back) % order] if step_index - back >= 0 else None
                              for back in range(order - 1, -1, -1)]
        taken = self.lower_order_nums + 1  # the steps since set_timesteps, this one included
        for j in range(max(order - taken, 0)):
            self.model_outputs[j] = None

    def _multistep_unsupported(self, thresholds: bool) -> str | None:
        """The reasons DPM-Solver and UniPC share to run the parent's code: a prediction type the tables lack,
        thresholding (where it applies: ``thresholds``) with sample_max_value < 1."""
        c = self.config
        if c.prediction_type not in tables.MULTISTEP_PREDICTION_TYPES:
            return f"prediction_type {c.prediction_type!r}"
        if thresholds and c.thresholding and c.sample_max_value < 1:
            return "thresholding with sample_max_value < 1"
        return None

    def _table_options(self) -> dict:
        """The table keywords DPM-Solver and UniPC share, from the config."""
        c = self.config
        return {"solver_order": c.solver_order, "solver_type": c.solver_type, "prediction_type": c.prediction_type,
                "lower_order_final": c.lower_order_final, "flow_sigmas": c.use_flow_sigmas}

    def _thresholding(self):
        """The config's thresholding as the steps' dynamic_threshold / sample_max_value arguments."""
        c = self.config
        if not c.thresholding:
            return {}
        return {"dynamic_threshold": c.dynamic_thresholding_ratio, "sample_max_value": c.sample_max_value}

    def _multistep_ready(self, model_output, timestep, sample):
        """(state, history, per-sample step index [B] or None) when this step is fused, else None (the parent's
        step runs; a loop it took over mid-way stays with it)."""
        state = self._fused_ready(model_output, sample) if self.num_inference_steps is not None else None
        history = self._buffers(state, sample) if state is not None else None
        index = self._per_sample_index(timestep, sample) if history is not None else None
        if index is not None:
            return state, history, index
        if history is not None and self.step_index is None:
            self._init_step_index(timestep)
        if history is None or not 0 <= self.step_index < state["table"].num_steps:
            if history is not None:
                self._hand_over(state)
            return None
        return state, history, None

    @staticmethod
    def _steps_done(state, index):
        """Per-sample steps taken so far (the warm-up order of a per-sample loop), int64 [B] on the device;
        counted in place after each per-sample step."""
        done = state.get("per_sample_done")
        if done is None or done.shape != index.shape or done.device != index.device:
            done = state["per_sample_done"] = torch.zeros_like(index)
        return done

    def _advance(self, state, step_index, prev_sample, return_dict):
        """The parent's bookkeeping after a fused step: model_outputs, lower_order_nums, step_index."""
        self._publish(state, step_index)
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def _hand_over(self, state):
        state["parent_only"] = True
        if state["history"] is not None:
            dtype = state["dtype"]
            self.model_outputs = [None if m is None else m.to(dtype) for m in self.model_outputs]
            if getattr(self, "last_sample", None) is not None:
                self.last_sample = state["last_sample"].to(dtype)


class FastDPMSolverMultistepScheduler(_MultistepMixin, DPMSolverMultistepScheduler):
    """DPMSolverMultistepScheduler whose step is ddpm_fast.solvers.dpm_solver_step (every algorithm_type:
    dpmsolver++ / sde-dpmsolver++ / dpmsolver / sde-dpmsolver, orders 1-3 (sde-dpmsolver: 1-2, as the
    parent), midpoint / heun, every sigma schedule); see the module docstring."""

    def _unsupported(self):
        c = self.config
        if c.algorithm_type in ("dpmsolver", "sde-dpmsolver"):  # epsilon in the history
            if c.thresholding:
                return f"thresholding with algorithm_type {c.algorithm_type!r} (of x0, converted back to epsilon)"
            if c.algorithm_type == "sde-dpmsolver" and c.solver_order == 3:
                return "algorithm_type 'sde-dpmsolver' with solver_order 3 (the parent has no third-order step)"
            if c.prediction_type == "flow_prediction":
                return f"prediction_type 'flow_prediction' with algorithm_type {c.algorithm_type!r}"
        elif c.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
            return f"algorithm_type {c.algorithm_type!r}"
        return self._multistep_unsupported(thresholds=True)

    def _build_table(self):
        c = self.config
        return tables.dpm_solver_table(self.sigmas, algorithm_type=c.algorithm_type, euler_at_final=c.euler_at_final,
                                       final_sigmas_type=c.final_sigmas_type, **self._table_options())

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True, *,
             guidance_scale=None, guidance_rescale=0.0):
        """The parent's step; guidance_scale (and guidance_rescale): model_output is [2B, ...] (unconditional half
        first), combined inside the step as uncond + s (cond - uncond) (diffusers' rescale_noise_cfg with
        guidance_rescale)."""
        guidance = self._guidance(guidance_scale, guidance_rescale)
        fused_output = model_output
        if (isinstance(model_output, torch.Tensor) and self.config.prediction_type == "epsilon"
                and self.config.variance_type in ("learned", "learned_range") and model_output.ndim >= 2):
            fused_output = model_output[:, :3]  # the parent's own slice of a learned-variance output
        ready = self._multistep_ready(self._unconditional(fused_output, guidance), timestep, sample)
        if ready is None:
            return super().step(self._for_parent(model_output, guidance), timestep, sample, generator=generator,
                                variance_noise=variance_noise, return_dict=return_dict)
        state, history, index = ready
        noise = {}
        if state["table"].sde:  # sde-dpmsolver++ / sde-dpmsolver: the parent's draw (or in_kernel_noise's)
            if variance_noise is None:
                noise = self._noise(generator, sample, partial(randn_tensor, sample.shape, generator=generator,
                                                               device=sample.device, dtype=torch.float32))
                noise.pop("draw_noise", None)  # dpm_solver_step draws in its op when noise is None
            else:
                noise = {"noise": variance_noise.to(device=sample.device, dtype=torch.float32)}
        if index is not None:  # each sample at its own timestep: the parent's bookkeeping is left as it is
            done = self._steps_done(state, index)
            prev_sample = steps.dpm_solver_step(fused_output, sample, index, state["table"], history, steps_done=done,
                                                validate=False, **noise, **self._thresholding(), **guidance)
            done.add_(1)
            return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)
        step_index = self.step_index
        prev_sample = steps.dpm_solver_step(fused_output, sample, step_index, state["table"], history,
                                            steps_done=self.lower_order_nums, validate=False, **noise,
                                            **self._thresholding(), **guidance)
        return self._advance(state, step_index, prev_sample, return_dict)


class FastUniPCMultistepScheduler(_MultistepMixin, UniPCMultistepScheduler):
    """UniPCMultistepScheduler whose step is ddpm_fast.solvers.unipc_step (bh1 / bh2, orders 1-3,
    predict_x0 or not, disable_corrector, every sigma schedule); see the module docstring."""

    def _unsupported(self):
        reason = self._multistep_unsupported(thresholds=self.predict_x0)
        if reason is None and self.solver_p is not None:
            return "solver_p"
        return reason

    def _build_table(self):
        return tables.unipc_table(self.sigmas, predict_x0=self.predict_x0, disable_corrector=self.disable_corrector,
                                  **self._table_options())

    def step(self, model_output, timestep, sample, return_dict=True, *, guidance_scale=None, guidance_rescale=0.0):
        """The parent's step; guidance_scale / guidance_rescale as FastDPMSolverMultistepScheduler.step's."""
        guidance = self._guidance(guidance_scale, guidance_rescale)
        ready = self._multistep_ready(self._unconditional(model_output, guidance), timestep, sample)
        if ready is None:
            return super().step(self._for_parent(model_output, guidance), timestep, sample, return_dict=return_dict)
        state, history, index = ready
        thresholding = self._thresholding() if self.predict_x0 else {}
        if index is not None:  # each sample at its own timestep: the parent's bookkeeping is left as it is
            done = self._steps_done(state, index)
            prev_sample = steps.unipc_step(model_output, sample, index, state["table"], history, state["last_sample"],
                                           steps_done=done, validate=False, **thresholding, **guidance)
            done.add_(1)
            return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)
        step_index, table = self.step_index, state["table"]
        prev_sample = steps.unipc_step(model_output, sample, step_index, table, history, state["last_sample"],
                                       steps_done=self.lower_order_nums, validate=False, **thresholding, **guidance)
        order = self.config.solver_order
        self.this_order = min(int(table.max_order[step_index]), self.lower_order_nums + 1)
        self.timestep_list = self.timestep_list[1:] + [timestep] if order > 1 else [timestep]
        self.last_sample = state["last_sample"]
        return self._advance(state, step_index, prev_sample, return_dict)


class _EulerMixin(_SolverMixin):
    def scale_model_input(self, sample, timestep):
        """The parent's; with a [B] timestep tensor the parent cannot take (see _per_sample_index), each sample
        scaled at its own step."""
        state = self._fast_state()
        if (state is None or state["table"] is None or not isinstance(sample, torch.Tensor)
                or not sample.is_floating_point()):
            return super().scale_model_input(sample, timestep)
        index = self._per_sample_index(timestep, sample) if self._step_index is None else None
        if index is None:
            if self._step_index is None:
                self._init_step_index(timestep)
            if not 0 <= self._step_index < state["table"].num_steps:
                return super().scale_model_input(sample, timestep)
            self.is_scale_input_called = True
            return sample * self._input_scales(state, sample)[self._step_index]
        table = state["table"]
        self.is_scale_input_called = True
        coef = table.on(sample.device, sample.dtype)["coef"]
        scale = coef[index, 0, self._INPUT_SCALE[table.kind]].reshape(-1, *([1] * (sample.ndim - 1)))
        return (sample * scale).to(sample.dtype)

    _INPUT_SCALE = {"euler": tables.EULER_COLUMNS.index("input_scale"),
                    "euler_ancestral": tables.EULER_ANCESTRAL_COLUMNS.index("input_scale")}

    def _input_scales(self, state, sample) -> tuple:
        """The scale_model_input factor of every step, 0-dim tensors on sample's device in its compute dtype
        (views of the device table), kept per device and dtype for this set_timesteps."""
        key = (sample.device, sample.dtype == torch.float64)
        scales = state["input_scales"].get(key)
        if scales is None:
            table = state["table"]
            coef = table.on(sample.device, sample.dtype)["coef"]
            scales = coef[:, 0, self._INPUT_SCALE[table.kind]].unbind(0)
            state["input_scales"][key] = scales
        return scales

    def _euler_ready(self, model_output, timestep, sample, guidance_scale, guidance_rescale):
        """(state, step index: the host int or a per-sample [B] tensor, the model output as steps._Guided) when
        this step is fused, else None (the parent's runs)."""
        # the parent raises for integer timesteps (a float tensor, the usual one, is not: no slower test for it)
        integer = (not (isinstance(timestep, torch.Tensor) and timestep.is_floating_point())
                   and isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)))
        if integer and not (isinstance(timestep, torch.Tensor) and timestep.ndim == 1):
            return None
        guidance = self._guidance(guidance_scale, guidance_rescale)
        state = self._fused_ready(self._unconditional(model_output, guidance), sample)
        if state is None:
            return None
        index = self._per_sample_index(timestep, sample) if self._step_index is None else None
        if index is None:
            if integer:
                return None
            if self._step_index is None:
                self._init_step_index(timestep)
            if not 0 <= self._step_index < state["table"].num_steps:
                return None
            if not self.is_scale_input_called:
                _euler_logger.warning(_SCALE_WARNING)
            index = self._step_index
        if guidance:  # (the checks: model_output and sample are float tensors of one dtype, shape and device)
            return state, index, steps._Guided.checked(model_output, sample, guidance_scale, guidance_rescale)
        return state, index, steps._Guided(model_output, compute_dtype(sample.dtype))

    def _steady(self, model_output, timestep, sample, guidance_scale, guidance_rescale):
        """The steady step of a running loop without churn or guidance_rescale, ready to call, else None (the
        general path runs): (the compiled op, its (rows, row_index) for this step, x0's dtype, whether the parent
        returns the model output as x0: prediction_type "sample", and the model output as (uncond, cond or
        None)). Steady: step_index set, a float timestep, model_output and sample plain tensors of one dtype and
        device that need no gradient, model_output of sample's shape (its [2B, ...] with a number guidance_scale),
        scale_model_input called, the table current (not reassigned, not handed to the parent), outside
        torch.compile, and the compiled op runs them (backends.plan, asked once per set_timesteps and sample
        dtype, device and shape). The general path's checks, cheapest first: ~4 us a step less on the host."""
        state = self.__dict__.get("_ddpm_fast")
        index = self._step_index
        if (index is None or state is None or state["table"] is None or state["parent_only"]
                or state["sigmas"] is not self.sigmas or state["timesteps"] is not self.timesteps
                or self.is_scale_input_called is not True
                or type(model_output) is not torch.Tensor or type(sample) is not torch.Tensor
                or not (type(timestep) is float or (type(timestep) is torch.Tensor and timestep.is_floating_point()))
                or model_output.dtype is not sample.dtype or model_output.device != sample.device
                or check_compiling()
                or (torch.is_grad_enabled() and (sample.requires_grad or model_output.requires_grad))):
            return None
        if guidance_scale is None:
            if model_output.shape != sample.shape:
                return None
            halves = (model_output, None)
        else:
            if (type(guidance_scale) not in (float, int) or type(guidance_rescale) not in (float, int)
                    or guidance_rescale != 0 or sample.ndim < 1 or model_output.shape[1:] != sample.shape[1:]
                    or model_output.shape[0] != 2 * sample.shape[0]):
                return None
            halves = model_output.chunk(2)
        key = (sample.dtype, sample.device, sample.shape)
        steady = state.get("steady")
        if steady is None or steady[0] != key:
            steady = state["steady"] = (key, self._steady_entry(state["table"], sample))
        entry = steady[1]
        if entry is None or not 0 <= index < len(entry[1]):
            return None
        return entry[0], entry[1][index], entry[2], entry[3], halves

    @staticmethod
    def _steady_entry(table, sample):
        """(the compiled op, host_rows of every step, x0's dtype, whether x0 is the model output itself) for
        sample's dtype, device and batch, or None where the compiled op does not run them (a non-float dtype, no
        extension, the Triton backend)."""
        if not sample.is_floating_point() or sample.ndim < 1:
            return None
        kernel = solvers_ops._compiled_kernel("cpu" if sample.is_cpu else sample.device.type, sample.dtype)
        if kernel is None:
            return None
        dtype = compute_dtype(sample.dtype)
        return (kernel.op, table.host_rows(sample.device, dtype, sample.shape[0]), dtype,
                table.prediction_type == "sample")

    @staticmethod
    def _steady_update(steady, sample, guidance_scale, noise=None, draw_noise=False, generator=None, seed=None):
        """(x_prev, x0) of a steady step (_steady's result): the one compiled op call, x0 in the compute dtype; noise
        given, or drawn in the op (draw_noise: _noise's keywords), or none."""
        op, (rows, row_index), x0_dtype, _, (uncond, cond) = steady
        x0 = torch.empty_like(sample, dtype=x0_dtype, memory_format=torch.contiguous_format)
        scale = 1.0 if cond is None else float(guidance_scale)
        philox = Kernel.philox_seed(seed, generator, sample.device) if draw_noise else None
        return solvers_ops.plain_update(op, sample, uncond, rows, row_index, x0, noise, cond, scale, philox), x0

    def _euler_output(self, output_cls, step_index, prev_sample, x0, return_dict):
        """The parent's bookkeeping (a host step index advances) and its output."""
        if not isinstance(step_index, torch.Tensor):
            self._step_index += 1
        if not return_dict:
            return prev_sample, x0
        return _output(output_cls, prev_sample, x0)


class FastEulerDiscreteScheduler(_EulerMixin, EulerDiscreteScheduler):
    """EulerDiscreteScheduler whose step is ddpm_fast.solvers.euler_step (churn included, every sigma
    schedule and interpolation_type); see the module docstring."""

    def _unsupported(self):
        if self.config.prediction_type not in ("epsilon", "sample", "original_sample", "v_prediction"):
            return f"prediction_type {self.config.prediction_type!r}"
        return None

    def _build_table(self):
        prediction = self.config.prediction_type
        return tables.euler_table(self.sigmas, prediction_type="sample" if prediction == "original_sample"
                                  else prediction)

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True, *, guidance_scale=None, guidance_rescale=0.0):
        """The parent's step; guidance_scale / guidance_rescale as FastDPMSolverMultistepScheduler.step's."""
        if (type(s_churn) is float and s_churn == 0.0 and type(s_tmin) is float and type(s_tmax) is float
                and type(s_noise) is float):
            steady = self._steady(model_output, timestep, sample, guidance_scale, guidance_rescale)
            if steady is not None:  # no churn: no noise
                prev_sample, x0 = self._steady_update(steady, sample, guidance_scale)
                if steady[3]:  # prediction_type "sample": the parent returns the (guided) model output itself
                    x0 = model_output if guidance_scale is None else x0.to(sample.dtype)
                return self._euler_output(EulerDiscreteSchedulerOutput, None, prev_sample, x0, return_dict)
        ready = self._euler_ready(model_output, timestep, sample, guidance_scale, guidance_rescale)
        if ready is None or not _numbers(s_churn, s_tmin, s_tmax, s_noise):
            return super().step(self._for_parent(model_output, self._guidance(guidance_scale, guidance_rescale)),
                                timestep, sample, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
                                generator=generator, return_dict=return_dict)
        state, step_index, out = ready
        table = state["table"]
        noise = churn = None  # noise: _noise's keywords where the step churns
        if s_churn > 0:
            churn = (float(s_churn), float(s_tmin), float(s_tmax), float(s_noise))
            host_index = None if isinstance(step_index, torch.Tensor) else step_index
            if steps.euler_churns(table, host_index, s_churn, s_tmin, s_tmax):
                noise = self._noise(generator, sample, partial(randn_tensor, sample.shape, dtype=sample.dtype,
                                                               device=sample.device, generator=generator))
        prev_sample, x0 = steps._euler_update(out, sample, step_index, table, churn=churn, **(noise or {}))
        if table.prediction_type == "sample":  # the parent returns the model output itself
            x0 = x0.to(sample.dtype) if out.cond is not None else model_output
        return self._euler_output(EulerDiscreteSchedulerOutput, step_index, prev_sample, x0, return_dict)


class FastEulerAncestralDiscreteScheduler(_EulerMixin, EulerAncestralDiscreteScheduler):
    """EulerAncestralDiscreteScheduler whose step is ddpm_fast.solvers.euler_ancestral_step; see the
    module docstring."""

    def _unsupported(self):
        if self.config.prediction_type not in ("epsilon", "v_prediction"):
            return f"prediction_type {self.config.prediction_type!r}"  # the parent raises for "sample"
        return None

    def _build_table(self):
        return tables.euler_ancestral_table(self.sigmas, prediction_type=self.config.prediction_type)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True, *, guidance_scale=None,
             guidance_rescale=0.0):
        """The parent's step; guidance_scale / guidance_rescale as FastDPMSolverMultistepScheduler.step's."""
        steady = self._steady(model_output, timestep, sample, guidance_scale, guidance_rescale)
        draw = partial(randn_tensor, sample.shape, dtype=sample.dtype, device=sample.device, generator=generator)
        if steady is not None:
            prev_sample, x0 = self._steady_update(steady, sample, guidance_scale, **self._noise(generator, sample, draw))
            return self._euler_output(EulerAncestralDiscreteSchedulerOutput, None, prev_sample, x0, return_dict)
        ready = self._euler_ready(model_output, timestep, sample, guidance_scale, guidance_rescale)
        if ready is None:
            return super().step(self._for_parent(model_output, self._guidance(guidance_scale, guidance_rescale)),
                                timestep, sample, generator=generator, return_dict=return_dict)
        state, step_index, out = ready
        prev_sample, x0 = steps._euler_update(out, sample, step_index, state["table"],
                                              **self._noise(generator, sample, draw))
        return self._euler_output(EulerAncestralDiscreteSchedulerOutput, step_index, prev_sample, x0, return_dict)
