"""Sampling-loop benchmark: a 1000-step DDPM and a 50-step DDIM loop around a tiny stand-in
network (one 3x3 convolution), for each ddpm_fast backend and for diffusers' schedulers.

Reported per loop: total time, the time spent inside the network calls (timed in the loop), and
the time per step spent outside the network, (total - network) / steps, in ms. On CUDA each loop
is also captured whole as a CUDA graph and replayed (the network then timed as a graph of the same
number of calls alone); a loop with host syncs cannot be captured and is reported as such.
"""
from __future__ import annotations

import functools
import time

import torch

from .. import ops
from .cases import DDIM_STEPS, SEED, T, schedules
from .measure import LoadProbe, count_ops

LOOPS = (("ddpm", T), ("ddim", DDIM_STEPS))
COUNTED = 10  # ops and syncs per step are counted over the first 10 steps


def _net(channels, device, dtype):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(device=device, dtype=dtype)
    conv.weight.data.mul_(0.1)
    return conv.eval().requires_grad_(False)


def _ours(loop, *, backend, device, batch, run_steps):
    """loop_fn(net, x) for a ddpm_fast backend; the t tensors are made before the loop."""
    base, ddim = schedules()
    S, steps = (base, T) if loop == "ddpm" else (ddim, DDIM_STEPS)
    ts = [torch.full((batch,), i, dtype=torch.int64, device=device) for i in reversed(range(steps))][:run_steps]
    if loop == "ddpm":
        step = functools.partial(ops.p_sample_step, schedule=S, mean_type="epsilon", var_type="fixed_small",
                                 clip_denoised=True, backend=backend, validate=False)
    else:
        step = functools.partial(ops.ddim_step, schedule=S, eta=0.0, clip_denoised=True, backend=backend,
                                 validate=False)

    def run(net, x):
        for i, t in enumerate(ts):
            x = step(net(x), x, t, seed=SEED + i)["sample"]
        return x

    return run


def _diffusers(loop, *, device, run_steps):
    from diffusers import DDIMScheduler, DDPMScheduler

    if loop == "ddpm":
        sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", variance_type="fixed_small",
                              clip_sample=True)
        sched.set_timesteps(T, device=device)
        gen = torch.Generator(device).manual_seed(SEED)

        def run(net, x):
            for ts in sched.timesteps[:run_steps]:
                x = sched.step(net(x), ts, x, generator=gen).prev_sample
            return x
    else:
        sched = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=True, set_alpha_to_one=True)
        sched.set_timesteps(DDIM_STEPS, device=device)

        def run(net, x):
            for ts in sched.timesteps[:run_steps]:
                x = sched.step(net(x), ts, x, eta=0.0, use_clipped_model_output=True).prev_sample
            return x

    return run


def _net_only(steps):
    def run(net, x):
        for _ in range(steps):
            y = net(x)
        return y

    return run


class _TimedNet:
    """Wraps the network and adds up the time spent in it: perf_counter on the CPU; on CUDA a pair
    of events per call, read once after the loop (no sync inside it)."""

    def __init__(self, net, device):
        self.net, self.cuda, self.spans = net, device.type == "cuda", []

    def __call__(self, x):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y = self.net(x)
            end.record()
            self.spans.append((start, end))
        else:
            t0 = time.perf_counter()
            y = self.net(x)
            self.spans.append(time.perf_counter() - t0)
        return y

    def seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(s.elapsed_time(e) for s, e in self.spans) / 1e3
        return sum(self.spans)


def _wall(fn, net, x, device) -> float:
    """Seconds for one call of fn(net, x)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn(net, x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _graphed(fn, net, x, device) -> float:
    """Seconds for one replay of fn(net, x) captured as a CUDA graph (raises if capture fails)."""
    static_x = x.clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn(net, static_x)  # warm-up outside capture (lazy init, autotuning)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(net, static_x)
    graph.replay()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def run_loops(device, dtype, shape, impls, progress=None, max_steps=None) -> list:
    """Rows for each loop x implementation x mode. ``impls``: names of ddpm_fast backends to run,
    plus "diffusers" for the peer. Each loop is run once after a warm-up of its first COUNTED steps;
    ops and syncs per step are counted on those steps. max_steps: run only the first steps of each loop
    (a smoke run)."""
    device = torch.device(device)
    net = _net(shape[1], device, dtype)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    rows = []
    with torch.no_grad():
        for loop, full in LOOPS:
            steps = min(full, max_steps or full)
            net_fn, net_graph_s = _net_only(steps), None
            net_ops = count_ops(_net_only(COUNTED), (net, x))
            for name in impls:
                make = _diffusers if name == "diffusers" else functools.partial(_ours, backend=name, batch=shape[0])
                fn, short = make(loop, device=device, run_steps=steps), make(loop, device=device, run_steps=COUNTED)
                base = {"loop": loop, "steps": steps, "impl": name, "size": "x".join(map(str, shape)),
                        "total_ms": None, "net_ms": None, "outside_ms_per_step": None, "ops_per_step": None,
                        "syncs_per_step": None, "status": "ok", "other_load_cores": None, "reliable": None,
                        "flags": "", "unreliable_why": "",
                        "note": "" if steps == full else f"first {steps} of {full} steps only"}
                eager = dict(base, mode="eager")
                graph = dict(base, mode="cuda_graph")
                rows += [eager, graph]
                if progress is not None:
                    progress.update(1)
                try:
                    short(net, x)  # warm-up
                    timed_net = _TimedNet(net, device)
                    probe = LoadProbe()
                    total = _wall(fn, timed_net, x, device)
                    eager["other_load_cores"] = probe.stop().other_cores
                    net_s = timed_net.seconds()
                    counter = count_ops(short, (net, x))
                except Exception as exc:
                    eager.update(status="failed", note=_why(exc))
                    graph.update(status="skipped", note="the eager loop failed")
                    continue
                syncs = (counter.syncs - net_ops.syncs) / COUNTED
                eager.update(total_ms=total * 1e3, net_ms=net_s * 1e3,
                             outside_ms_per_step=(total - net_s) * 1e3 / steps,
                             ops_per_step=(counter.ops - net_ops.ops) / COUNTED, syncs_per_step=syncs)
                if device.type != "cuda":
                    graph.update(status="skipped", note="CUDA graphs need a CUDA device")
                elif syncs > 0:
                    graph.update(status="skipped", note=f"{syncs:g} host syncs per step: cannot be captured")
                else:
                    try:
                        if net_graph_s is None:
                            net_graph_s = _graphed(net_fn, net, x, device)
                        total = _graphed(fn, net, x, device)
                        graph.update(total_ms=total * 1e3, net_ms=net_graph_s * 1e3,
                                     outside_ms_per_step=(total - net_graph_s) * 1e3 / steps,
                                     ops_per_step=eager["ops_per_step"], syncs_per_step=0)
                    except Exception as exc:
                        graph.update(status="failed", note=_why(exc))
    return rows


def _why(exc) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
