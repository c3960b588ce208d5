"""Options of the pytest-benchmark suite (run: pytest benchmarks/ --benchmark-only).

--bench-device  cpu or cuda (default: a GPU if there is one, else the CPU)
--bench-sizes   comma-separated BxCxHxW (default: those of `ddpm-fast bench` on that device)
--bench-dtypes  comma-separated dtypes (default: float32,bfloat16)
"""
import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("ddpm_fast benchmarks")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if available)")
    group.addoption("--bench-sizes", default=None, help="comma-separated BxCxHxW")
    group.addoption("--bench-dtypes", default="float32,bfloat16", help="comma-separated dtypes")


def _device(config):
    return torch.device(config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu"))


def pytest_generate_tests(metafunc):
    from ddpm_fast.bench.runner import DEFAULT_SIZES

    config = metafunc.config
    device = _device(config)
    if "size" in metafunc.fixturenames:
        spec = config.getoption("--bench-sizes") or DEFAULT_SIZES[device.type]
        sizes = [tuple(int(s) for s in w.strip().split("x")) for w in spec.split(",")]
        metafunc.parametrize("size", sizes, ids=["x".join(map(str, s)) for s in sizes])
    if "dtype" in metafunc.fixturenames:
        names = [w.strip() for w in config.getoption("--bench-dtypes").split(",")]
        metafunc.parametrize("dtype", [getattr(torch, n) for n in names], ids=names)


@pytest.fixture(scope="session")
def device(request):
    dev = _device(request.config)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: no CUDA device visible")
    return dev
