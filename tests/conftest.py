"""Test setup. On a machine without a GPU, Triton kernels run through the Triton interpreter, which
must be switched on before any kernel is defined, i.e. before ddpm_fast is imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """torch on one thread for the test (tiny tensors: on a busy machine the CPU kernels' OpenMP split cost
    ~19 ms a scheduler step against ~0.3 ms single-threaded); a module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_terminal_summary(terminalreporter):
    """Report how many property-based fuzz cases ran per backend (tests/test_fuzz.py)."""
    import sys

    fuzz = sys.modules.get("test_fuzz")
    if fuzz is not None and fuzz.COUNTS:
        terminalreporter.write_line(f"fuzz cases run per backend: {dict(fuzz.COUNTS)}")
