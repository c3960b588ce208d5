"""`ddpm-fast bench --samplers`: the drop-in solver schedulers' steps against their diffusers parents.

For each sampler (DPM-Solver++ 2M, DPM-Solver++ 3M SDE, Euler, Euler ancestral, UniPC bh2 order 3; the two that
draw noise also with the drop-in's in_kernel_noise on, the "Philox" rows), ours (ddpm_fast.compat.diffusers_solvers)
and the parent (diffusers), float32 on the CPU (or --device):

- time per step at Stable Diffusion latent sizes (1x4x128x128, 4x4x64x64), without and with
  classifier-free guidance: the median over every step of ``loops`` full sampling loops (``steps``
  steps each, after one warm-up loop), parent and ours alternating loop by loop in the same run. A
  step is scale_model_input + (the guidance combination) + step, the model output fixed. With guidance
  the model output is [2B, ...]: ours takes it whole (``step(..., guidance_scale=s)``: the combination
  inside the step's one fused op), the parent after the pipelines' arithmetic ``uncond + s * (cond - uncond)``.
- host time per step on tiny inputs (1x4x8x8, one thread, no guidance): CPU time of the calling thread
  (time.thread_time, as bench/host.py), the median over the steps of ``loops`` loops.
- the bound of the speed-up: what ours runs exactly as the parent does (scale_model_input, and for the samplers
  that draw noise diffusers' randn_tensor from the generator: the drop-ins keep the parent's noise stream), timed
  alone in the same alternation; parent / that time is the speed-up were the fused update free.
- ops per step: the aten ops one step dispatches (step 5 of a loop, past the multistep warm-up):
  full-size results + the rest (mostly 0-dim), and host reads (.item() / nonzero).

Targets of issue 19 (printed next to the ratios): each step >= 3x its parent's speed at the SD sizes, and
<= 0.5x its host time on tiny inputs. Each of ours is one ddpm_fast.ops.solver_update call (the compiled op
on the CPU; the reference's PyTorch ops where the extension is not built). Writes samplers.json and
samplers.txt to --out.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SD_SIZES = ((1, 4, 128, 128), (4, 4, 64, 64))
QUICK_SIZES = ((1, 4, 16, 16), (2, 4, 8, 8))
TINY = (1, 4, 8, 8)
GUIDANCE_SCALE = 7.5
TARGET_SPEEDUP = 3.0      # ours >= 3x the parent's speed per step at the SD sizes
TARGET_HOST_RATIO = 0.5   # ours <= 0.5x the parent's host time per step on tiny inputs
OPS_AT_STEP = 5


def samplers():
    """[(name, parent class, drop-in class, config kwargs)] (imports diffusers). The "Philox" rows are the drop-in
    with in_kernel_noise on (IN_KERNEL_NOISE): its noise drawn inside the fused op, not the parent's values."""
    from ..compat.diffusers_solvers import (DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                                            EulerDiscreteScheduler, FastDPMSolverMultistepScheduler,
                                            FastEulerAncestralDiscreteScheduler, FastEulerDiscreteScheduler,
                                            FastUniPCMultistepScheduler, UniPCMultistepScheduler)

    return (
        ("DPM++ 2M", DPMSolverMultistepScheduler, FastDPMSolverMultistepScheduler, {}),
        ("DPM++ 3M SDE", DPMSolverMultistepScheduler, FastDPMSolverMultistepScheduler,
         {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}),
        ("DPM++ 3M SDE Philox", DPMSolverMultistepScheduler, FastDPMSolverMultistepScheduler,
         {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}),
        ("Euler", EulerDiscreteScheduler, FastEulerDiscreteScheduler, {}),
        ("Euler a", EulerAncestralDiscreteScheduler, FastEulerAncestralDiscreteScheduler, {}),
        ("Euler a Philox", EulerAncestralDiscreteScheduler, FastEulerAncestralDiscreteScheduler, {}),
        ("UniPC bh2 o3", UniPCMultistepScheduler, FastUniPCMultistepScheduler, {"solver_order": 3}),
    )


