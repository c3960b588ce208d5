"""pytest-benchmark: the host cost per call of every op on every available backend, next to torch.add
and the peers (the rows of `ddpm-fast bench --host`, see ddpm_fast/bench/host.py): tiny 2x3x8x8
float32 CPU tensors, one thread. Measurements, not assertions; compare a row's median with the
torch.add row of the same run.

    pytest benchmarks/test_host.py --benchmark-only [--benchmark-json host.json]
"""
import pytest
import torch

from ddpm_fast.bench import host

ROWS = host.plan("cpu")


def _id(row):
    return f"{row.op}-{row.mode}-{row.impl}".replace(" ", "_")


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("row", ROWS, ids=[_id(r) for r in ROWS])
def test_host(benchmark, row, one_thread):
    if row.kind == "skipped":
        pytest.skip(f"{row.impl}: {row.note}")
    benchmark.extra_info.update(op=row.op, mode=row.mode, impl=row.impl, kind=row.kind,
                                size="x".join(map(str, host.TINY)), threads=1, note=row.note)
    benchmark(row.fn)
