"""`ddpm-fast selftest`: everything worth knowing about a machine in one run.

Meant as the first command on a newly lent GPU machine (a few minutes on one GPU): it builds the
extension, checks every op on every fused backend of the device against the reference at fp32 /
fp16 / bf16 in contiguous, channels_last and sliced layouts, captures and replays every op and both
sampling loops in CUDA graphs, runs the loops with host syncs forbidden, repeats the checks on a
second GPU, runs the quick benchmark and the ahead-of-time compiles, then writes one JSON file and a
short text summary under --out. On a machine without a GPU it runs what it can (the cpu and
cuda_emu backends, the ahead-of-time compiles) and lists every GPU stage as skipped with the reason.
The exit code is 0 when no stage failed.

    ddpm-fast selftest                 # every stage this machine can run
    ddpm-fast selftest --dry-run       # the stages, what each needs, and its time budget
    ddpm-fast selftest --skip aot      # leave stages out (comma-separated names)
"""
from __future__ import annotations

import argparse
import datetime
import functools
import inspect
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "channels_last", "sliced")


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int    # time budget on one H100/H200 with a cold build cache and 2 build cores
    needs_gpu: bool
    what: str


STAGES = (
    Stage("build", 210, False, "build the compiled extension (the local GPU arch only) and list the backends"),
    Stage("ops", 60, False, "every op on every fused backend vs the reference: fp32/fp16/bf16, contiguous, "
                            "channels_last and sliced inputs, plus a capped fuzz of shapes; the seeded draws "
                            "vs the noise stream's float64 definition"),
    Stage("graphs", 30, True, "capture every op, both sampling loops and the drop-in multistep schedulers' "
                              "loops in a CUDA graph (seed, seed=None, generator=) and replay them"),
    Stage("sync_free", 15, True, "both sampling loops and the drop-in multistep schedulers' loops under "
                                 "torch.cuda.set_sync_debug_mode('error')"),
    Stage("second_gpu", 20, True, "the ops stage (fp32) on cuda:1 (needs a second GPU)"),
    Stage("bench", 45, True, "ddpm-fast bench --device cuda --quick"),
    Stage("samplers", 25, True, "ddpm-fast bench --samplers --device cuda --quick (solver drop-ins vs parents)"),
    Stage("e2e", 15, True, "ddpm-fast bench --e2e --quick: real U-Nets trained and sampled both ways; the loss "
                           "curves of the eager and fused ways must agree"),
    Stage("aot", 60, False, "Triton kernels compiled for sm_80/sm_90 (registers, no spills); on a CPU-only "
                            "machine also csrc/cuda with nvcc's ptxas report"),
)
BY_NAME = {s.name: s for s in STAGES}


class StageSkipped(Exception):
    """A stage that cannot run on this machine; the message says why."""


