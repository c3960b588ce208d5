"""The public functional API: argument checks, then one call into the chosen backend.

Conventions for every op:
- Tensors are [B, ...] (batch first), floating point (float16, bfloat16, float32, float64), all on
  one device. Math runs in float32 (float64 for float64 inputs); elementwise outputs come back in
  the input dtype, per-sample [B] results in float32 (float64 for float64 inputs).
- t: 0-based timesteps, an integer tensor [B] on the inputs' device, or a Python int / 0-dim
  tensor meaning the same t for every sample. Values must lie in [0, T).
- validate: check t's range explicitly. Default: on for CPU tensors (free); off for CUDA tensors,
  where the check would cost a device sync -- there an out-of-range t is never read out of bounds:
  the compiled CUDA kernels and the reference's gather raise a device-side assert, the Triton kernels
  clamp t into [0, T) (and assert under TRITON_DEBUG=1). Pass validate=True to check on CUDA too.
- backend: "auto", "reference", "triton", "cpu", "cuda" or "cuda_emu" (the CUDA kernels emulated on CPU
  tensors, for checking; see ddpm_fast.backends). Inputs a backend cannot take (float64 on the GPU
  kernels, a gradient it has no kernel for) run on the reference: ddpm_fast.backends.route decides.

One module per op family (noising, model, bound, training, samplers, solvers) declares each op once
(ops._registry.register): the public function with its fakes, traffic model, bench cases, test case and
compiled adapter; a new op in an existing family is declared there only.
"""
from __future__ import annotations

from ._registry import REGISTRY, OpSpec, register  # noqa: F401
from . import noising, model, bound, training, samplers, solvers  # noqa: F401,E402  (each family registers its ops on import)

globals().update({name: spec.function for name, spec in REGISTRY.items()})  # ddpm_fast.ops.<op>, from the declarations
__all__ = list(REGISTRY)
