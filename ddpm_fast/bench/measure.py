"""Timing, copy bandwidth, machine load, and counting the tensor ops and host syncs of one call.

Timing: warm-up calls, then one timed call at a time, rotating over several input sets so that
no set stays in cache; CPU: time.perf_counter (monotonic); CUDA: a pair of CUDA events per call.
The implementations of one op are timed interleaved (time_interleaved): every round runs each of
them, in a rotated order, so that a change in the machine's load hits all of them alike instead of
whichever happened to be timed at that moment. While they run, LoadProbe measures how much CPU time
other processes took (Linux /proc/stat), so that a row timed on a busy machine can be flagged.
"""
from __future__ import annotations

import os
import math
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


def _time_one(fn, args, cuda: bool) -> float:
    """Milliseconds of one call fn(*args)."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1e3


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
        ms = _time_one(fn, input_sets[i % k], cuda)
        samples.append(ms)
        spent += ms / 1e3
        i += 1
        if len(samples) >= budget.max_runs or spent >= budget.max_seconds:
            break
        if len(samples) >= budget.min_runs and spent >= budget.min_seconds:
            break
    return summarize(samples)


@dataclass
class Interleaved:
    """What time_interleaved measured: one Timing per entry, the round of each of its samples
    (``rounds[i][j]`` is the round in which ``timings[i].samples_ms[j]`` was taken), the number of
    rounds and the machine load over the whole measurement."""

    timings: list
    rounds: list
    n_rounds: int
    load: "Load"


def time_interleaved(entries, device, budget: Budget) -> Interleaved:
    """Time several implementations of one op against each other, interleaved.

    ``entries``: a list of (fn, input_sets); each fn is called as fn(*input_sets[j]), rotating j
    over its own sets. After each entry's warm-up, the entries run in rounds: a round calls every
    entry, one timed call at a time, round-robin, starting with a different entry each round
    (round r starts with entry r mod n). A fast entry gets several calls per round -- as many as
    fit in one call of the slowest, at most max_runs // min_runs -- spread through the round, so
    that every entry's samples cover the same stretch of wall time. Rounds continue until every
    entry has min_runs samples and the entries together spent min_seconds each, or until they
    spent max_seconds each in total, or every entry has max_runs samples.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = len(entries)
    estimates = []
    for fn, sets in entries:
        t0, fastest = time.perf_counter(), math.inf
        for i in range(max(1, budget.warmup)):  # at least one call; slow calls get fewer warm-up calls
            sync(device)
            fastest = min(fastest, _time_one(fn, sets[i % len(sets)], cuda))
            if time.perf_counter() - t0 > budget.max_seconds / 2:
                break
        estimates.append(max(fastest, 1e-6))
    cap = max(1, budget.max_runs // max(1, budget.min_runs))
    reps = [max(1, min(cap, int(max(estimates) / e))) for e in estimates]
    samples = [[] for _ in entries]
    rounds = [[] for _ in entries]
    calls = [0] * n
    spent = 0.0
    probe = LoadProbe()
    rnd = 0
    while True:
        order = [(rnd + j) % n for j in range(n)]
        for rep in range(max(reps)):
            for i in order:
                if rep >= reps[i] or len(samples[i]) >= budget.max_runs:
                    continue
                fn, sets = entries[i]
                ms = _time_one(fn, sets[calls[i] % len(sets)], cuda)
                calls[i] += 1
                samples[i].append(ms)
                rounds[i].append(rnd)
                spent += ms / 1e3
        rnd += 1
        if spent >= budget.max_seconds * n or all(len(s) >= budget.max_runs for s in samples):
            break
        if all(len(s) >= budget.min_runs for s in samples) and spent >= budget.min_seconds * n:
            break
    return Interleaved([summarize(s) for s in samples], rounds, rnd, probe.stop())


def paired_ratio_quartiles(base: Timing, base_rounds, other: Timing, other_rounds):
    """(q1, median, q3) over rounds of median(base in that round) / median(other in that round):
    the spread of a speedup measured interleaved. None with fewer than 2 common rounds."""
    def by_round(timing, rounds):
        out = {}
        for ms, r in zip(timing.samples_ms, rounds):
            out.setdefault(r, []).append(ms)
        return {r: statistics.median(v) for r, v in out.items()}

    a, b = by_round(base, base_rounds), by_round(other, other_rounds)
    ratios = sorted(a[r] / b[r] for r in a.keys() & b.keys() if b[r] > 0)
    if len(ratios) < 2:
        return None
    q1, med, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, med, q3


# -- machine load ---------------------------------------------------------------------------
@dataclass
class Load:
    """CPU time taken by other processes while we measured, in cores (1.0 = one core busy all the
    time), including time the hypervisor gave to other guests (steal). None where unknown."""

    wall_s: float
    other_cores: float | None
    own_cores: float | None


def _machine_busy_seconds():
    """Seconds of CPU time every process (and, on a VM, steal) used since boot, from /proc/stat;
    None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    ticks = [int(x) for x in fields[1:9]]
    busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def load_between(start, end) -> Load:
    """Load from two (wall s, machine busy s or None, own CPU s) snapshots."""
    wall = max(end[0] - start[0], 1e-9)
    own = (end[2] - start[2]) / wall
    if start[1] is None or end[1] is None:
        return Load(wall, None, own)
    machine = (end[1] - start[1]) / wall
    return Load(wall, max(0.0, machine - own), own)


class LoadProbe:
    """Started on construction; stop() returns the Load since then."""

    def __init__(self):
        self.start = snapshot()

    def stop(self) -> Load:
        return load_between(self.start, snapshot())


def snapshot():
    return time.perf_counter(), _machine_busy_seconds(), _own_seconds()


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