# -- inputs in each layout --------------------------------------------------------------------------
def relayout(x, layout: str):
    """``x`` (a [B, C, H, W] tensor, or anything else, returned as is) as a new leaf tensor with the same
    values in ``layout``: contiguous, channels_last, or sliced (every other column of a twice-wide buffer,
    so no dim is dense). requires_grad is kept."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        return x
    data = x.detach()
    if layout == "contiguous":
        out = data.contiguous().clone()
    elif layout == "channels_last":
        out = data.clone().contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        wide = torch.zeros((*data.shape[:-1], 2 * data.shape[-1]), dtype=data.dtype, device=data.device)
        wide[..., ::2] = data
        out = wide[..., ::2]
    else:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return out.requires_grad_(x.requires_grad)


def _fused_backends(device: torch.device) -> tuple[list[str], dict]:
    """(fused backends that run tensors on ``device``, {backend: why not} for those that cannot)."""
    from .backends import availability

    wanted = ("cuda", "triton") if device.type == "cuda" else ("cpu", "cuda_emu")
    avail = availability()
    ok, why = [], {}
    for name in wanted:
        if name not in avail:
            why[name] = "not a backend of this version"
        elif avail[name][0]:
            ok.append(name)
        else:
            why[name] = avail[name][1]
    return ok, why


def _shapes(device: torch.device, fuzz: int, seed: int) -> list[tuple]:
    """Fixed shapes (one spanning several GPU blocks) and ``fuzz`` random ones, all [B, C, H, W]."""
    fixed = [(3, 3, 8, 8), (2, 3, 64, 72)] if device.type == "cuda" else [(3, 3, 8, 8), (2, 3, 40, 41)]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(fuzz):
        b, c, h, w = (int(torch.randint(lo, hi, (), generator=gen)) for lo, hi in ((1, 6), (1, 5), (1, 17), (1, 17)))
        fixed.append((b, c, h, w))
    return fixed


def check_ops(device: torch.device, backends, *, dtypes=DTYPES, layouts=LAYOUTS, fuzz=4, seed=0) -> dict:
    """Every bench case x backend x dtype x layout x shape against the reference (bench.check's rule);
    {checked, failures: [str]}. Seeded sampler steps must also give the same sample in every layout."""
    from . import ops
    from .bench import cases, check

    failures, checked = [], 0
    for shape in _shapes(device, fuzz, seed):
        for dtype in dtypes:
            for case in cases.CASES:
                data = check.fresh(case, shape, dtype, device, seed)
                for backend in backends:
                    fn = functools.partial(getattr(ops, case.op), backend=backend)
                    seeded = {}
                    for layout in layouts:
                        checked += 1
                        where = f"{case.name} {backend} {str(dtype)[6:]} {layout} {'x'.join(map(str, shape))}"
                        args = tuple(relayout(a, layout) for a in data.args)
                        try:
                            outs = case.run(fn, args, explicit_noise=True)
                            if case.kind in ("ddpm", "ddim"):
                                seeded[layout] = case.forward(fn, tuple(relayout(a, layout) for a in data.args))[0]
                        except Exception as exc:  # noqa: BLE001 -- reported as a failure of this case
                            failures.append(f"{where}: raised {type(exc).__name__}: {str(exc)[:200]}")
                            continue
                        x = args[1] if case.kind in ("vb", "loss") else args[0]
                        res = check.compare(case, outs, data.ref64, data.refd, reduced=math.prod(x.shape[1:]))
                        if not res.ok:
                            failures.append(f"{where}: {res.detail}")
                    first = seeded.get("contiguous")
                    for layout, sample in seeded.items():
                        if first is not None and not torch.allclose(sample.float(), first.float(),
                                                                    rtol=0, atol=_noise_atol(dtype)):
                            gap = float((sample.float() - first.float()).abs().max())
                            failures.append(f"{case.name} {backend} {str(dtype)[6:]}: seeded sample in {layout} "
                                            f"differs from contiguous by {gap:.3g} (same seed, same noise expected)")
    return {"checked": checked, "failures": failures}


def check_noise_stream(device: torch.device, backends, seed: int = (7 << 32) + 12345) -> dict:
    """Each backend's seeded draws against the stream's float64 definition (ddpm_fast.noise_stream), for
    contiguous inputs of N % 4 == 0 (the kernels' whole-block paths) and N odd (samples starting inside a Philox
    block), and channels_last (element by element). The draw is recovered as sample / std of a float32
    p_sample_step whose mean is 0 (zero model output and x_t), std from the same step with noise = 1.

    Bound per element: |z - z64| <= 1e-6 r + 1e-6, r the draw's Box-Muller radius. float32 with libm or
    libdevice functions: the angle fl(2 pi u) half an ulp of 2 pi (2.4e-7 relative to r), sine / cosine within
    2 ulp (2.4e-7), the radius's log, square root and products a few ulp relative (< 4e-7), the recovery's
    division half an ulp; the absolute floor covers a log near u = 1 whose error is absolute (tiny r).
    {checked, failures, max_error}."""
    import numpy as np

    from . import ops
    from .noise_stream import normals
    from .schedule import NoiseSchedule

    schedule = NoiseSchedule.named("linear", 1000)
    failures, checked, worst = [], 0, 0.0
    kw = dict(mean_type="epsilon", var_type="fixed_small", clip_denoised=False)
    for shape in ((3, 4, 32, 32), (3, 5, 67, 131)):
        t = torch.tensor([1, 500, 999], device=device)
        want, radius = normals(seed, np.arange(math.prod(shape), dtype=np.uint64))
        for layout in ("contiguous", "channels_last"):
            x_t = relayout(torch.zeros(shape, device=device), layout)
            for backend in backends:
                checked += 1
                where = f"{backend} {layout} {'x'.join(map(str, shape))}"
                try:
                    step = functools.partial(ops.p_sample_step, torch.zeros_like(x_t), x_t, t, schedule,
                                             backend=backend, **kw)
                    std = step(noise=torch.ones_like(x_t))["sample"].double()
                    z = (step(seed=seed)["sample"].double() / std).contiguous().reshape(-1).cpu().numpy()
                except Exception as exc:  # noqa: BLE001 -- reported as a failure of this case
                    failures.append(f"noise stream {where}: raised {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                err = abs(z - want)
                excess = err - (1e-6 * radius + 1e-6)
                worst = max(worst, float(err.max()))
                if not (excess <= 0).all():
                    k = int(excess.argmax())
                    failures.append(f"noise stream {where}: draw {k} is {z[k]:.9g}, the stream's {want[k]:.9g} "
                                    f"(error {err[k]:.3g} at radius {radius[k]:.3g})")
    return {"checked": checked, "failures": failures, "max_error": worst}


def _noise_atol(dtype) -> float:
    """Two ulps at the sample's scale (|sample| <= ~4 after clipping and noise): layouts may round the
    same per-element formula differently only through vectorised vs scalar transcendental code."""
    return 2 * torch.finfo(dtype).eps * 8


# -- GPU-only stages ----------------------------------------------------------------------------------
def _capture(fn, device):
    """(graph, outputs of fn() recorded in it), after a warm-up on a side stream."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn()
    return graph, outs


def check_graphs(device: torch.device, backends) -> dict:
    """Each case captured and replayed (equal to eager for explicit noise; fresh noise on every replay
    for seed=None and generator=), a 20-step DDPM and DDIM loop captured whole, and the solver loops (the drop-in
    schedulers' and the functional steps', _check_solver_graph)."""
    from . import ops
    from .bench import cases, loops

    failures, checked = [], 0
    gen = torch.Generator().manual_seed(3)
    for backend in backends:
        for case in cases.CASES:
            if case.backward:
                continue
            checked += 1
            args = case.inputs((4, 3, 16, 16), torch.float32, device, gen, per_sample_t=True).args
            fn = functools.partial(getattr(ops, case.op), backend=backend)
            try:
                eager = case.forward(fn, args, explicit_noise=True)
                graph, outs = _capture(lambda: case.forward(fn, args, explicit_noise=True), device)
                graph.replay()
                torch.cuda.synchronize(device)
                for e, o in zip(eager, outs):
                    if not torch.equal(e, o):
                        failures.append(f"{case.name} {backend}: replay differs from eager by "
                                        f"{float((e - o).abs().max()):.3g}")
                if case.kind in ("ddpm", "ddim"):
                    failures += _check_fresh_noise(case, fn, args, device, backend)
            except Exception as exc:  # noqa: BLE001
                failures.append(f"{case.name} {backend}: {type(exc).__name__}: {str(exc)[:200]}")
        for loop, _ in loops.LOOPS:
            checked += 1
            try:
                shape = (4, 3, 16, 16)
                net = loops._net(shape[1], device, torch.float32)
                run = loops._ours(loop, backend=backend, device=device, batch=shape[0], run_steps=20)
                x = torch.randn(shape, device=device)
                with torch.no_grad():
                    eager = run(net, x)
                    graph, out = _capture(lambda: run(net, x), device)
                    graph.replay()
                torch.cuda.synchronize(device)
                if not torch.equal(eager, out):
                    failures.append(f"{loop} loop {backend}: graph replay differs from eager")
            except Exception as exc:  # noqa: BLE001
                failures.append(f"{loop} loop {backend}: {type(exc).__name__}: {str(exc)[:200]}")
    for name in (*SOLVER_LOOPS, *FUNCTIONAL_LOOPS):
        checked += 1
        failures += _check_solver_graph(name, device)
    return {"checked": checked, "failures": failures}


# the drop-in multistep schedulers (ddpm_fast.compat.diffusers) the graphs and sync_free stages run whole
SOLVER_LOOPS = {
    "dpmsolver++ 3M": ("FastDPMSolverMultistepScheduler", {"solver_order": 3}),
    "sde-dpmsolver++ 2M": ("FastDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "euler": ("FastEulerDiscreteScheduler", {}),
    "euler ancestral": ("FastEulerAncestralDiscreteScheduler", {}),
    "unipc 3": ("FastUniPCMultistepScheduler", {"solver_order": 3}),
    "sde-dpmsolver++ 2M, in-kernel noise": ("FastDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "euler ancestral, in-kernel noise": ("FastEulerAncestralDiscreteScheduler", {}),
}
# the loops above whose drop-in draws its noise inside the fused op (scheduler.in_kernel_noise = True)
IN_KERNEL_NOISE_LOOPS = ("sde-dpmsolver++ 2M, in-kernel noise", "euler ancestral, in-kernel noise")


def solver_loop(name: str, device, steps: int = 10):
    """(a fresh Fast scheduler of SOLVER_LOOPS[name] set to ``steps`` steps on ``device``, run): run(x,
    generator=None) takes x [4, 4, 16, 16] through the whole loop with a tanh stand-in model and returns the
    final sample."""
    from .compat import diffusers as compat

    cls_name, config = SOLVER_LOOPS[name]
    scheduler = getattr(compat, cls_name)(**config)
    scheduler.in_kernel_noise = name in IN_KERNEL_NOISE_LOOPS
    scheduler.set_timesteps(steps, device=device)

    takes_generator = "generator" in inspect.signature(scheduler.step).parameters  # (UniPC draws no noise)

    def run(x, generator=None):
        kwargs = {"generator": generator} if takes_generator else {}
        for t in scheduler.timesteps:
            model_output = torch.tanh(scheduler.scale_model_input(x, t))
            x = scheduler.step(model_output, t, x, **kwargs).prev_sample
        return x

    return scheduler, run


# the functional steps (ddpm_fast.solvers) that draw their noise inside the fused op (Philox, from the device's
# default generator here): the graphs and sync_free stages run their loops too
FUNCTIONAL_LOOPS = ("euler_ancestral_step", "dpm_solver_step sde-dpmsolver++ 2M")
LOOP_SHAPE = (4, 4, 16, 16)


def functional_loop(name: str, device, steps: int = 10):
    """(reset, run) for FUNCTIONAL_LOOPS[name]: run(x, generator=None) takes x [4, 4, 16, 16] on ``device`` through
    ``steps`` steps (sigmas log-spaced from 15.8 to 0.03, then 0) with a tanh stand-in model, the noise drawn in the
    step's op; reset() readies a new loop (zeroes the DPM history, allocated once: a captured loop reuses it)."""
    from . import solvers

    sigmas = torch.cat([torch.logspace(1.2, -1.5, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    if name == "euler_ancestral_step":
        table = solvers.euler_ancestral_table(sigmas)
        column = solvers.tables.EULER_ANCESTRAL_COLUMNS.index("input_scale")
        input_scales = [float(v) for v in table.coef[:, 0, column]]  # scale_model_input's factor per step

        def run(x, generator=None):
            for i in range(table.num_steps):
                x, _ = solvers.euler_ancestral_step(torch.tanh(x * input_scales[i]), x, i, table, generator=generator)
            return x

        return (lambda: None), run
    table = solvers.dpm_solver_table(sigmas, solver_order=2, algorithm_type="sde-dpmsolver++")
    history = solvers.new_history(table, torch.empty(LOOP_SHAPE, device=device))

    def run_dpm(x, generator=None):
        for i in range(table.num_steps):
            x = solvers.dpm_solver_step(torch.tanh(x), x, i, table, history, generator=generator)
        return x

    return history.zero_, run_dpm


def _loop(name: str, device) -> tuple:
    """(reset, run) of a drop-in loop (SOLVER_LOOPS) or a functional one (FUNCTIONAL_LOOPS)."""
    if name in FUNCTIONAL_LOOPS:
        return functional_loop(name, device)
    scheduler, run = solver_loop(name, device)
    return (lambda: scheduler.set_timesteps(10, device=device)), run


# the loops that draw noise: a replay of their captured graph must draw fresh noise
NOISY_LOOPS = ("sde-dpmsolver++ 2M", "euler ancestral", *IN_KERNEL_NOISE_LOOPS, *FUNCTIONAL_LOOPS)


def _check_solver_graph(name: str, device) -> list:
    """One 10-step loop (a drop-in scheduler's or a functional step's) captured whole and replayed: equal to the
    eager loop. The SDE / ancestral noise comes from the device's default generator, seeded alike before the eager
    run and the replay (a captured draw reads the generator's state at replay time); a second replay, unseeded,
    must draw other noise."""
    try:
        x_start = torch.randn(LOOP_SHAPE, device=device, generator=torch.Generator(device).manual_seed(1))
        _, eager_run = _loop(name, device)
        torch.cuda.manual_seed(2)
        eager = eager_run(x_start.clone())
        reset, run = _loop(name, device)
        static_x = x_start.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run(static_x.clone())  # warm-up: the step's tables reach the device
        torch.cuda.current_stream(device).wait_stream(side)
        reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run(static_x)
        # no reset after the capture: a drop-in's set_timesteps would free the device tables the graph reads, and
        # each replay writes every history slot before it reads it
        torch.cuda.manual_seed(2)
        graph.replay()
        torch.cuda.synchronize(device)
        gap = float((out - eager).abs().max())
        if not gap <= 1e-5 * (1.0 + float(eager.abs().max())):
            return [f"{name} loop: graph replay differs from the eager loop by {gap:.3g}"]
        if name in NOISY_LOOPS:
            first = out.clone()
            graph.replay()
            torch.cuda.synchronize(device)
            if torch.equal(first, out):
                return [f"{name} loop: two graph replays drew the same noise"]
    except Exception as exc:  # noqa: BLE001
        return [f"{name} loop: {type(exc).__name__}: {str(exc)[:200]}"]
    return []


def _check_fresh_noise(case, fn, args, device, backend) -> list:
    """seed=None and generator= noise captured in a graph: two replays must draw different noise."""
    out = []
    mo, x_t, t, _ = args
    for label, kw in (("seed=None", {}), ("generator=", {"generator": torch.Generator(device).manual_seed(5)})):
        call = functools.partial(fn, mo, x_t, t, case.schedule, clip_denoised=True, **kw)
        call = (functools.partial(call, mean_type=case.mean_type, var_type=case.var_type) if case.kind == "ddpm"
                else functools.partial(call, eta=1.0))
        try:
            graph, res = _capture(call, device)
            graph.replay()
            first = res["sample"].clone()
            graph.replay()
            torch.cuda.synchronize(device)
            if torch.equal(first, res["sample"]):
                out.append(f"{case.name} {backend} {label}: two graph replays drew the same noise")
        except Exception as exc:  # noqa: BLE001
            out.append(f"{case.name} {backend} {label}: capture failed: {type(exc).__name__}: {str(exc)[:160]}")
    return out


def check_sync_free(device: torch.device, backends) -> dict:
    """Both sampling loops (20 steps) with every host sync turned into an error."""
    from .bench import loops

    failures = []
    for backend in backends:
        for loop, _ in loops.LOOPS:
            net = loops._net(3, device, torch.float32)
            run = loops._ours(loop, backend=backend, device=device, batch=4, run_steps=20)
            failures += _sync_free(f"{loop} loop {backend}", device, run, net,
                                   torch.randn((4, 3, 16, 16), device=device))
    for name in (*SOLVER_LOOPS, *FUNCTIONAL_LOOPS):
        run = _loop(name, device)[1]
        generator = torch.Generator(device).manual_seed(0)  # a generator on the device: no host draw
        failures += _sync_free(f"{name} loop", device, run, torch.randn(LOOP_SHAPE, device=device), generator)
    for name in IN_KERNEL_NOISE_LOOPS:  # a CPU generator for CUDA samples: the seed is drawn and read on the host
        run = _loop(name, device)[1]
        failures += _sync_free(f"{name} loop, CPU generator", device, run, torch.randn(LOOP_SHAPE, device=device),
                               torch.Generator().manual_seed(0))
    return {"checked": 2 * len(backends) + len(SOLVER_LOOPS) + len(FUNCTIONAL_LOOPS) + len(IN_KERNEL_NOISE_LOOPS),
            "failures": failures}


def _sync_free(label: str, device, run, *args) -> list:
    """run(*args) with every host sync an error: [] or the failure."""
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            run(*args)
    except Exception as exc:  # noqa: BLE001
        return [f"{label}: {type(exc).__name__}: {str(exc)[:200]}"]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return []


# -- ahead-of-time compiles ---------------------------------------------------------------------------
def aot_triton(archs=(80, 90)) -> dict:
    """Triton kernels compiled for ``archs`` in a subprocess (the interpreter must be off there)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "ddpm_fast.triton.aot", "--json", "--arch", *map(str, archs)],
                          env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"checked": 0, "failures": ["triton AOT failed: " + " | ".join(proc.stderr.splitlines()[-5:])]}
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    from ._ptxas import occupancy

    for r in rows:  # the launchers' 4 warps
        r.update(occupancy(r["regs"], 128, f"sm_{r['arch']}") if r["regs"] > 0 else {})
    failures = [f"triton {r['kernel']} sm_{r['arch']}: {r['spill_stores']} B spill stores" for r in rows
                if r["spill_stores"] or r["spill_loads"]]
    return {"checked": len(rows), "failures": failures, "kernels": rows}


def aot_cuda(archs=("80", "90")) -> dict:
    """csrc/cuda/kernels.cu compiled with nvcc for ``archs``: ptxas' registers, spills and stack frames."""
    from . import _ptxas

    nvcc = _ptxas.find_nvcc()
    if nvcc is None:
        raise StageSkipped("nvcc not found (CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda)")
    rows = _ptxas.compile_kernels(nvcc, archs)
    for r in rows:  # body kernels run 256 threads a block, finish kernels 128
        threads = 128 if r["name"].startswith("finish") else 256
        r.update(_ptxas.occupancy(r.get("registers", 255), threads, r["arch"]))
    failures = [f"cuda {r['name']} {r['arch']}: {r['spill_stores']} B spill stores" for r in rows
                if r.get("spill_stores") or r.get("spill_loads")]
    return {"checked": len(rows), "failures": failures, "kernels": rows}


# -- the run --------------------------------------------------------------------------------------------
def _environment(device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
           "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "device": str(device)}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        if shutil.which("nvidia-smi"):
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True)
            env["driver"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
    return env


def _bench_cli(name, flags, device, out_dir) -> dict:
    """`ddpm-fast bench <flags> --device <device> --quick` in a child process, its output in <name>.log."""
    proc = subprocess.run([sys.executable, "-m", "ddpm_fast.cli", "bench", *flags, "--device", str(device), "--quick",
                           "--out", str(out_dir / name)], capture_output=True, text=True, timeout=1800)
    log = out_dir / f"{name}.log"
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"checked": 1, "failures": [f"{name} exited {proc.returncode}: "
                                           + " | ".join(proc.stderr.splitlines()[-3:])]}
    return {"checked": 1, "failures": [], "log": str(log)}


def _run_stage(stage: Stage, device: torch.device, out_dir: Path) -> dict:
    """{name, status: passed / failed / skipped, seconds, budget_s, reason, ...details}."""
    if stage.needs_gpu and device.type != "cuda":
        return {"status": "skipped", "reason": "needs a CUDA GPU (none is visible)"}
    if stage.name == "build":
        from . import _build
        from .backends import availability

        module, reason = _build.load()
        avail = {k: {"available": ok, "reason": why} for k, (ok, why) in availability().items()}
        if module is None:
            return {"status": "failed", "reason": reason, "backends": avail}
        if device.type == "cuda" and not avail.get("cuda", {}).get("available"):
            return {"status": "failed", "reason": "cuda backend: " + avail["cuda"]["reason"], "backends": avail}
        return {"status": "passed", "backends": avail}
    if stage.name == "ops":
        backends, why = _fused_backends(device)
        if not backends:
            return {"status": "failed", "reason": f"no fused backend runs on {device}: {why}"}
        res = check_ops(device, backends)
        stream = check_noise_stream(device, backends)
        return dict(res, checked=res["checked"] + stream["checked"], failures=res["failures"] + stream["failures"],
                    noise_stream_max_error=stream["max_error"], backends=backends, not_run=why)
    if stage.name == "graphs":
        return check_graphs(device, _fused_backends(device)[0])
    if stage.name == "sync_free":
        return check_sync_free(device, _fused_backends(device)[0])
    if stage.name == "second_gpu":
        if torch.cuda.device_count() < 2:
            raise StageSkipped("one GPU only")
        second = torch.device("cuda", 1)
        return check_ops(second, _fused_backends(second)[0], dtypes=(torch.float32,), fuzz=0)
    if stage.name in ("bench", "samplers"):
        return _bench_cli(stage.name, ["--samplers"] if stage.name == "samplers" else [], device, out_dir)
    if stage.name == "e2e":
        from .bench.e2e import run_e2e

        results = run_e2e(device, True, out_dir / "e2e")
        failures = [f"{a['model']} {a['sampler']}: loss curves of the two ways differ" for a in results["agreement"]
                    if not a["agree"]]
        return {"checked": len(results["agreement"]), "failures": failures}
    if stage.name == "aot":
        res = aot_triton()
        if device.type != "cuda":  # on a GPU the build stage already compiled csrc/cuda for the local arch
            try:
                cuda = aot_cuda()
                res = {"checked": res["checked"] + cuda["checked"], "failures": res["failures"] + cuda["failures"],
                       "kernels": res.get("kernels", []) + cuda["kernels"]}
            except StageSkipped as exc:
                res["not_run"] = f"csrc/cuda: {exc}"
        return res
    raise ValueError(f"unknown stage {stage.name!r}")


def run(stages, device: torch.device, out_dir: Path, log=print) -> dict:
    """Run ``stages`` in order; the whole report (also written to out_dir/selftest.json and summary.txt)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "environment": _environment(device), "stages": []}
    for stage in stages:
        log(f"[selftest] {stage.name}: {stage.what} (budget {stage.budget_s} s) ...")
        start = time.perf_counter()
        try:
            res = _run_stage(stage, device, out_dir)
        except StageSkipped as exc:
            res = {"status": "skipped", "reason": str(exc)}
        except Exception as exc:  # noqa: BLE001 -- a crashing stage is a failed stage; the rest still run
            res = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()[-2000:]}
        if "status" not in res:
            res["status"] = "failed" if res["failures"] else "passed"
        res.update(name=stage.name, seconds=round(time.perf_counter() - start, 1), budget_s=stage.budget_s)
        report["stages"].append(res)
        log(f"[selftest] {stage.name}: {_line(res)}")
    report["passed"] = not any(s["status"] == "failed" for s in report["stages"])
    (out_dir / "selftest.json").write_text(json.dumps(report, indent=1, default=str))
    (out_dir / "summary.txt").write_text(summary(report))
    return report


def _line(res: dict) -> str:
    text = f"{res['status']} in {res['seconds']} s"
    if "checked" in res:
        text += f", {res['checked']} checks, {len(res.get('failures', []))} failed"
    if res.get("reason"):
        text += f" ({res['reason']})"
    if res.get("not_run"):
        text += f"; not run: {res['not_run']}"
    return text


def summary(report: dict) -> str:
    env = report["environment"]
    lines = [f"ddpm-fast selftest, {report['started']}: {'PASSED' if report['passed'] else 'FAILED'}",
             f"device {env['device']} {env.get('gpus') or ''} capability {env.get('capability', '-')} "
             f"driver {env.get('driver', '-')}; torch {env['torch']} (CUDA {env['cuda_build']}), "
             f"triton {env['triton']}, python {env['python']}, {env['cores']} cores"]
    width = max(len(s["name"]) for s in report["stages"])
    for s in report["stages"]:
        lines.append(f"  {s['name']:<{width}}  {_line(s)}")
        lines += [f"      {f}" for f in s.get("failures", [])[:20]]
        if len(s.get("failures", [])) > 20:
            lines.append(f"      ... {len(s['failures']) - 20} more in selftest.json")
    return "\n".join(lines) + "\n"


def dry_run(stages, device: torch.device) -> str:
    total = sum(s.budget_s for s in stages)
    lines = [f"ddpm-fast selftest on {device}: {len(stages)} stages, budget {total} s "
             f"({total / 60:.1f} min) on one H100/H200 with a cold build cache"]
    for s in stages:
        runs = "skipped here: needs a CUDA GPU" if s.needs_gpu and device.type != "cuda" else "runs here"
        lines.append(f"  {s.name:<11} {s.budget_s:>4} s  {'GPU' if s.needs_gpu else 'any'}  {runs}: {s.what}")
    return "\n".join(lines)


def _parser():
    p = argparse.ArgumentParser(prog="ddpm-fast selftest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="cuda[:N] or cpu (default: cuda if a GPU is visible, else cpu)")
    p.add_argument("--out", default="selftest-results",
                   help="results folder; each run writes a time-stamped subfolder (default: selftest-results/)")
    p.add_argument("--skip", default="", help="comma-separated stages to leave out: " + ", ".join(BY_NAME))
    p.add_argument("--only", default="", help="comma-separated stages to run (default: all)")
    p.add_argument("--dry-run", action="store_true", help="print the stages and their time budget, run nothing")
    return p


def _names(spec: str, flag: str) -> list:
    names = [w.strip() for w in spec.split(",") if w.strip()]
    bad = [n for n in names if n not in BY_NAME]
    if bad:
        raise SystemExit(f"ddpm-fast selftest {flag}: unknown stage(s) {bad}; expected some of {list(BY_NAME)}")
    return names


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    only, skip = _names(args.only, "--only"), _names(args.skip, "--skip")
    stages = [s for s in STAGES if (not only or s.name in only) and s.name not in skip]
    if args.dry_run:
        print(dry_run(stages, device))
        return 0
    if device.type == "cuda":
        torch.cuda.set_device(device)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out) / stamp
    report = run(stages, device, out_dir, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(summary(report), end="")
    print(f"results: {out_dir / 'selftest.json'}, {out_dir / 'summary.txt'}")
    return 0 if report["passed"] else 1
