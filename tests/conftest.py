"""Test setup. On a machine without a GPU, Triton kernels run through the Triton interpreter, which
must be switched on before any kernel is defined, i.e. before ddpm_fast is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
