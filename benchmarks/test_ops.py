"""pytest-benchmark suite: every case of `ddpm-fast bench`, parametrised by op, backend, size and
dtype. Measurements, not assertions: a fused backend is checked against the reference first and
the benchmark fails if it disagrees (it is not timed); what the device cannot run is skipped.

    pytest benchmarks/ --benchmark-only [--benchmark-json out.json] [--bench-sizes 8x3x32x32]
"""
import functools
import itertools

import pytest
import torch

from ddpm_fast import backends, ops, reference
from ddpm_fast.bench import cases, check, measure, peers

IMPLS = tuple(backends.BACKENDS) + ("compile", "diffusers")
_FRESH = {}


def _skip_reason(backend, device, case):
    if backend in backends.BACKENDS:
        ok, reason = backends.availability()[backend]
        if not ok:
            return f"{backend} unavailable: {reason}"
        if backend == "triton" and device.type != "cuda":
            return "Triton on the CPU runs only in its interpreter (checked in tests/, never timed)"
        if backend in ("cpu", "cuda") and backend != device.type:
            return f"{backend} runs {backend} tensors only"
    if backend == "diffusers":
        ok, why = peers.available()
        if not ok:
            return why
        if case.peer is None:
            return f"diffusers has no equivalent of {case.name}"
    return None


def _fresh(case, size, dtype, device):
    key = (case.name, size, dtype, str(device))
    if key not in _FRESH:
        _FRESH[key] = check.fresh(case, size, dtype, device, seed=4321)
    return _FRESH[key]


@pytest.mark.parametrize("backend", IMPLS)
@pytest.mark.parametrize("op", [c.name for c in cases.CASES])
def test_op(benchmark, op, backend, size, dtype, device):
    case = cases.BY_NAME[op]
    why = _skip_reason(backend, device, case)
    if why:
        pytest.skip(why)
    gen = torch.Generator().manual_seed(0)
    first = case.inputs(size, dtype, device, gen)
    set_bytes = sum(a.numel() * a.element_size() for a in first.args if isinstance(a, torch.Tensor))
    sets = [first] + [case.inputs(size, dtype, device, gen)
                      for _ in range(measure.rotation_count(set_bytes, device, quick=False) - 1)]
    if backend == "diffusers":
        peer = peers.make(case.peer, device)
        arg_sets = [s.args + (peer.timestep(s.t0),) for s in sets]
        call = torch.no_grad()(peer.call)
    else:
        if backend == "compile":
            torch._dynamo.reset()  # one compiled variant per test: no recompile limit reached across tests
            case.schedule.table(device, reference.compute_dtype(dtype))  # cached before tracing
            fn = torch.compile(getattr(reference, case.op), dynamic=False)
        else:
            fn = functools.partial(getattr(ops, case.op), backend=backend, validate=False)
        if backend != "reference":
            res = check.check(case, fn, _fresh(case, size, dtype, device))
            if not res.ok:
                pytest.fail(f"{backend} disagrees with the reference, not timed: {res.detail}")
        arg_sets = [s.args for s in sets]

        def call(*args):
            return case.run(fn, args)

    rotation = itertools.cycle(arg_sets)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def once():
        call(*next(rotation))
        sync()

    nbytes = case.traffic(size, dtype).total
    benchmark.extra_info.update(op=op, backend=backend, size="x".join(map(str, size)), device=str(device),
                                dtype=str(dtype).replace("torch.", ""), bytes=nbytes, input_sets=len(arg_sets))
    benchmark(once)
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        benchmark.extra_info["gbps"] = nbytes / median / 1e9
