"""diffusers' schedulers as peers, called on the same inputs as the ddpm_fast ops.

- q_sample      <-> DDPMScheduler.add_noise(x0, noise, t)   (t: [B] tensor)
- p_sample_step <-> DDPMScheduler.step(eps, t, x_t) after set_timesteps(1000): fixed_small,
                    clip_sample; noise drawn by diffusers (from a seeded generator)
- ddim_step     <-> DDIMScheduler.step(eps, t, x_t, eta=0, use_clipped_model_output=True) after
                    set_timesteps(50) ("leading" spacing: the same steps as space_timesteps "ddim50")

step takes one scalar timestep for the whole batch: it is passed as the element of
scheduler.timesteps, as a sampling loop does. ``compare`` pairs a peer output with the index of
the matching ddpm_fast output (DDPM's sample has diffusers' own noise, so only pred_xstart).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cases import DDIM_STEPS, SEED, T


def available() -> tuple:
    """(True, version) if diffusers imports, else (False, why)."""
    try:
        import diffusers
    except Exception as exc:  # ImportError, or a broken install
        return False, f"diffusers not installed ({type(exc).__name__}: {exc}); pip install diffusers"
    return True, diffusers.__version__


@dataclass
class Peer:
    name: str        # what the table prints
    call: object     # call(*args, timestep) -> tuple of outputs
    compare: tuple   # ((peer output index, ddpm_fast output index), ...)
    timesteps: torch.Tensor | None = None   # scheduler.timesteps (sampler steps)
    steps: int = 0                           # len(timesteps)

    def timestep(self, t0):
        """The timestep argument diffusers expects for step index t0 (None for add_noise):
        timesteps run from the last step down, so step index t0 is element steps - 1 - t0."""
        return None if t0 is None else self.timesteps[self.steps - 1 - t0]


def make(kind: str, device) -> Peer | None:
    """The diffusers peer for a case's ``peer`` kind, or None."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind == "add_noise":
        sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear")

        def call(x0, t, noise, _ts):
            return (sched.add_noise(x0, noise, t),)

        return Peer("diffusers DDPMScheduler.add_noise", call, ((0, 0),))
    if kind == "ddpm_step":
        sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", variance_type="fixed_small",
                              clip_sample=True, prediction_type="epsilon")
        sched.set_timesteps(T, device=device)
        gen = torch.Generator(device).manual_seed(SEED)

        def call(mo, x_t, _t, _noise, ts):
            out = sched.step(mo, ts, x_t, generator=gen)
            return out.prev_sample, out.pred_original_sample

        return Peer("diffusers DDPMScheduler.step", call, ((1, 1),), sched.timesteps, T)
    if kind == "ddim_step":
        sched = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=True,
                              set_alpha_to_one=True, prediction_type="epsilon", timestep_spacing="leading")
        sched.set_timesteps(DDIM_STEPS, device=device)

        def call(mo, x_t, _t, _noise, ts):
            out = sched.step(mo, ts, x_t, eta=0.0, use_clipped_model_output=True)
            return out.prev_sample, out.pred_original_sample

        return Peer("diffusers DDIMScheduler.step", call, ((0, 0), (1, 1)), sched.timesteps, DDIM_STEPS)
    return None
