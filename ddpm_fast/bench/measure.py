"""Timing, copy bandwidth, and counting the tensor ops and host syncs of one call.

Timing: warm-up calls, then one timed call at a time, rotating over several input sets so that
no set stays in cache; CPU: time.perf_counter (monotonic); CUDA: a pair of CUDA events per call.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass(frozen=True)
class Budget:
    """How long to time one (op, implementation): warm-up calls, then runs until both minimums
    are met, or a maximum is reached (seconds are wall time spent in timed calls)."""

    warmup: int = 3
    min_runs: int = 10
    min_seconds: float = 0.3
    max_runs: int = 200
    max_seconds: float = 1.5


@dataclass
class Timing:
    """Milliseconds per call: median, quartiles (spread = IQR = q3 - q1), number of runs."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    runs: int
    samples_ms: list = field(default_factory=list, repr=False)

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms


def summarize(samples_ms) -> Timing:
    s = sorted(samples_ms)
    if len(s) >= 2:
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
    else:
        q1 = q3 = s[0]
    return Timing(statistics.median(s), q1, q3, len(s), list(samples_ms))


def sync(device: torch.device):
    """Wait for the device (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, input_sets, device, budget: Budget) -> Timing:
    """Time ``fn(*inputs)``, rotating over ``input_sets`` (a list of argument tuples)."""
    device = torch.device(device)
    k = len(input_sets)
    t0 = time.perf_counter()
    for i in range(budget.warmup):  # at least one call; slow calls get fewer warm-up calls
        fn(*input_sets[i % k])
        sync(device)
        if time.perf_counter() - t0 > budget.max_seconds / 2:
            break
    samples, spent, i = [], 0.0, 0
    cuda = device.type == "cuda"
    while True:
        args = input_sets[i % k]
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn(*args)
            ms = (time.perf_counter() - t0) * 1e3
        samples.append(ms)
        spent += ms / 1e3
        i += 1
        if len(samples) >= budget.max_runs or spent >= budget.max_seconds:
            break
        if len(samples) >= budget.min_runs and spent >= budget.min_seconds:
            break
    return summarize(samples)


def copy_bandwidth(device, nbytes: int, budget: Budget) -> tuple:
    """(GB/s, Timing) of a device-to-device copy of ``nbytes``, counting bytes read + written.
    GB/s is from the fastest run (as STREAM reports): the bandwidth the device can reach."""
    device = torch.device(device)
    n = max(1, nbytes // 4)
    srcs = [torch.empty(n, dtype=torch.float32, device=device).uniform_() for _ in range(2)]
    dst = torch.empty_like(srcs[0])
    timing = time_calls(lambda s: dst.copy_(s), [(s,) for s in srcs], device, budget)
    return 2 * n * 4 / (min(timing.samples_ms) * 1e-3) / 1e9, timing


def copy_bandwidth_at(shape, dtype, device, rotation: int, budget: Budget) -> float:
    """GB/s (read + written) of x.clone() for a tensor of ``shape`` and ``dtype``, rotating over
    ``rotation`` sources and timed like the ops (median): the copy rate at an op's own working set."""
    device = torch.device(device)
    srcs = [(torch.empty(shape, dtype=dtype, device=device).uniform_(),) for _ in range(max(1, rotation))]
    timing = time_calls(torch.clone, srcs, device, budget)
    return 2 * srcs[0][0].numel() * srcs[0][0].element_size() / (timing.median_ms * 1e-3) / 1e9


def rotation_count(set_bytes: int, device: torch.device, quick: bool) -> int:
    """How many input sets to rotate over: enough to overflow the last-level cache (~64 MB on
    CPUs, ~100 MB of L2 on GPUs), at least 2, at most 8 (or 2 under --quick)."""
    if quick:
        return 2
    target = 128 << 20 if torch.device(device).type == "cuda" else 64 << 20
    return max(2, min(8, -(-target // max(1, set_bytes))))


# -- counting ---------------------------------------------------------------------------------
_SCALAR_SYNCS = {"_local_scalar_dense", "item", "nonzero", "equal", "is_nonzero", "masked_select", "unique",
                 "_unique2", "unique_consecutive", "repeat_interleave"}
_COPIES = {"_to_copy", "copy_", "to", "_copy_from", "_copy_from_and_resize"}
_VIEWS = {"view", "_unsafe_view", "reshape", "expand", "unsqueeze", "squeeze", "slice", "select", "as_strided",
          "t", "permute", "transpose", "detach", "alias", "unbind", "split", "chunk", "lift_fresh"}


def _devices(obj, out):
    if isinstance(obj, torch.Tensor):
        out.add(obj.device.type)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _devices(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _devices(o, out)
    return out


class OpCounter(TorchDispatchMode):
    """Counts aten ops (``ops``; ``kernels`` leaves out views, which launch nothing), host syncs
    (``syncs``: .item() / _local_scalar_dense, nonzero and other data-dependent shapes, copies to
    the host from a device) and host-to-device copies (``h2d``) while active."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.kernels = 0
        self.syncs = 0
        self.h2d = 0
        self.names: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        self.ops += 1
        if name not in _VIEWS:
            self.kernels += 1
        self.names[name] = self.names.get(name, 0) + 1
        out = func(*args, **kwargs)
        if name in _SCALAR_SYNCS:
            self.syncs += 1
        elif name in _COPIES:
            src = _devices(args, set()) | _devices(kwargs, set())
            dst = _devices(out, set())
            if "cpu" in dst and src - {"cpu", "meta"}:
                self.syncs += 1
            elif "cpu" in src and dst - {"cpu", "meta"}:
                self.h2d += 1
        return out


def count_ops(fn, args) -> OpCounter:
    """Run ``fn(*args)`` once under an OpCounter and return it."""
    with OpCounter() as counter:
        fn(*args)
    return counter
