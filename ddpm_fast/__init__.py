"""ddpm_fast: fused kernels for the elementwise math of DDPM-style diffusion training and sampling.

Public API: NoiseSchedule, space_timesteps, and the functional ops of ddpm_fast.ops.
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
