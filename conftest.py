"""pytest setup for every path under the repository, the doctests of ddpm_fast/ included: without a
GPU, Triton kernels run through the Triton interpreter, which must be switched on before any kernel
is defined, i.e. before ddpm_fast is first imported (tests/conftest.py does the same for tests/)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
