"""backend="triton": every op of ddpm_fast as fused Triton kernels, registered as torch.library ops.

Modules: noising (q_sample, prior_bpd), posterior (q_posterior, predict_xstart, normal_kl,
discretized_gaussian_log_likelihood), vb (vb_terms_bpd, training_losses), sampler (p_mean_variance,
p_sample_step, ddim_step), solvers (solver_update, the multistep samplers' step). The ops live in the
``ddpm_fast_triton`` torch.library namespace: triton_ops on a GPU (torch.compile inlines their kernels),
opaque custom ops under the interpreter; plain eager calls reach the same launchers without the
dispatcher (see _dispatch).
CUDA tensors run compiled kernels; CPU tensors run through the Triton interpreter, only when
TRITON_INTERPRET=1 was set before ddpm_fast was imported (for checking, not speed).
"""
from __future__ import annotations

try:
    import triton  # noqa: F401  (fail early, with the reason, if it is missing)
except ImportError as exc:  # pragma: no cover - backends._load reports this
    raise ImportError(f"triton is not installed ({exc})") from exc

from ._runtime import INTERPRET
from .noising import prior_bpd, q_sample
from .posterior import discretized_gaussian_log_likelihood, normal_kl, predict_xstart, q_posterior
from .sampler import ddim_step, p_mean_variance, p_sample_step
from .solvers import solver_update
from .vb import training_losses, vb_terms_bpd

from ..ops import REGISTRY

__all__ = ["availability", *REGISTRY]  # every op of ddpm_fast.ops, same signature (arguments checked there)


def availability(name: str = "triton"):
    """(True, '') if Triton can run here: a CUDA device is visible, or the interpreter is on."""
    import torch

    if torch.cuda.is_available():
        return True, ""
    if INTERPRET:
        return True, ""
    return False, ("no CUDA device is visible and the Triton interpreter is off (set TRITON_INTERPRET=1 before "
                   "importing ddpm_fast to run the kernels on CPU tensors, for checking only)")
