"""`ddpm-fast bench --host`: the host cost of one call, and the CPU bandwidth floors.

Host overhead. On a GPU most ops of this library finish in a few microseconds, so what a user waits
for is the host: argument checks, dispatch, autograd bookkeeping, the launch. That is the same code
on the CPU, so it is measured here on tiny CPU tensors (2x3x8x8 float32, one thread), where the
arithmetic is negligible: every public op on every available backend, forward and (for the
differentiable ops) forward + backward, next to one aten op (torch.add of two such tensors) and the
peers' eager equivalents (diffusers' add_noise / get_velocity / DDPMScheduler.step /
DDIMScheduler.step on their default configs; improved-diffusion-style GaussianDiffusion
training_losses and p_sample on the reference path). Every call is timed in the same run, in blocks
of back-to-back calls, the implementations interleaved block by block; the median block gives the
per-call time, reported as a ratio to torch.add's (the ratios are what carries between machines).

Floors (bandwidth-bound sizes, same thread count): q_sample against torch.add on the same tensors in
the same rotation (two read streams, one write each: the honest ceiling of q_sample), and the seeded
p_sample_step (noise drawn in-kernel with Philox) against torch.randn_like of the same size alone.

Times are CPU time of the calling thread (time.thread_time): with one torch thread the whole call runs
there, and other processes on a shared machine do not inflate it as they do the wall clock.

Ops are called the way a user calls them (default arguments, validate included). The Triton
backend on CPU tensors runs only in its interpreter (about 1 ms a program): that is not a host
cost, so it is listed as skipped with the reason.

Triton's Python cost, kernels stubbed (a section of its own): every op of the Triton backend on the same
tiny CPU tensors with its kernel launches replaced by no-ops (ddpm_fast.triton._dispatch.stubbed_launches:
a launch only evaluates a callable grid and is counted), next to the compiled CPU path's same call in the
same rotation. What is timed is the backend's own Python: the ops' checks and routing, the wrappers'
dispatch (plain eager: straight to the launcher; with gradients, its torch.autograd.Function), output
allocation, the layout plans and launch arguments. Not timed: Triton's own launch (argument binding,
specialization, kernel cache lookup, the driver call; a few microseconds a launch on a GPU), and on a GPU
the current-device switch. The CPU path's time includes its (tiny) kernels. The Triton interpreter must be
chosen before ddpm_fast.triton is imported, so this section runs in a child process with
TRITON_INTERPRET=1 unless this one already has it.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

TINY = (2, 3, 8, 8)
FLOOR_SIZE = (64, 3, 64, 64)
QUICK_FLOOR_SIZE = (8, 3, 32, 32)
FLOOR_SETS_BYTES = 96 << 20  # rotate over enough input sets that none stays in the last-level cache


@dataclass
class Row:
    op: str                 # the op or group ("q_sample", "training_losses hybrid", "aten")
    mode: str               # "fwd" or "fwd+bwd"
    impl: str               # "torch.add", a ddpm_fast backend, or a peer's name
    kind: str               # "baseline", "floor", "backend", "peer", "skipped"
    fn: object = field(default=None, repr=False)  # zero-argument call
    note: str = ""
    samples_us: list = field(default_factory=list, repr=False)

    @property
    def us(self):
        return statistics.median(self.samples_us) if self.samples_us else None


# -- the calls ----------------------------------------------------------------------------------------
def _grad_call(forward, inputs):
    """fwd+bwd: forward(), then the gradients of its (first) output w.r.t. ``inputs`` (ones as grad)."""
    def call():
        out = forward()
        out = out if isinstance(out, torch.Tensor) else out[0]
        return torch.autograd.grad(out, inputs, torch.ones_like(out))
    return call


def _op_rows(backend: str, gen: torch.Generator) -> list:
    """Every public op on ``backend``, forward and fwd+bwd where differentiable, on tiny inputs."""
    from .. import ops
    from ..schedule import NoiseSchedule, space_timesteps

    S = NoiseSchedule.named("linear", 1000)
    S50 = S.respace(space_timesteps(1000, "ddim50"))
    B = TINY[0]

    def rnd(shape=TINY, grad=False):
        return torch.randn(shape, generator=gen).requires_grad_(grad)

    x0, noise, x_t, mo = rnd(), rnd(), rnd(), rnd()
    mo2 = torch.cat([rnd(), torch.rand(TINY, generator=gen) * 2 - 1], 1)  # learned_range: [mean, variance]
    lv = rnd((B, 1, 1, 1))
    t = torch.randint(0, 1000, (B,), generator=gen)
    t50 = torch.full((B,), 25, dtype=torch.int64)
    kw = {"backend": backend}
    hyb = dict(mean_type="epsilon", var_type="learned_range", loss_type="mse")
    rows = []

    def add(op, fwd, grad_inputs=None, note=""):
        rows.append(Row(op, "fwd", backend, "backend", fwd, note))
        if grad_inputs is not None:
            g = [a.detach().clone().requires_grad_(True) for a in grad_inputs]
            rows.append(Row(op, "fwd+bwd", backend, "backend", _grad_call(lambda: fwd(*g), g), note))

    # forward calls take the differentiable inputs as arguments so that fwd+bwd can pass leaves
    add("q_sample", lambda a=x0, b=noise: ops.q_sample(a, t, b, S, **kw), [x0, noise])
    add("q_posterior", lambda a=x0, b=x_t: ops.q_posterior(a, b, t, S, **kw)[0], [x0, x_t])
    add("predict_xstart", lambda a=mo, b=x_t: ops.predict_xstart(a, b, t, S, mean_type="epsilon", **kw), [mo, x_t])
    add("p_mean_variance", lambda: ops.p_mean_variance(mo2, x_t, t, S, mean_type="epsilon", var_type="learned_range",
                                                       clip_denoised=True, **kw)["mean"])
    add("normal_kl", lambda a=x0, b=lv, c=x_t, d=lv: ops.normal_kl(a, b, c, d, **kw), [x0, lv, x_t, lv])
    xq = (torch.rand(TINY, generator=gen) * 2 - 1)
    add("discretized_gaussian_log_likelihood",
        lambda a=x0, b=lv: ops.discretized_gaussian_log_likelihood(xq, a, b, **kw), [x0, lv])
    add("vb_terms_bpd", lambda a=mo2: ops.vb_terms_bpd(a, x0, x_t, t, S, mean_type="epsilon", var_type="learned_range",
                                                       **kw), [mo2], note="learned_range")
    add("prior_bpd", lambda a=x0: ops.prior_bpd(a, S, **kw), [x0])
    add("training_losses hybrid", lambda a=mo2: ops.training_losses(a, x0, t, noise, S, **hyb, **kw)["loss"], [mo2],
        note="epsilon, learned_range, mse + vb")
    add("training_losses mse", lambda a=mo: ops.training_losses(a, x0, t, noise, S, mean_type="epsilon",
                                                                var_type="fixed_small", loss_type="mse", **kw)["loss"],
        [mo], note="epsilon, fixed_small")
    add("p_sample_step", lambda: ops.p_sample_step(mo, x_t, t, S, mean_type="epsilon", var_type="fixed_small",
                                                   seed=7, **kw)["sample"], note="seeded, clip")
    add("ddim_step", lambda: ops.ddim_step(mo, x_t, t50, S50, **kw)["sample"], note="eta 0, clip, 50 steps")
    add("velocity", lambda: ops.velocity(x0, t, noise, S, **kw))
    from ..solvers import dpm_solver_table

    dpm_rows = dpm_solver_table(torch.tensor([14.6, 4.0, 1.0, 0.2, 0.0]), solver_order=2).fused("cpu")
    m_out, row_index = torch.empty(TINY), torch.zeros(B, dtype=torch.int64)
    add("solver_update", lambda: ops.solver_update(x_t, mo, dpm_rows, row_index, m_out, history=(x0, None, None),
                                                   **kw), note="one DPM-Solver++ 2M row")
    return rows


class _Model:
    """A stand-in network for GaussianDiffusion: returns a fixed output (host cost ~0)."""

    def __init__(self, out):
        self.out = out

    def __call__(self, x, t, **kwargs):
        return self.out


def _improved_diffusion_rows(backends: list, gen: torch.Generator) -> list:
    """improved-diffusion's API (ddpm_fast.diffusion.GaussianDiffusion) on each backend; the reference
    backend is improved-diffusion's own eager math."""
    import numpy as np

    from ..diffusion import GaussianDiffusion, get_named_beta_schedule

    rows = []
    betas = get_named_beta_schedule("linear", 1000)
    x0 = torch.randn(TINY, generator=gen)
    noise = torch.randn(TINY, generator=gen)
    t = torch.randint(0, 1000, (TINY[0],), generator=gen)
    out2 = torch.cat([torch.randn(TINY, generator=gen), torch.rand(TINY, generator=gen) * 2 - 1], 1)
    for backend in backends:
        d = GaussianDiffusion(betas=np.asarray(betas), model_mean_type="epsilon", model_var_type="learned_range",
                              loss_type="mse", backend=backend)
        mo = out2.clone().requires_grad_(True)
        model = _Model(mo)

        def loss_bwd(d=d, model=model, mo=mo):
            loss = d.training_losses(model, x0, t, noise=noise)["loss"]
            return torch.autograd.grad(loss, [mo], torch.ones_like(loss))

        rows.append(Row("GaussianDiffusion.training_losses", "fwd+bwd", backend, "backend", loss_bwd,
                        "improved-diffusion API, hybrid loss"))
        fixed = _Model(out2)
        rows.append(Row("GaussianDiffusion.p_sample", "fwd", backend, "backend",
                        lambda d=d, m=fixed: d.p_sample(m, x0, t)["sample"], "improved-diffusion API"))
    return rows


