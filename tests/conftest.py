"""Test setup. On a machine without a GPU, Triton kernels run through the Triton interpreter, which
must be switched on before any kernel is defined, i.e. before ddpm_fast is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_terminal_summary(terminalreporter):
    """Report how many property-based fuzz cases ran per backend (tests/test_fuzz.py)."""
    import sys

    fuzz = sys.modules.get("test_fuzz")
    if fuzz is not None and fuzz.COUNTS:
        terminalreporter.write_line(f"fuzz cases run per backend: {dict(fuzz.COUNTS)}")
