"""improved-diffusion compatible GaussianDiffusion / SpacedDiffusion on top of the fused ops.

Drop-in for ``improved_diffusion.gaussian_diffusion`` / ``respace`` / ``script_util``: the same
constructor keywords, method names, arguments and return dicts. Enum members of improved-diffusion
(``ModelMeanType.EPSILON`` ...) are accepted by name, as are plain strings (``"epsilon"``, ``"x0"``,
``"x_prev"``, ``"v"``; ``"fixed_small"`` ...; ``"mse"`` ...).

All elementwise math runs through ``ddpm_fast.ops`` (one fused call per method where the backend
has one) with the schedule's float32 table cached on the device: no per-call host-to-device
copy and no host sync in ``training_losses`` or a sampling step. Timesteps ``t`` are 0-based
int64 tensors [B] on the inputs' device, as in improved-diffusion.

Differences from improved-diffusion (results are the same):
- ``p_sample`` / ``ddim_sample`` take an optional ``noise`` (default ``torch.randn_like(x)``,
  improved-diffusion's draw); ``ddim_sample`` draws no noise when eta == 0.
- ``p_sample_loop`` / ``ddim_sample_loop`` (and their ``_progressive`` forms) take ``cuda_graph=True``:
  on CUDA one step (model + fused update + its noise draw) is captured in a CUDA graph and replayed per
  timestep (no host sync); on the CPU the eager loop runs, with the same result.
- the schedule's tables are ``torch`` float64 tensors (``self.schedule``); the numpy arrays
  improved-diffusion exposes (``self.betas``, ``self.alphas_cumprod`` ...) are kept as attributes.
"""
from __future__ import annotations

import enum

import numpy as np
import torch

from . import ops
from .backends import check_name
from .options import KL_LOSS_TYPES, LEARNED_VAR_TYPES
from .schedule import COLUMN, NoiseSchedule, space_timesteps

__all__ = [
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "GaussianDiffusion",
    "SpacedDiffusion",
    "create_gaussian_diffusion",
    "get_named_beta_schedule",
    "space_timesteps",
    "mean_flat",
]


class ModelMeanType(enum.Enum):
    """What the model's (mean) output predicts."""

    PREVIOUS_X = "x_prev"
    START_X = "x0"
    EPSILON = "epsilon"
    VELOCITY = "v"


class ModelVarType(enum.Enum):
    """How the model's variance is obtained."""

    LEARNED = "learned"
    FIXED_SMALL = "fixed_small"
    FIXED_LARGE = "fixed_large"
    LEARNED_RANGE = "learned_range"


class LossType(enum.Enum):
    MSE = "mse"
    RESCALED_MSE = "rescaled_mse"
    KL = "kl"
    RESCALED_KL = "rescaled_kl"

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


def _option(name: str, value, enum_cls) -> str:
    """The op-level string for ``value``: one of our / improved-diffusion's enum members (matched by
    name, so another module's enum works), the member's name, or the op string itself."""
    member_name = getattr(value, "name", None)
    if isinstance(value, enum.Enum) and member_name in enum_cls.__members__:
        return enum_cls[member_name].value
    if isinstance(value, str):
        if value in enum_cls.__members__:
            return enum_cls[value].value
        if value.upper() in enum_cls.__members__:
            return enum_cls[value.upper()].value
        values = {m.value for m in enum_cls}
        if value in values:
            return value
    allowed = [m.name for m in enum_cls] + [m.value for m in enum_cls]
    raise ValueError(f"{name}: unknown {value!r}; expected one of {allowed}")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every non-batch dimension: [B, ...] -> [B]."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """improved-diffusion's named schedules ("linear", "cosine"): float64 numpy betas [T]."""
    return NoiseSchedule.named(schedule_name, num_diffusion_timesteps).betas.numpy().copy()


def _graph_device(x: torch.Tensor) -> bool:
    """Whether a sampling loop over x can run as a CUDA graph (x on a CUDA device); else it runs eagerly."""
    return x.is_cuda and torch.cuda.is_available()


def _capture(graph, body):
    """body() captured into graph (a torch.cuda.CUDAGraph); its outputs are the graph's static output buffers."""
    with torch.cuda.graph(graph):
        return body()


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ...] broadcastable against ``like``."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


