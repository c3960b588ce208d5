"""The benchmark cases: one per timed op, with its inputs, its call and its byte count.

A case's ``forward(fn, args)`` calls ``fn`` -- a function with the signature of the op in
ddpm_fast.reference (ops.<op> with backend= bound, or reference.<op> itself) -- and returns its
outputs as a tuple; ``run(fn, args)`` adds the gradient of the loss w.r.t. model_output for the
fwd+bwd cases. Inputs, drawn on the benchmark device: x0 uniform in [-1, 1], noise and model
outputs N(0, 1), a learned-range variance half uniform in [-1, 1], x_t = q_sample(x0, t, noise);
t uniform over the schedule's steps (one t for the whole batch in the sampler steps, as in a
sampling loop and as diffusers' step requires).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import reference, traffic
from ..ops import REGISTRY
from ..schedule import NoiseSchedule, space_timesteps

T = 1000
DDIM_STEPS = 50
SEED = 1234  # the sampler steps are timed drawing their noise from this seed


@functools.lru_cache(maxsize=None)
def schedules():
    """(the linear 1000-step schedule, its 50-step DDIM respacing)."""
    base = NoiseSchedule.named("linear", T)
    return base, base.respace(space_timesteps(T, f"ddim{DDIM_STEPS}"))


@dataclass
class Inputs:
    """Arguments of one call (a tuple, model_output first where there is one) and, for the
    sampler steps, the step index t0 shared by the batch (diffusers' step takes a scalar t)."""

    args: tuple
    t0: int | None = None


@dataclass(frozen=True)
class Case:
    name: str          # CLI name, e.g. "losses_hybrid_bwd"
    op: str            # the public op it calls
    label: str         # what the table prints
    kind: str          # "q_sample", "q_posterior", "vb", "loss", "ddpm", "ddim"
    mean_type: str = "epsilon"
    var_type: str = "fixed_small"
    backward: bool = False
    peer: str | None = None   # "add_noise", "ddpm_step", "ddim_step"
    options: dict = field(default_factory=dict)
    bytes_moved: Callable | None = field(default=None, compare=False, repr=False)  # (case, shape, dtype) -> Traffic

    # -- inputs ---------------------------------------------------------------------------
    @property
    def schedule(self) -> NoiseSchedule:
        return schedules()[1 if self.kind == "ddim" else 0]

    @property
    def shared_t(self) -> bool:
        return self.kind in ("ddpm", "ddim")

    def mo_shape(self, shape) -> tuple:
        if self.var_type in reference.LEARNED_VAR_TYPES:
            return (shape[0], 2 * shape[1], *shape[2:])
        return tuple(shape)

    def inputs(self, shape, dtype, device, gen: torch.Generator, *, per_sample_t=False) -> Inputs:
        """Fresh random inputs on ``device``, determined by ``gen`` (a CPU generator).

        Sampler steps share one t across the batch unless per_sample_t; checks ask for
        per_sample_t and always include t = 0 (the first sample)."""
        steps = self.schedule.num_timesteps
        shape = tuple(shape)
        b = shape[0]
        if self.shared_t and not per_sample_t:
            t0 = int(torch.randint(1, steps, (), generator=gen))
            t = torch.full((b,), t0, dtype=torch.int64)
        else:
            t0 = None
            t = torch.randint(0, steps, (b,), generator=gen)
            if per_sample_t:
                t[0] = 0
        t = t.to(device)
        # Draw on the device itself (GPU-sized inputs are slow to draw on the CPU), in float32, or
        # float64 for float64; every implementation then gets the same values in ``dtype``.
        dgen = torch.Generator(device).manual_seed(int(torch.randint(0, 2**62, (), generator=gen)))
        kw = {"generator": dgen, "device": device, "dtype": torch.float64 if dtype == torch.float64 else torch.float32}
        x0 = torch.rand(shape, **kw) * 2 - 1
        noise = torch.randn(shape, **kw)
        mo = torch.randn(self.mo_shape(shape), **kw)
        if self.var_type in reference.LEARNED_VAR_TYPES:
            mo[:, shape[1]:] = torch.rand((b, *shape[1:]), **kw) * 2 - 1
        x_t = reference.q_sample(x0, t, noise, self.schedule)

        def dev(x):
            return x.to(dtype=dtype)

        if self.kind == "q_sample":
            args = (dev(x0), t, dev(noise))
        elif self.kind == "q_posterior":
            args = (dev(x0), dev(x_t), t)
        elif self.kind == "vb":
            args = (dev(mo), dev(x0), dev(x_t), t)
        elif self.kind == "loss":
            args = (dev(mo).requires_grad_(True), dev(x0), t, dev(noise))
        else:
            args = (dev(mo), dev(x_t), t, dev(noise))
        return Inputs(args, t0)

    # -- calls ----------------------------------------------------------------------------
    def forward(self, fn, args, *, explicit_noise=False) -> tuple:
        """The op's outputs for ``args``. Sampler steps draw their noise from SEED unless
        explicit_noise (as checks need) or the case's "noise_given" option: then they read the noise input."""
        S = self.schedule
        if self.kind == "q_sample":
            x0, t, noise = args
            return (fn(x0, t, noise, S),)
        if self.kind == "q_posterior":
            x0, x_t, t = args
            return tuple(fn(x0, x_t, t, S))
        if self.kind == "vb":
            mo, x0, x_t, t = args
            return (fn(mo, x0, x_t, t, S, mean_type=self.mean_type, var_type=self.var_type),)
        if self.kind == "loss":
            mo, x0, t, noise = args
            out = fn(mo, x0, t, noise, S, mean_type=self.mean_type, var_type=self.var_type,
                     loss_type=self.options.get("loss_type", "mse"))
            return tuple(out[k] for k in ("loss", "mse", "vb") if k in out)
        mo, x_t, t, noise = args
        noise_kw = {"noise": noise} if explicit_noise or self.options.get("noise_given") else {"seed": SEED}
        if self.kind == "ddpm":
            out = fn(mo, x_t, t, S, mean_type=self.mean_type, var_type=self.var_type, clip_denoised=True, **noise_kw)
        else:
            out = fn(mo, x_t, t, S, eta=self.options.get("eta", 0.0), clip_denoised=True, mean_type=self.mean_type,
                     var_type=self.var_type, **noise_kw)
        return out["sample"], out["pred_xstart"]

    def run(self, fn, args, *, explicit_noise=False) -> tuple:
        """forward, plus d(sum of the loss)/d(model_output) for fwd+bwd cases."""
        out = self.forward(fn, args, explicit_noise=explicit_noise)
        if self.backward:
            return out + torch.autograd.grad(out[0].sum(), args[0])
        return out

    def output_names(self) -> tuple:
        names = {
            "q_sample": ("x_t",),
            "q_posterior": ("mean", "variance", "log_variance"),
            "vb": ("vb",),
            "loss": ("loss", "mse", "vb") if self.var_type in reference.LEARNED_VAR_TYPES else ("loss", "mse"),
            "ddpm": ("sample", "pred_xstart"),
            "ddim": ("sample", "pred_xstart"),
        }[self.kind]
        return names + (("grad_model_output",) if self.backward else ())

    # -- bytes ----------------------------------------------------------------------------
    def traffic(self, shape, dtype) -> traffic.Traffic:
        """The compulsory bytes of one call (the op's traffic model, as its bench declaration applies it)."""
        return self.bytes_moved(self, shape, dtype)


def _cases() -> tuple:
    """Every op's bench cases, declared beside the op (ddpm_fast.ops.<family>: register(bench=...))."""
    cases = []
    for spec in REGISTRY.values():
        for declared in spec.bench:
            fields = dict(declared)
            bytes_moved = fields.pop("traffic", None) or (lambda case, shape, dtype, model=spec.traffic:
                                                          model(shape, dtype))
            cases.append(Case(op=spec.name, bytes_moved=bytes_moved, **fields))
    return tuple(cases)


CASES = _cases()
BY_NAME = {c.name: c for c in CASES}


def select(spec: str | None) -> list:
    """Cases named in a comma-separated ``spec``: case names, or op names (training_losses picks
    all four loss cases). None or "all": every case."""
    if spec is None or spec.strip() in ("", "all"):
        return list(CASES)
    chosen = []
    for word in (w.strip() for w in spec.split(",")):
        if not word:
            continue
        hits = [c for c in CASES if word in (c.name, c.op)]
        if not hits:
            names = ", ".join([c.name for c in CASES] + ["training_losses"])
            raise ValueError(f"--ops: unknown op {word!r}; expected some of: {names}")
        chosen += [c for c in hits if c not in chosen]
    return chosen
