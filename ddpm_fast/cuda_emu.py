"""Backend "cuda_emu": the CUDA kernels (csrc/cuda/kernels.cu) and the op families' CUDA host path
(csrc/ops/host.h), run on CPU tensors through an emulation of the CUDA execution model (csrc/cuda/emu/cuda_emu.h).

For checking without a GPU: it proves launch geometry, indexing, block reductions, barriers, Philox
offsets and operand plumbing (and runs under the sanitizers), not speed. Built on first use when
``DDPM_FAST_CUDA_EMU=1`` (ddpm_fast._build.load_emu); its ops are torch.ops.ddpm_fast_emu, a library
loaded beside ddpm_fast._C. Results equal the "cpu" backend's to float32 rounding; float64 inputs run
on the reference path, as on "cuda" (ddpm_fast.backends.CAPABILITIES["cuda_emu"]).

This module is ddpm_fast/native.py's code run a second time with OPS_NAMESPACE = "ddpm_fast_emu", so the
two backends share every line of Python (argument plumbing, the registration of the ops' fakes, the routed
ops and ``kernels``).
"""
from pathlib import Path as _Path

OPS_NAMESPACE = "ddpm_fast_emu"
_doc = __doc__
_native_source = _Path(__file__).with_name("native.py")
exec(compile(_native_source.read_text(), str(_native_source), "exec"), globals())  # noqa: S102
__doc__ = _doc  # native.py's code set its own docstring
del _doc