def _peer_rows(gen: torch.Generator) -> list:
    """diffusers' schedulers on their default configs, and the Fast drop-ins where they import."""
    from . import peers

    ok, why = peers.available()
    if not ok:
        return [Row("diffusers", "fwd", "diffusers", "skipped", note=why)]
    from diffusers import DDIMScheduler, DDPMScheduler

    x0, noise, mo, x_t = (torch.randn(TINY, generator=gen) for _ in range(4))
    t = torch.randint(0, 1000, (TINY[0],), generator=gen)
    classes = [("diffusers", DDPMScheduler, DDIMScheduler, "peer")]
    try:
        from ..compat.diffusers import FastDDIMScheduler, FastDDPMScheduler

        classes.append((FAST_LABEL, FastDDPMScheduler, FastDDIMScheduler, "backend"))
    except Exception as exc:  # a broken compat layer must not stop the benchmark
        print(f"host bench: ddpm_fast.compat.diffusers not timed: {type(exc).__name__}: {exc}", file=sys.stderr)
    rows = []
    for label, ddpm_cls, ddim_cls, kind in classes:
        ddpm, ddim = ddpm_cls(), ddim_cls()  # default configs (DDIM: clip_sample=True, set_alpha_to_one=True)
        ddpm.set_timesteps(1000)
        ddim.set_timesteps(50)
        ts_ddpm, ts_ddim = ddpm.timesteps[500], ddim.timesteps[25]
        g = torch.Generator().manual_seed(0)
        rows += [
            Row("add_noise", "fwd", f"{label} DDPMScheduler.add_noise", kind,
                lambda s=ddpm: s.add_noise(x0, noise, t)),
            Row("get_velocity", "fwd", f"{label} DDPMScheduler.get_velocity", kind,
                lambda s=ddpm: s.get_velocity(x0, noise, t)),
            Row("DDPMScheduler.step", "fwd", f"{label} DDPMScheduler.step", kind,
                lambda s=ddpm, ts=ts_ddpm, g=g: s.step(mo, ts, x_t, generator=g).prev_sample),
            Row("DDIMScheduler.step", "fwd", f"{label} DDIMScheduler.step", kind,
                lambda s=ddim, ts=ts_ddim: s.step(mo, ts, x_t).prev_sample),
        ]
    return rows


