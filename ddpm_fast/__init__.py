"""ddpm_fast: fused kernels for the elementwise math of DDPM-style diffusion training and sampling.

Public API:
- NoiseSchedule (named schedules, any betas, respacing) and space_timesteps;
- the functional ops of ddpm_fast.ops, each documented with its arguments and an example:
  q_sample, q_posterior, predict_xstart, p_mean_variance, normal_kl,
  discretized_gaussian_log_likelihood, vb_terms_bpd, prior_bpd, training_losses, p_sample_step,
  ddim_step;
- improved-diffusion's classes: GaussianDiffusion, SpacedDiffusion, create_gaussian_diffusion;
  diffusers' schedulers in ddpm_fast.compat.diffusers;
- availability(): which backends ("reference", "triton", "cpu", "cuda") run here, and why not.

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
from .backends import BackendUnavailableError, availability
from .ops import (
    ddim_step,
    discretized_gaussian_log_likelihood,
    normal_kl,
    p_mean_variance,
    p_sample_step,
    predict_xstart,
    prior_bpd,
    q_posterior,
    q_sample,
    training_losses,
    vb_terms_bpd,
)
from .diffusion import GaussianDiffusion, SpacedDiffusion, create_gaussian_diffusion
from .schedule import COLUMNS, NoiseSchedule, space_timesteps

__version__ = "0.1.0"

__all__ = [
    "NoiseSchedule",
    "space_timesteps",
    "COLUMNS",
    "availability",
    "BackendUnavailableError",
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
    "GaussianDiffusion",
    "SpacedDiffusion",
    "create_gaussian_diffusion",
]
