"""Shared helpers for the cross-backend tests: which backends run here, and one valid call per op.

A "case" calls a public op with small valid inputs that a test may override one at a time.
"""
from __future__ import annotations

import torch

import ddpm_fast as F

SCHEDULE = F.NoiseSchedule.named("linear", 100)


def backends_here():
    """Backends that can run on this machine's tensors: CPU ones always, CUDA ones with a GPU."""
    names = []
    for name, (ok, _) in F.availability().items():
        if not ok:
            continue
        if name == "cuda" and not torch.cuda.is_available():
            continue
        names.append(name)
    return names


def device_for(backend: str) -> str:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def inputs(B=2, C=3, spatial=(4,), dtype=torch.float32, device="cpu", learned=True, seed=0):
    """Valid inputs: x0 in [-1, 1], noise, x_t, model_output (doubled channels when learned), eps, t."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, C, *spatial)
    x0 = (torch.rand(shape, generator=g) * 2 - 1).to(dtype).to(device)
    noise = torch.randn(shape, generator=g).to(dtype).to(device)
    x_t = torch.randn(shape, generator=g).to(dtype).to(device)
    mo_shape = (B, 2 * C, *spatial) if learned else shape
    mo = (torch.randn(mo_shape, generator=g) * 0.5).to(dtype).to(device)
    t = torch.randint(0, SCHEDULE.num_timesteps, (B,), generator=g).to(device)
    eps = torch.randn(shape, generator=g).to(dtype).to(device)  # a mean-only model output
    return dict(x0=x0, noise=noise, x_t=x_t, model_output=mo, eps=eps, t=t)


OPS = {
    "q_sample": lambda a, **kw: F.q_sample(a["x0"], a["t"], a["noise"], SCHEDULE, **kw),
    "q_posterior": lambda a, **kw: F.q_posterior(a["x0"], a["x_t"], a["t"], SCHEDULE, **kw),
    "predict_xstart": lambda a, **kw: F.predict_xstart(a["eps"], a["x_t"], a["t"],
                                                       SCHEDULE, mean_type="epsilon", **kw),
    "p_mean_variance": lambda a, **kw: F.p_mean_variance(a["model_output"], a["x_t"], a["t"], SCHEDULE,
                                                         mean_type="epsilon", var_type="learned_range", **kw),
    "vb_terms_bpd": lambda a, **kw: F.vb_terms_bpd(a["model_output"], a["x0"], a["x_t"], a["t"], SCHEDULE,
                                                   mean_type="epsilon", var_type="learned_range", **kw),
    "prior_bpd": lambda a, **kw: F.prior_bpd(a["x0"], SCHEDULE, **{k: v for k, v in kw.items() if k != "validate"}),
    "training_losses": lambda a, **kw: F.training_losses(a["model_output"], a["x0"], a["t"], a["noise"], SCHEDULE,
                                                         mean_type="epsilon", var_type="learned_range",
                                                         loss_type="mse", **kw),
    "p_sample_step": lambda a, **kw: F.p_sample_step(a["model_output"], a["x_t"], a["t"], SCHEDULE,
                                                     mean_type="epsilon", var_type="learned_range",
                                                     noise=a["noise"], **kw),
    "ddim_step": lambda a, **kw: F.ddim_step(a["model_output"], a["x_t"], a["t"], SCHEDULE, eta=0.5,
                                             var_type="learned_range", noise=a["noise"], **kw),
}
# Which named inputs each op reads (so a bad-input case applies only where it means something).
READS = {
    "q_sample": ("x0", "noise", "t"),
    "q_posterior": ("x0", "x_t", "t"),
    "predict_xstart": ("eps", "x_t", "t"),
    "p_mean_variance": ("model_output", "x_t", "t"),
    "vb_terms_bpd": ("model_output", "x0", "x_t", "t"),
    "prior_bpd": ("x0",),
    "training_losses": ("model_output", "x0", "noise", "t"),
    "p_sample_step": ("model_output", "x_t", "noise", "t"),
    "ddim_step": ("model_output", "x_t", "noise", "t"),
}


def flatten(out):
    """Every tensor of an op's result, in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return list(out)