def plan(device_type: str = "cpu", seed: int = 0) -> list:
    """Every row to time (kind "skipped" rows carry the reason in note)."""
    from .. import backends

    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(TINY, generator=gen), torch.randn(TINY, generator=gen)
    rows = [Row("aten", "fwd", "torch.add", "baseline", lambda: torch.add(a, b))]
    # the autograd floor: one aten op forward and backward the way every fwd+bwd row is timed (_grad_call); no
    # differentiable call can cost less (torch.autograd.grad's own engine and Python cost it alone)
    leaf = a.clone().requires_grad_(True)
    rows.append(Row("aten mul (autograd floor)", "fwd+bwd", "torch.mul", "floor",
                    _grad_call(lambda: torch.mul(leaf, b), [leaf])))
    runnable = []
    for name, (ok, reason) in backends.availability().items():
        if not ok:
            rows.append(Row("all ops", "fwd", name, "skipped", note=reason))
        elif name == "triton" and device_type == "cpu":
            rows.append(Row("all ops", "fwd", name, "skipped",
                            note="on CPU tensors Triton runs only in its interpreter (~1 ms a program): "
                                 "not a host cost; checked in tests/"))
        elif name == "cuda_emu":
            rows.append(Row("all ops", "fwd", name, "skipped",
                            note="emulated CUDA: each launch runs the kernels on CPU fibers, so its time is not "
                                 "the host cost of a GPU call; checked in tests/"))
        elif name in ("reference", device_type):
            runnable.append(name)
    for name in runnable:
        rows += _op_rows(name, gen)
    rows += _improved_diffusion_rows(runnable, gen)
    rows += _peer_rows(gen)
    return rows


