"""ddpm_fast: fused kernels for the elementwise math of DDPM-style diffusion training and sampling.

Public API:
- NoiseSchedule (named schedules, any betas, respacing) and space_timesteps;
- the functional ops of ddpm_fast.ops (ops.__all__), each documented with its arguments and an example;
- improved-diffusion's classes: GaussianDiffusion, SpacedDiffusion, create_gaussian_diffusion;
  diffusers' schedulers in ddpm_fast.compat.diffusers;
- availability(): which backends (ddpm_fast.backends.BACKENDS) run here, and why not.

Example, one training step's loss and one sampling step:

>>> import torch, ddpm_fast as F
>>> schedule = F.NoiseSchedule.named("cosine", 1000)
>>> x0 = torch.rand(4, 3, 8, 8) * 2 - 1
>>> t, noise = torch.randint(0, 1000, (4,)), torch.randn(4, 3, 8, 8)
>>> x_t = F.q_sample(x0, t, noise, schedule)
>>> model_output = torch.randn(4, 3, 8, 8, requires_grad=True)  # stands in for model(x_t, t)
>>> F.training_losses(model_output, x0, t, noise, schedule)["loss"].mean().backward()
>>> x_prev = F.p_sample_step(model_output.detach(), x_t, t, schedule, seed=0)["sample"]
>>> x_prev.shape
torch.Size([4, 3, 8, 8])
"""
from . import ops
from .backends import BackendUnavailableError, availability
from .ops import *  # noqa: F401,F403  (every registered op: ops.__all__)
from .diffusion import GaussianDiffusion, SpacedDiffusion, create_gaussian_diffusion
from .schedule import COLUMNS, NoiseSchedule, space_timesteps

__version__ = "0.1.0"

__all__ = [
    "NoiseSchedule",
    "space_timesteps",
    "COLUMNS",
    "availability",
    "BackendUnavailableError",
    *ops.__all__,
    "GaussianDiffusion",
    "SpacedDiffusion",
    "create_gaussian_diffusion",
]