class CountOps(TorchDispatchMode):
    """Counts dispatched ops: results of at least ``numel`` elements of ops that are not views (full: a
    full-size pass over memory), the rest (small, views included), and host reads
    (_local_scalar_dense: .item() / bool(); nonzero)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.full, self.small, self.host_reads = numel, 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero):
            self.host_reads += 1
        if isinstance(out, torch.Tensor) and out.numel() >= self.numel and not getattr(func, "is_view", False):
            self.full += 1
        else:
            self.small += 1
        return out


class Side:
    """One scheduler (ours or the parent) stepping a fixed model output [B or 2B, ...] from sample [B, ...]."""

    def __init__(self, cls, config: dict, ours: bool, guidance: float | None, seed: int, in_kernel_noise=False):
        self.scheduler = cls(**config)
        if in_kernel_noise:
            self.scheduler.in_kernel_noise = True  # the drop-ins' opt-in (ddpm_fast.compat.diffusers_solvers)
        self.ours, self.guidance = ours, guidance
        self.generator = torch.Generator().manual_seed(seed)
        self.takes_generator = "generator" in cls.step.__code__.co_varnames

    def guided(self, model_output):
        """The model output the parent's step takes: [B, ...] (the pipelines' guidance arithmetic, if any);
        ours takes the [2B, ...] output itself."""
        if self.guidance is None or self.ours:
            return model_output
        uncond, cond = model_output.chunk(2)
        return uncond + self.guidance * (cond - uncond)

    def step(self, model_output, t, x):
        self.scheduler.scale_model_input(x, t)  # the pipeline's call (its result feeds the model)
        kwargs = {"generator": self.generator} if self.takes_generator else {}
        if self.ours and self.guidance is not None:
            kwargs["guidance_scale"] = self.guidance  # combined inside the fused step
        return self.scheduler.step(self.guided(model_output), t, x, **kwargs).prev_sample

    def loop(self, x, model_output, steps: int, clock=time.perf_counter) -> list:
        """Seconds of each step of one full loop (a new set_timesteps)."""
        self.scheduler.set_timesteps(steps)
        out = []
        for t in self.scheduler.timesteps:
            start = clock()
            x = self.step(model_output, t, x)
            out.append(clock() - start)
        return out

    def ops(self, x, model_output, steps: int) -> CountOps:
        """The ops of step OPS_AT_STEP (or the last) of a loop."""
        self.scheduler.set_timesteps(steps)
        at = min(OPS_AT_STEP, steps - 1)
        counter = CountOps(x.numel())
        for i, t in enumerate(self.scheduler.timesteps):
            if i == at:
                with counter:
                    x = self.step(model_output, t, x)
            else:
                x = self.step(model_output, t, x)
        return counter


class SharedSide(Side):
    """What ours runs exactly as the parent does, alone: scale_model_input and, for the samplers that draw noise,
    diffusers' randn_tensor of the sample's shape from the generator (the drop-ins keep the parent's noise stream).
    The parent's time over this one bounds any drop-in's speed-up: it is the speed-up if the fused update took no
    time at all."""

    def __init__(self, cls, config: dict, guidance: float | None, seed: int, draws_noise: bool):
        super().__init__(cls, config, True, guidance, seed)
        self.draws_noise = draws_noise

    def step(self, model_output, t, x):
        from diffusers.utils.torch_utils import randn_tensor

        self.scheduler.scale_model_input(x, t)
        if self.draws_noise:
            randn_tensor(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        return x


# the samplers whose step draws noise on the parent's default path (Euler draws only with s_churn > 0)
NOISE_DRAWING = ("DPM++ 3M SDE", "Euler a")
# the rows whose drop-in draws that noise inside its fused op (in_kernel_noise): what ours shares with the parent
# is then scale_model_input alone
IN_KERNEL_NOISE = ("DPM++ 3M SDE Philox", "Euler a Philox")


def _inputs(shape, guidance, device, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(device)
    out_shape = (2 * shape[0], *shape[1:]) if guidance is not None else shape
    return x, torch.randn(out_shape, generator=gen).to(device)


def _paired_loops(sides, x, model_output, steps, loops, clock) -> dict:
    """{label: [seconds per step]} over ``loops`` loops per side (after one warm-up loop each), alternating."""
    for side in sides.values():
        side.loop(x, model_output, steps, clock)
    times = {label: [] for label in sides}
    for k in range(loops):
        order = list(sides.items()) if k % 2 == 0 else list(sides.items())[::-1]
        for label, side in order:
            times[label] += side.loop(x, model_output, steps, clock)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return times


def time_step(name, parent_cls, fast_cls, config, shape, guidance, *, steps, loops, device, seed,
              clock=time.perf_counter) -> dict:
    """One row: median us per step of parent, ours and what ours shares with the parent (SharedSide), the
    speed-up (parent / ours) and its bound (parent / shared), and the ops of one step of parent and ours."""
    x, model_output = _inputs(shape, guidance, device, seed)
    sides = {"parent": Side(parent_cls, config, False, guidance, seed),
             "ours": Side(fast_cls, config, True, guidance, seed, in_kernel_noise=name in IN_KERNEL_NOISE),
             "shared": SharedSide(fast_cls, config, guidance, seed, name in NOISE_DRAWING)}
    times = _paired_loops(sides, x, model_output, steps, loops, clock)
    row = {"sampler": name, "size": "x".join(map(str, shape)), "cfg": guidance is not None,
           "guidance_scale": guidance, "steps": steps, "loops": loops}
    for label, side in sides.items():
        row[f"{label}_us"] = statistics.median(times[label]) * 1e6
        row[f"{label}_steps_timed"] = len(times[label])
        if label != "shared":
            ops = side.ops(x, model_output, steps)
            row[f"{label}_ops"] = {"full": ops.full, "small": ops.small, "host_reads": ops.host_reads}
    row["ratio"] = row["parent_us"] / row["ours_us"]
    row["bound"] = row["parent_us"] / row["shared_us"]
    return row


def run(*, quick: bool = False, device: str = "cpu", threads: int | None = None, seed: int = 0) -> dict:
    """Every sampler at every size, without and with guidance, then the host times on TINY (one thread)."""
    warnings.filterwarnings("ignore")  # diffusers' deprecation notes
    started = time.perf_counter()
    dev = torch.device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    sizes = QUICK_SIZES if quick else SD_SIZES
    steps, loops = (8, 2) if quick else (25, 8)
    host_steps, host_loops = (8, 2) if quick else (25, 20)
    table = samplers()
    rows = []
    for shape in sizes:
        for guidance in (None, GUIDANCE_SCALE):
            for name, parent_cls, fast_cls, config in table:
                print(f"  {name} {'x'.join(map(str, shape))} cfg={guidance is not None}", file=sys.stderr)
                rows.append(time_step(name, parent_cls, fast_cls, config, shape, guidance, steps=steps, loops=loops,
                                      device=dev, seed=seed))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        host = [time_step(name, parent_cls, fast_cls, config, TINY, None, steps=host_steps, loops=host_loops,
                          device=torch.device("cpu"), seed=seed, clock=time.thread_time)
                for name, parent_cls, fast_cls, config in table]
    finally:
        torch.set_num_threads(threads if threads is not None else old)
    from .runner import _device_name, _loadavg, _versions

    meta = {"what": "time per sampler step, drop-in (ours) vs diffusers parent", "device": str(dev),
            "device_name": _device_name(dev), "dtype": "float32", "quick": quick,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "threads": torch.get_num_threads(), "steps": steps, "loops": loops, "host_size": "x".join(map(str, TINY)),
            "host_steps": host_steps, "host_loops": host_loops, "host_clock": "time.thread_time, 1 thread",
            "guidance_scale": GUIDANCE_SCALE, "ops_at_step": OPS_AT_STEP,
            "target_speedup": TARGET_SPEEDUP, "target_host_ratio": TARGET_HOST_RATIO,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "loadavg": _loadavg(), "elapsed_s": time.perf_counter() - started}
    meta.update(_versions())
    for r in rows:
        r["target"] = f">= {TARGET_SPEEDUP:g}x"
        r["met"] = r["ratio"] >= TARGET_SPEEDUP
    for r in host:
        r["host_ratio"] = r["ours_us"] / r["parent_us"]
        r["target"] = f"<= {TARGET_HOST_RATIO:g}x"
        r["met"] = r["host_ratio"] <= TARGET_HOST_RATIO
    return {"meta": meta, "rows": rows, "host": host}


def _ops(o) -> str:
    return f"{o['full']}+{o['small']} ({o['host_reads']})"


def table(results: dict) -> str:
    """The text table: time per step and ops per step, then host time per step."""
    m = results["meta"]
    lines = [f"ddpm-fast bench --samplers on {m['device_name']} ({m['device']}), {m['dtype']}, {m['threads']} thread(s)"
             f"{' (quick: not a measurement)' if m['quick'] else ''}",
             f"time per step: median over {m['loops']} loops of {m['steps']} steps each, after a warm-up loop; "
             f"cfg: model output [2B], guidance {m['guidance_scale']:g}",
             "ops per step: full-size results + other (host reads)",
             "shared: what ours runs as the parent does (scale_model_input, and the parent's noise draw where the "
             "step draws noise); bound = parent / shared: the speed-up were the fused update free", "",
             f"{'sampler':19s} {'size':12s} {'cfg':3s} {'parent us':>10s} {'ours us':>10s} {'speedup':>8s} "
             f"{'target':>7s} {'met':>3s} {'shared us':>10s} {'bound':>8s}  {'ops parent':>14s} {'ops ours':>14s}"]
    for r in results["rows"]:
        lines.append(f"{r['sampler']:19s} {r['size']:12s} {'yes' if r['cfg'] else 'no':3s} {r['parent_us']:10.1f} "
                     f"{r['ours_us']:10.1f} {r['ratio']:7.2f}x {r['target']:>7s} {'yes' if r['met'] else 'no':>3s} "
                     f"{r['shared_us']:10.1f} {r['bound']:7.1f}x  "
                     f"{_ops(r['parent_ops']):>14s} {_ops(r['ours_ops']):>14s}")
    lines += ["", f"host time per step on {m['host_size']} ({m['host_clock']}; median over {m['host_loops']} loops "
              f"of {m['host_steps']} steps)",
              f"{'sampler':19s} {'parent us':>10s} {'ours us':>10s} {'ours/parent':>11s} {'target':>7s} {'met':>3s}"]
    for r in results["host"]:
        lines.append(f"{r['sampler']:19s} {r['parent_us']:10.1f} {r['ours_us']:10.1f} {r['host_ratio']:10.2f}x "
                     f"{r['target']:>7s} {'yes' if r['met'] else 'no':>3s}")
    return "\n".join(lines)


def main(args) -> int:
    """Entry of `ddpm-fast bench --samplers` (args: runner's parsed options: quick, device, threads, seed, out)."""
    from .report import results_dir

    device = args.device or "cpu"
    if torch.device(device).type not in ("cpu", "cuda"):
        raise SystemExit(f"--device: expected cpu or cuda, got {device}")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device: CUDA was asked for but no CUDA device is visible")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads: expected a positive count, got {args.threads}")
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise SystemExit("ddpm-fast bench --samplers needs diffusers: pip install 'ddpm-fast[diffusers]'") from None
    results = run(quick=args.quick, device=device, threads=args.threads, seed=args.seed)
    out = results_dir(args.out)
    text = table(results)
    (out / "samplers.json").write_text(json.dumps(results, indent=1))
    (out / "samplers.txt").write_text(text + "\n")
    print(text)
    print(f"\nwrote {out / 'samplers.json'}, {out / 'samplers.txt'}")
    return 0