# -- timing -----------------------------------------------------------------------------------------
# The clock: CPU time of the calling thread. With one torch thread every call here runs on it (the CPU
# autograd engine runs the backward on the caller too), and time other processes take on a shared machine
# is not counted: on 2 cores beside 4 other jobs the wall clock of a 5 ms block varied 3x, this 10-20%.
CLOCK = time.thread_time


def _block(fn, n: int) -> float:
    """Microseconds (CPU time of this thread) per call of n back-to-back calls."""
    t0 = CLOCK()
    for _ in range(n):
        fn()
    return (CLOCK() - t0) * 1e6 / n


def time_rows(rows: list, *, rounds: int, block_s: float) -> None:
    """Fill each runnable row's samples_us: ``rounds`` blocks of about ``block_s`` seconds each, the rows
    interleaved (each round visits every row once, starting one row further on)."""
    live = [r for r in rows if r.kind != "skipped"]
    counts = []
    for r in live:  # warm up (first-call caches, autograd graph set-up), then size the block
        for _ in range(3):
            r.fn()
        est = _block(r.fn, 5)
        counts.append(max(3, int(block_s * 1e6 / max(est, 0.05))))
    for k in range(rounds):
        for j in range(len(live)):
            i = (j + k) % len(live)
            live[i].samples_us.append(_block(live[i].fn, counts[i]))


def round_ratio(row: Row, base: Row) -> float:
    """Median over rounds of row's time / base's time in the same round (a slow round slows both)."""
    return statistics.median(a / b for a, b in zip(row.samples_us, base.samples_us, strict=True))


# -- floors -----------------------------------------------------------------------------------------
def _rotate_pairs(fn_a, fn_b, sets, rounds):
    """Median seconds per call of fn_a(*s) and fn_b(*s), alternating on the same input set s."""
    ta, tb = [], []
    for r in range(rounds):
        order = ((fn_a, ta), (fn_b, tb)) if r % 2 == 0 else ((fn_b, tb), (fn_a, ta))
        for s in sets:
            for fn, acc in order:
                t0 = CLOCK()
                fn(*s)
                acc.append(CLOCK() - t0)
    return statistics.median(ta), statistics.median(tb)