class GaussianDiffusion:
    """improved-diffusion's GaussianDiffusion, fused.

    Args:
        betas: 1-D array-like of T betas in (0, 1] (numpy, list or tensor).
        model_mean_type, model_var_type, loss_type: enum members (ours or improved-diffusion's) or strings.
        rescale_timesteps: the model sees t * 1000 / T (float) instead of t.
        backend: the ddpm_fast backend for every op ("auto" picks the fastest available one).
        validate: range-check t in every op (None: on CPU only, where it is free; see ddpm_fast.ops).
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, rescale_timesteps=False,
                 backend="auto", validate=None):
        self.mean_type = _option("model_mean_type", model_mean_type, ModelMeanType)
        self.var_type = _option("model_var_type", model_var_type, ModelVarType)
        self.loss = _option("loss_type", loss_type, LossType)
        self.model_mean_type = ModelMeanType(self.mean_type)
        self.model_var_type = ModelVarType(self.var_type)
        self.loss_type = LossType(self.loss)
        self.rescale_timesteps = bool(rescale_timesteps)
        self.backend = check_name(backend)
        self.validate = validate
        self.schedule = self._make_schedule(betas)
        self.num_timesteps = self.schedule.num_timesteps
        if not hasattr(self, "original_num_steps"):
            self.original_num_steps = self.num_timesteps
        # improved-diffusion's numpy tables (float64), for code that reads them.
        for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next",
                     "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                     "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                     "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"):
            setattr(self, name, getattr(self.schedule, name).numpy())
        self._maps: dict = {}

    def _make_schedule(self, betas) -> NoiseSchedule:
        return NoiseSchedule(betas)

    # -- helpers ------------------------------------------------------------------------------
    def _col(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Column ``name`` of the cached float32 device table at t, as [B, 1, ...] (float64 for float64)."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return _bcast(self.schedule.table(like.device, dtype)[t, COLUMN[name]], like)

    def _model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """What the model sees: the original timestep (respaced processes), times 1000/T if rescaled."""
        if self.schedule.is_respaced:
            m = self._maps.get(t.device)
            if m is None:
                m = self._maps[t.device] = self.schedule.timestep_map.to(t.device)
            t = m[t].to(t.dtype)
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.original_num_steps)
        return t

    def _scale_timesteps(self, t):
        """improved-diffusion's name for the rescaling alone (SpacedDiffusion also maps t)."""
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.original_num_steps)
        return t

    def _run_model(self, model, x, t, model_kwargs):
        return model(x, self._model_timesteps(t), **(model_kwargs or {}))

    def _full(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.expand(like.shape) if v.shape != like.shape else v

    def _kw(self):
        return {"mean_type": self.mean_type, "var_type": self.var_type, **self._bk()}

    def _bk(self):
        return {"backend": self.backend, "validate": self.validate}

    # -- forward process ----------------------------------------------------------------------
    def q_mean_variance(self, x_start, t):
        """q(x_t | x_0): (mean, variance, log_variance), each x_start's shape.

        Not an op: read from the device table (sqrt_abar, 1 - abar, log(1 - abar))."""
        mean = (self._col("sqrt_alphas_cumprod", t, x_start) * x_start).to(x_start.dtype)
        var = (1.0 - self._col("alphas_cumprod", t, x_start)).to(x_start.dtype)
        log_var = self._col("log_one_minus_alphas_cumprod", t, x_start).to(x_start.dtype)
        return mean, self._full(var, x_start), self._full(log_var, x_start)

    def q_sample(self, x_start, t, noise=None):
        """x_t = sqrt(abar_t) x_start + sqrt(1 - abar_t) noise (noise: default randn_like)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return ops.q_sample(x_start, t, noise, self.schedule, **self._bk())

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """q(x_{t-1} | x_t, x_0): (mean, variance, clipped log variance), each x_start's shape."""
        mean, var, log_var = ops.q_posterior(x_start, x_t, t, self.schedule, **self._bk())
        return mean, self._full(var, x_start), self._full(log_var, x_start)

    # -- the model's p(x_{t-1} | x_t) -----------------------------------------------------------
    def _p_mean_variance_from_output(self, model_output, x, t, clip_denoised, denoised_fn):
        out = ops.p_mean_variance(model_output, x, t, self.schedule, clip_denoised=clip_denoised and
                                  denoised_fn is None, **self._kw())
        if denoised_fn is not None:
            # A user function sits between the x0 prediction and the clipping: not expressible as
            # one fused call, so predict, apply, clip, then the fused posterior.
            c = x.shape[1]
            mean_part = model_output[:, :c] if self.var_type in LEARNED_VAR_TYPES else model_output
            pred = ops.predict_xstart(mean_part, x, t, self.schedule, mean_type=self.mean_type,
                                      **self._bk())
            pred = denoised_fn(pred)
            if clip_denoised:
                pred = pred.clamp(-1, 1)
            out["pred_xstart"] = pred
            if self.mean_type != "x_prev":
                out["mean"] = ops.q_posterior(pred, x, t, self.schedule, **self._bk())[0]
        if self.var_type == "fixed_small":
            # improved-diffusion's fixed_small variance is the posterior variance itself (0 at t = 0);
            # only its log is clipped. The op returns exp(clipped log variance): correct t = 0 from the table.
            out["variance"] = self._col("posterior_variance", t, x).to(out["variance"].dtype)
        out["variance"] = self._full(out["variance"], x)
        out["log_variance"] = self._full(out["log_variance"], x)
        return out

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Apply the model: dict mean, variance, log_variance, pred_xstart (each x's shape)."""
        model_output = self._run_model(model, x, t, model_kwargs)
        return self._p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return ops.predict_xstart(eps, x_t, t, self.schedule, mean_type="epsilon", **self._bk())

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        return ops.predict_xstart(xprev, x_t, t, self.schedule, mean_type="x_prev", **self._bk())

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        # Not an op (no op maps (x_t, x0) to eps; none of the ops' affine maps divides by sqrt(1/abar - 1)):
        # eps = (sqrt(1/abar) x_t - x0) / sqrt(1/abar - 1) from the device table.
        return ((self._col("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart)
                / self._col("sqrt_recipm1_alphas_cumprod", t, x_t)).to(x_t.dtype)

    # -- ancestral sampling -----------------------------------------------------------------------
    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, noise=None):
        """One step x_t -> x_{t-1}: dict sample, pred_xstart. noise: default torch.randn_like(x)."""
        model_output = self._run_model(model, x, t, model_kwargs)
        if noise is None:
            noise = torch.randn_like(x)
        if denoised_fn is None:
            return ops.p_sample_step(model_output, x, t, self.schedule, clip_denoised=clip_denoised, noise=noise,
                                     **self._kw())
        # denoised_fn: the x0 prediction goes through a user function; the fused ancestral step then takes that
        # x0 as an "x0" model's output (its posterior mean, the variance, the noise). An x_prev model's mean is
        # its own output whatever the x0: the fused step of the model output itself.
        out = self._p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)
        if self.mean_type == "x_prev":
            step_output, mean_type = model_output, "x_prev"
        else:
            c = x.shape[1]
            learned = self.var_type in LEARNED_VAR_TYPES
            step_output = torch.cat([out["pred_xstart"], model_output[:, c:]], dim=1) if learned else out["pred_xstart"]
            mean_type = "x0"
        step = ops.p_sample_step(step_output, x, t, self.schedule, clip_denoised=False, noise=noise,
                                 mean_type=mean_type, var_type=self.var_type, **self._bk())
        return {"sample": step["sample"], "pred_xstart": out["pred_xstart"]}

    def _loop_start(self, model, shape, noise, device):
        if device is None:
            device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
        if noise is not None:
            return noise, noise.device
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape: expected a tuple or list, got {type(shape).__name__}")
        return torch.randn(*shape, device=device), torch.device(device)

    def _indices(self, progress):
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        return indices

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                      device=None, progress=False, cuda_graph=False):
        """Ancestral sampling from T-1 down to 0: the final sample, ``shape``.

        cuda_graph: on CUDA, capture one step (model + fused update + its noise draw) in a torch.cuda.CUDAGraph
        and replay it per timestep (see _graph_steps); elsewhere the eager loop, with the same result."""
        final = None
        for final in self._p_sample_steps(model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device,
                                          progress, cuda_graph, copy_out=False):
            pass
        return final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  model_kwargs=None, device=None, progress=False, cuda_graph=False):
        """Yield each step's dict (sample, pred_xstart); t is built on the device (no copy). cuda_graph: as in
        p_sample_loop (each yielded dict is then a copy of the graph's output buffers)."""
        yield from self._p_sample_steps(model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device,
                                        progress, cuda_graph, copy_out=True)

    def _p_sample_steps(self, model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress,
                        cuda_graph, copy_out):
        img, device = self._loop_start(model, shape, noise, device)

        def step(x, t):
            return self.p_sample(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                 model_kwargs=model_kwargs)

        yield from self._steps(step, img, device, progress, cuda_graph, copy_out)

    def _steps(self, step, img, device, progress, cuda_graph, copy_out):
        """Yield step(x, t)'s dict (sample, pred_xstart) for t = T-1 .. 0 from x = img (t: int64 [B] on
        device): the eager loop, or with cuda_graph on a CUDA device one graph replayed per step (_graph_steps)."""
        if cuda_graph and _graph_device(img):
            yield from self._graph_steps(step, img, progress, copy_out)
            return
        for i in self._indices(progress):
            t = torch.full((img.shape[0],), i, dtype=torch.int64, device=device)
            with torch.no_grad():
                out = step(img, t)
            yield out
            img = out["sample"]

    def _graph_steps(self, step, img, progress, copy_out):
        """Yield step's dict for t = T-1 .. 0 from one CUDA graph of ``step(x, t)`` replayed per timestep.

        Static buffers: x (the current sample, img's shape and dtype: each step's sample is copied back into
        it after the replay) and t (int64 [B] on img's device, refilled in place before each replay: no host
        sync). Noise: the step's own draw (torch.randn_like on the default CUDA generator, which is
        graph-safe: each replay advances its Philox offset as one eager step does); the generator's state is
        restored after the warm-up and capture, so the replays draw what the eager loop draws. The model and
        denoised_fn must be capturable (no host sync, no CPU-GPU copy, no data-dependent control flow).
        copy_out: yield copies (the output buffers are overwritten by the next replay); else the buffers
        themselves (the last result is always a copy: it outlives the graph)."""
        device = img.device
        static_x = img.clone()
        static_t = torch.full((img.shape[0],), self.num_timesteps - 1, dtype=torch.int64, device=device)
        rng_state = torch.cuda.get_rng_state(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy loads, cached device tables and maps, allocator and cuDNN set-up
                step(static_x, static_t)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad():
            out = _capture(graph, lambda: step(static_x, static_t))
        torch.cuda.set_rng_state(rng_state, device)
        indices = self._indices(progress)
        last = len(indices) - 1
        for k, i in enumerate(indices):
            static_t.fill_(i)
            graph.replay()
            static_x.copy_(out["sample"])  # the next step's input (outside the graph: capture writes no input)
            if copy_out or k == last:  # the last one outlives the graph
                yield {name: v.clone() for name, v in out.items()}
            else:
                yield out

    # -- DDIM -----------------------------------------------------------------------------------------
    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0,
                    noise=None):
        """One DDIM step to this process's previous step: dict sample, pred_xstart."""
        model_output = self._run_model(model, x, t, model_kwargs)
        if eta != 0.0 and noise is None:
            noise = torch.randn_like(x)
        if denoised_fn is None:
            return ops.ddim_step(model_output, x, t, self.schedule, eta=eta, clip_denoised=clip_denoised,
                                 noise=noise if eta != 0.0 else None, **self._kw())
        # denoised_fn: the x0 prediction goes through a user function; the fused DDIM update then takes
        # that x0 as an "x0" model's output (no clipping: _p_mean_variance_from_output already did it).
        out = self._p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)
        step = ops.ddim_step(out["pred_xstart"], x, t, self.schedule, eta=eta, clip_denoised=False,
                             noise=noise if eta != 0.0 else None, mean_type="x0", var_type="fixed_small",
                             **self._bk())
        return {"sample": step["sample"], "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0):
        """Deterministic DDIM step x_t -> x_{t+1} (eta must be 0): dict sample, pred_xstart.

        Not an op (no fused reverse step yet: the ops step towards larger alphas_cumprod only): the fused
        p_mean_variance, then the update from the table.
        """
        if eta != 0.0:
            raise ValueError(f"eta: the reverse ODE is only defined for eta = 0, got {eta}")
        model_output = self._run_model(model, x, t, model_kwargs)
        # 16-bit inputs: x0, eps and the update in float32 (eps = (x / sqrt(abar) - x0) / sqrt(1/abar - 1)
        # would amplify a 16-bit rounding of x0 by 1 / sqrt(1/abar - 1), ~100x at t = 0), rounded once.
        xc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        out = self._p_mean_variance_from_output(model_output.to(xc.dtype), xc, t, clip_denoised, denoised_fn)
        eps = self._predict_eps_from_xstart(xc, t, out["pred_xstart"])
        abar_next = self._col("alphas_cumprod_next", t, xc)
        sample = out["pred_xstart"] * torch.sqrt(abar_next) + torch.sqrt(1 - abar_next) * eps
        return {"sample": sample.to(x.dtype), "pred_xstart": out["pred_xstart"].to(x.dtype)}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                         device=None, progress=False, eta=0.0, cuda_graph=False):
        """DDIM sampling over this process's steps: the final sample, ``shape``. cuda_graph: as in p_sample_loop
        (eta > 0 draws its noise inside the graph)."""
        final = None
        for final in self._ddim_steps(model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress,
                                      eta, cuda_graph, copy_out=False):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     model_kwargs=None, device=None, progress=False, eta=0.0, cuda_graph=False):
        """Yield each DDIM step's dict (sample, pred_xstart). cuda_graph: as in p_sample_loop_progressive."""
        yield from self._ddim_steps(model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress,
                                    eta, cuda_graph, copy_out=True)

    def _ddim_steps(self, model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, eta,
                    cuda_graph, copy_out):
        img, device = self._loop_start(model, shape, noise, device)

        def step(x, t):
            return self.ddim_sample(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                    model_kwargs=model_kwargs, eta=eta)

        yield from self._steps(step, img, device, progress, cuda_graph, copy_out)

    # -- the variational bound ---------------------------------------------------------------------
    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """The bound's term at t in bits/dim: dict output [B], pred_xstart."""
        model_output = self._run_model(model, x_t, t, model_kwargs)
        return self._vb_terms_from_output(model_output, x_start, x_t, t, clip_denoised)

    def _vb_terms_from_output(self, model_output, x_start, x_t, t, clip_denoised):
        output = ops.vb_terms_bpd(model_output, x_start, x_t, t, self.schedule, clip_denoised=clip_denoised,
                                  **self._kw())
        c = x_t.shape[1]
        mean_part = model_output[:, :c] if self.var_type in LEARNED_VAR_TYPES else model_output
        pred = ops.predict_xstart(mean_part, x_t, t, self.schedule, mean_type=self.mean_type, **self._bk())
        if clip_denoised:
            pred = pred.clamp(-1, 1)
        return {"output": output, "pred_xstart": pred}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """improved-diffusion's losses per sample: dict "loss" [B]; "mse" and (learned variance) "vb"
        for mse losses. One fused q_sample and one fused loss call around the model."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = ops.q_sample(x_start, t, noise, self.schedule, **self._bk())
        model_output = self._run_model(model, x_t, t, model_kwargs)
        terms = ops.training_losses(model_output, x_start, t, noise, self.schedule, loss_type=self.loss,
                                    **self._kw())
        if self.loss in KL_LOSS_TYPES:
            return {"loss": terms["loss"]}  # improved-diffusion returns only "loss" for the KL losses
        return dict(terms)

    def _prior_bpd(self, x_start):
        """KL(q(x_{T-1} | x_0) || N(0, I)) in bits/dim: [B]."""
        return ops.prior_bpd(x_start, self.schedule, backend=self.backend)

    prior_bpd = _prior_bpd

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None, progress=False):
        """The full bound per sample: dict total_bpd [B], prior_bpd [B], vb, xstart_mse, mse [B, T]
        (column j is t = T-1-j, as in improved-diffusion). bits/dim; noise from torch.randn_like."""
        B = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for i in self._indices(progress):
            t = torch.full((B,), i, dtype=torch.int64, device=x_start.device)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start, t, noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=clip_denoised,
                                         model_kwargs=model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        # Column j is t = T-1-j: improved-diffusion's order.
        vb = torch.stack(vb, dim=1)
        xstart_mse = torch.stack(xstart_mse, dim=1)
        mse = torch.stack(mse, dim=1)
        prior = self._prior_bpd(x_start)
        return {"total_bpd": vb.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb, "xstart_mse": xstart_mse,
                "mse": mse}


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion process that keeps only ``use_timesteps`` of the base process given by ``betas``.

    The model is called with each kept step's original timestep (``timestep_map``), rescaled by
    1000 / original_num_steps when rescale_timesteps, as in improved-diffusion's respace.py.
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(int(i) for i in use_timesteps)
        base = NoiseSchedule(kwargs["betas"])
        self.original_num_steps = base.num_timesteps
        self._base = base
        super().__init__(**kwargs)
        self.timestep_map = self.schedule.timestep_map.tolist()

    def _make_schedule(self, betas) -> NoiseSchedule:
        return self._base.respace(self.use_timesteps)


def create_gaussian_diffusion(*, steps=1000, learn_sigma=False, sigma_small=False, noise_schedule="linear",
                              use_kl=False, predict_xstart=False, rescale_timesteps=False,
                              rescale_learned_sigmas=False, timestep_respacing="", backend="auto"):
    """improved-diffusion's script_util.create_gaussian_diffusion: always a SpacedDiffusion."""
    betas = get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [steps]
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
        backend=backend,
    )
