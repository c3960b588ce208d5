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
from . import noising, posterior, sampler, solvers, vb
from ..ops import REGISTRY

_FAMILIES = (noising, posterior, sampler, solvers, vb)  # a new family module adds itself here
# every op of ddpm_fast.ops, same signature (arguments checked there): the launcher its family module defines
globals().update({name: getattr(family, name) for family in _FAMILIES for name in REGISTRY
                  if getattr(getattr(family, name, None), "__module__", None) == family.__name__})
__all__ = ["availability", *REGISTRY]


def availability(name: str = "triton"):
    """(True, '') if Triton can run here: a CUDA device is visible, or the interpreter is on."""
    import torch

    if torch.cuda.is_available():
        return True, ""
    if INTERPRET:
        return True, ""
    return False, ("no CUDA device is visible and the Triton interpreter is off (set TRITON_INTERPRET=1 before "
                   "importing ddpm_fast to run the kernels on CPU tensors, for checking only)")