def floors(*, quick: bool, seed: int = 0) -> list:
    """The CPU bandwidth floors against their ceilings (backend "cpu"); [] when it is unavailable."""
    from .. import backends, ops
    from ..schedule import NoiseSchedule

    if not backends.availability()["cpu"][0]:
        return []
    shape = QUICK_FLOOR_SIZE if quick else FLOOR_SIZE
    gen = torch.Generator().manual_seed(seed)
    S = NoiseSchedule.named("linear", 1000)
    nbytes = 4 * torch.Size(shape).numel()
    nsets = 2 if quick else max(2, -(-FLOOR_SETS_BYTES // (2 * nbytes)))
    sets = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen),
             torch.randint(0, 1000, (shape[0],), generator=gen)) for _ in range(nsets)]
    rounds = 3 if quick else 15
    size = "x".join(map(str, shape))
    for a, b, t in sets[:1]:  # warm up (page the allocator's pools in)
        for _ in range(3):
            torch.add(a, b), ops.q_sample(a, t, b, S, backend="cpu"), torch.randn_like(a)
    t_add, t_q = _rotate_pairs(lambda a, b, t: torch.add(a, b),
                               lambda a, b, t: ops.q_sample(a, t, b, S, backend="cpu"), sets, rounds)
    step = dict(mean_type="epsilon", var_type="fixed_small", seed=11, backend="cpu")
    for a, b, t in sets[:1]:
        ops.p_sample_step(a, b, t, S, **step)
    t_rand, t_step = _rotate_pairs(lambda a, b, t: torch.randn_like(b),
                                   lambda a, b, t: ops.p_sample_step(a, b, t, S, **step), sets, rounds)
    return [
        {"floor": "q_sample vs torch.add (same tensors, same rotation)", "size": size, "input_sets": nsets,
         "ceiling": "torch.add", "ceiling_us": t_add * 1e6, "op_us": t_q * 1e6, "ratio": t_add / t_q,
         "target": ">= 0.90"},
        {"floor": "p_sample_step seeded (in-kernel Philox) vs torch.randn_like alone", "size": size,
         "input_sets": nsets, "ceiling": "torch.randn_like", "ceiling_us": t_rand * 1e6, "op_us": t_step * 1e6,
         "ratio": t_rand / t_step, "target": ">= 1.00"},
    ]


# -- Triton's Python cost, kernels stubbed ------------------------------------------------------------
# the calls issue 17 sets a target for: stubbed Triton <= 2x the compiled path
TRITON_TARGETS = {("q_sample", "fwd"), ("p_sample_step", "fwd"), ("training_losses hybrid", "fwd"),
                  ("training_losses mse", "fwd"), ("q_sample", "fwd+bwd"), ("training_losses hybrid", "fwd+bwd"),
                  ("training_losses mse", "fwd+bwd")}
STUBBED = "triton (stubbed)"


def _stubbed_rows_here(*, quick: bool, seed: int) -> list:
    """The stubbed Triton rows and the compiled CPU rows, timed in this process (TRITON_INTERPRET=1)."""
    from .. import backends
    from ..triton import _dispatch

    rows = _op_rows("triton", torch.Generator().manual_seed(seed))
    for r in rows:
        r.impl = STUBBED
    cpu = _op_rows("cpu", torch.Generator().manual_seed(seed)) if backends.available("cpu") else []
    rounds, block_s = (3, 0.002) if quick else (21, 0.005)
    with _dispatch.stubbed_launches() as stub:
        launches = []
        for r in rows:
            before = stub.launches
            r.fn()
            launches.append(stub.launches - before)
        time_rows(rows + cpu, rounds=rounds, block_s=block_s)
    by_call = {(r.op, r.mode): r for r in cpu}
    out = []
    for r, n in zip(rows, launches):
        base = by_call.get((r.op, r.mode))
        out.append({"op": r.op, "mode": r.mode, "note": r.note, "launches": n, "triton_us": r.us,
                    "cpu_us": base.us if base else None,
                    "x_cpu": round_ratio(r, base) if base else None,
                    "target": "<= 2" if (r.op, r.mode) in TRITON_TARGETS else None})
    return out


def triton_stubbed(*, quick: bool, seed: int = 0, threads: int = 1) -> dict:
    """{"rows": [...], "skipped": None} with the stubbed Triton section's rows, or {"rows": [], "skipped": why}.

    Runs here if ddpm_fast.triton was (or will be) imported with the interpreter on, else in a child process
    with TRITON_INTERPRET=1 (this module run as a script)."""
    from .. import backends

    ok, why = backends.availability()["triton"]
    if not ok and "interpreter" not in why:
        return {"rows": [], "skipped": why}
    if os.environ.get("TRITON_INTERPRET") == "1" and ok:
        from ..triton import _runtime

        if _runtime.INTERPRET:
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                return {"rows": _stubbed_rows_here(quick=quick, seed=seed), "skipped": None}
            finally:
                torch.set_num_threads(old)
    cmd = [sys.executable, "-m", "ddpm_fast.bench.host", "--triton-stubbed", "--seed", str(seed),
           "--threads", str(threads)] + (["--quick"] if quick else [])
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        return {"rows": [], "skipped": f"the child process failed: {proc.stderr.strip()[-2000:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the run and its table --------------------------------------------------------------------------
def run(*, quick: bool = False, threads: int = 1, seed: int = 0, with_floors: bool = True,
        with_triton: bool = True) -> dict:
    """Time every row, then the floors, then Triton's stubbed section; returns {"meta", "rows", "floors",
    "triton_stubbed"} (JSON-ready)."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        rows = plan("cpu", seed)
        rounds, block_s = (3, 0.002) if quick else (21, 0.005)
        time_rows(rows, rounds=rounds, block_s=block_s)
        fl = floors(quick=quick, seed=seed) if with_floors else []
    finally:
        torch.set_num_threads(old_threads)
    stubbed = triton_stubbed(quick=quick, seed=seed, threads=threads) if with_triton else None
    add = next(r for r in rows if r.kind == "baseline")
    ref = {(r.op, r.mode): r for r in rows if r.impl == "reference" and r.us}

    out = []
    for r in rows:
        d = {"op": r.op, "mode": r.mode, "impl": r.impl, "kind": r.kind, "note": r.note,
             "us_per_call": r.us, "x_torch_add": None, "x_reference": None, "blocks": len(r.samples_us),
             "spread_us": (max(r.samples_us) - min(r.samples_us)) if r.samples_us else None}
        if r.us is not None:
            d["x_torch_add"] = round_ratio(r, add)
            if (r.op, r.mode) in ref:
                d["x_reference"] = round_ratio(r, ref[(r.op, r.mode)])
        out.append(d)
    meta = {"what": "host time per call", "clock": "time.thread_time (CPU time of the calling thread)", "size": "x".join(map(str, TINY)), "dtype": "float32", "threads": threads,
            "rounds": rounds, "block_s": block_s, "quick": quick, "torch": torch.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "elapsed_s": time.perf_counter() - started}
    return {"meta": meta, "rows": out, "floors": fl, "targets": targets(rows, ref), "triton_stubbed": stubbed}


# the implementation label of the Fast drop-ins' rows ("<label> <Class>.<method>", beside diffusers' own)
FAST_LABEL = "ddpm_fast Fast"
# the losses whose fwd+bwd issue 17 bounds against the reference's
LOSS_TARGETS = ("training_losses hybrid", "training_losses mse")


def targets(rows: list, ref: dict) -> list:
    """Issue 17's compiled-path targets with their measured ratios (the median over rounds of the ratio within a
    round): q_sample against torch.add, the losses' fwd+bwd against the reference's (beside the autograd floor:
    torch.mul's fwd+bwd against that reference, the lowest ratio any differentiable call reaches), every Fast
    scheduler method against its diffusers parent. [] when the compiled path or the reference did not run."""
    from .. import backends

    compiled = next((name for name in ("cuda", "cpu") if any(r.impl == name and r.us for r in rows)), None)
    if compiled is None or not backends.available(compiled):
        return []
    by_key = {(r.op, r.mode, r.impl): r for r in rows if r.us}
    add = next(r for r in rows if r.kind == "baseline")
    floor = next(r for r in rows if r.kind == "floor")
    out = []
    q = by_key.get(("q_sample", "fwd", compiled))
    if q is not None:
        out.append({"target": f"q_sample fwd, {compiled}", "of": "torch.add", "ratio": round_ratio(q, add),
                    "bound": 4.0, "floor": None})
    for op in LOSS_TARGETS:
        ours, base = by_key.get((op, "fwd+bwd", compiled)), ref.get((op, "fwd+bwd"))
        if ours is not None and base is not None:
            out.append({"target": f"{op} fwd+bwd, {compiled}", "of": "reference", "ratio": round_ratio(ours, base),
                        "bound": 0.25, "floor": round_ratio(floor, base)})
    parents = {r.impl.split(" ", 1)[1]: r for r in rows if r.kind == "peer" and r.us}  # by "Class.method"
    for r in rows:
        if r.kind == "backend" and r.impl.startswith(FAST_LABEL + " ") and r.us:
            method = r.impl[len(FAST_LABEL) + 1:]
            if method in parents:
                out.append({"target": f"Fast{method}", "of": "diffusers", "ratio": round_ratio(r, parents[method]),
                            "bound": 0.5, "floor": None})
    return out


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(results: dict) -> str:
    m = results["meta"]
    lines = [f"host time per call: {m['size']} {m['dtype']}, {m['threads']} thread(s), median of {m['rounds']} "
             f"interleaved blocks of ~{m['block_s'] * 1e3:.0f} ms, thread CPU time; x add = / torch.add, x ref = / the reference "
             "backend's same call (each the median over rounds of the ratio within a round)",
             f"{'op':<36} {'mode':<8} {'implementation':<40} {'us/call':>9} {'x add':>7} {'x ref':>6}  note"]
    for r in results["rows"]:
        if r["kind"] == "skipped":
            lines.append(f"{r['op']:<36} {'':<8} {r['impl']:<40} {'skipped':>9} {'':>7} {'':>6}  {r['note']}")
            continue
        lines.append(f"{r['op']:<36} {r['mode']:<8} {r['impl']:<40} {_fmt(r['us_per_call'], '9.1f')} "
                     f"{_fmt(r['x_torch_add'], '7.2f')} {_fmt(r['x_reference'], '6.2f')}  {r['note']}")
    if results.get("targets"):
        lines += ["", "issue 17's targets on the compiled path: ratio = / the baseline's same call (median over rounds "
                      "of the ratio within a round); floor = the autograd floor's ratio (torch.mul fwd+bwd / that "
                      "baseline)",
                  f"{'target':<52} {'baseline':<10} {'ratio':>6} {'bound':>6} {'floor':>6}  met"]
        for t in results["targets"]:
            met = "yes" if t["ratio"] <= t["bound"] else "no"
            lines.append(f"{t['target']:<52} {t['of']:<10} {t['ratio']:6.2f} {t['bound']:6.2f} "
                         f"{_fmt(t['floor'], '6.2f')}  {met}")
    if results["floors"]:
        lines += ["", f"CPU bandwidth floors ({m['threads']} thread(s)): ratio = ceiling time / op time",
                  f"{'floor':<66} {'size':<11} {'ceiling us':>10} {'op us':>9} {'ratio':>6}  target"]
        for f in results["floors"]:
            lines.append(f"{f['floor']:<66} {f['size']:<11} {f['ceiling_us']:10.1f} {f['op_us']:9.1f} "
                         f"{f['ratio']:6.2f}  {f['target']}")
    stubbed = results.get("triton_stubbed")
    if stubbed is not None:
        lines += ["", "Triton's Python cost, kernels stubbed (each launch a counted no-op; Triton's own launch "
                      "not included): x cpu = / the compiled CPU path's same call, same rotation"]
        if stubbed["skipped"]:
            lines.append(f"skipped: {stubbed['skipped']}")
        else:
            lines.append(f"{'op':<36} {'mode':<8} {'launches':>8} {'triton us':>10} {'cpu us':>9} {'x cpu':>6}  target")
            for r in stubbed["rows"]:
                lines.append(f"{r['op']:<36} {r['mode']:<8} {r['launches']:8d} {_fmt(r['triton_us'], '10.1f')} "
                             f"{_fmt(r['cpu_us'], '9.1f')} {_fmt(r['x_cpu'], '6.2f')}  {r['target'] or ''}")
    return "\n".join(lines)


def main(args) -> int:
    """The `ddpm-fast bench --host` command, with the bench parser's args (quick, threads, out, seed)."""
    threads = args.threads if getattr(args, "threads", None) else 1
    results = run(quick=args.quick, threads=threads, seed=args.seed)
    print(table(results))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "host.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {path}; {results['meta']['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":  # the stubbed Triton section's child process: one JSON line on stdout
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--triton-stubbed", action="store_true", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    cli = parser.parse_args()
    print(json.dumps(triton_stubbed(quick=cli.quick, seed=cli.seed, threads=cli.threads)))
