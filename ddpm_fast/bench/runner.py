"""`ddpm-fast bench`: check, then time every op on every available backend, the eager reference,
torch.compile of the reference and diffusers' schedulers; print a table and write JSON, CSV and
a PNG chart to --out.

Implementations ("--backends"): the ddpm_fast backends found by ddpm_fast.backends.availability()
(fused: every one but "reference"), "reference" (eager), "compile" (torch.compile of the
reference, dynamic=False) and "diffusers" (peers, where installed). Each fused backend and the
compiled reference is checked against the reference first (see bench.check) and not timed if it
fails. Ops are called with validate=False: the benchmark times the math, not the argument checks.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import platform
import statistics
import sys
import time

from . import cases as cases_mod

DEFAULT_SIZES = {"cpu": "64x3x64x64", "cuda": "256x4x64x64,256x3x256x256"}
QUICK_SIZES = {"cpu": "8x3x32x32", "cuda": "16x4x64x64"}
LOOP_SIZES = {"cpu": "8x3x32x32", "cuda": "16x4x64x64"}
QUICK_LOOP_SIZES = {"cpu": "2x3x16x16", "cuda": "4x4x32x32"}
EXTRA_IMPLS = ("reference", "compile", "diffusers")
# Checks run on a batch of at most this many samples of the timed shape (the float64 reference of
# a 256x3x256x256 fwd+bwd would not fit a GPU; on the CPU the timed shape itself is checked).
CHECK_BATCH = {"cpu": 64, "cuda": 16}


def _parser():
    p = argparse.ArgumentParser(prog="ddpm-fast bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="cpu or cuda[:N] (default: a GPU if there is one, else the CPU)")
    p.add_argument("--dtype", default="float32", help="comma-separated: float32, bfloat16, float16, float64")
    p.add_argument("--ops", help="comma-separated op names (default all): " + ", ".join(c.name for c in cases_mod.CASES)
                   + "; training_losses selects the four loss cases")
    p.add_argument("--sizes", help="comma-separated BxCxHxW image batch shapes (default CPU "
                   f"{DEFAULT_SIZES['cpu']}, GPU {DEFAULT_SIZES['cuda']})")
    p.add_argument("--backends", help="comma-separated implementations to run (default all): ddpm_fast backends "
                   "(reference, triton, cpu, cuda), compile, diffusers")
    p.add_argument("--quick", action="store_true", help="small sizes and few runs (a smoke run, not a measurement); "
                   "skips torch.compile unless --compile")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="time torch.compile of the reference (default: on, off under --quick)")
    p.add_argument("--loops", action=argparse.BooleanOptionalAction, default=True,
                   help="run the sampling-loop benchmark: a 1000-step DDPM and a 50-step DDIM loop (default: on; "
                   "about 10 s on a 2-core CPU, 20 steps under --quick)")
    p.add_argument("--loop-size", help=f"BxCxHxW of the sampling loops (default CPU {LOOP_SIZES['cpu']}, "
                   f"GPU {LOOP_SIZES['cuda']})")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU on Linux/glibc: keep freed memory in the process (mallopt) so that no implementation "
                   "page-faults its outputs in on every call (default: on; the same for all implementations)")
    p.add_argument("--out", default="bench-results", help="output folder (default: bench-results/)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs (default: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--host", action="store_true", help="time the host cost per call on tiny tensors, one thread, "
                   "and the CPU bandwidth floors instead (see ddpm_fast/bench/host.py)")
    p.add_argument("--dry-run", action="store_true", help="with --device cuda: print the modelled GPU table "
                   "(bytes per call, time at H100 / H200 memory bandwidth; ddpm_fast/bench/gpu_model.py) for the "
                   "--sizes, --dtype and --ops and exit, without a GPU")
    p.add_argument("--samplers", action="store_true", help="time the drop-in solver schedulers' steps against "
                   "their diffusers parents instead (see ddpm_fast/bench/samplers.py)")
    p.add_argument("--e2e", action="store_true", help="the end-to-end benchmark instead (training and sampling "
                   "loops with real U-Nets; its own options: `ddpm-fast bench --e2e --help`)")
    return p


def _sizes(spec, flag):
    out = []
    for word in spec.split(","):
        word = word.strip().lower()
        try:
            shape = tuple(int(s) for s in word.split("x"))
        except ValueError:
            raise SystemExit(f"{flag}: cannot parse {word!r}; expected e.g. 64x3x64x64") from None
        if len(shape) != 4 or min(shape) < 1:
            raise SystemExit(f"{flag}: expected BxCxHxW with positive sizes, got {word!r}")
        out.append(shape)
    return out


def _dtypes(spec):
    import torch

    out = []
    for word in spec.split(","):
        dt = getattr(torch, word.strip(), None)
        if not isinstance(dt, torch.dtype) or dt not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise SystemExit(f"--dtype: unknown {word!r}; expected float32, bfloat16, float16 or float64")
        out.append(dt)
    return out


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory instead of returning it to the OS (mallopt): without it, every
    multi-MB output a CPU op allocates arrives as fresh zeroed pages, a page-fault cost that lands
    on whichever call happens to free and re-allocate, and dominates streaming ops on a VM. True if
    it was set (Linux with glibc only). A CUDA run uses torch's caching allocator anyway."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1  # glibc's maximum: larger blocks still map
        return bool(ok and libc.mallopt(m_trim_threshold, 1 << 30) == 1)
    except (OSError, AttributeError):
        return False


def _loadavg():
    """1-minute load average (None where the OS has none): timings are only as good as a quiet machine."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _versions() -> dict:
    import torch

    from importlib import metadata

    from .. import __version__

    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {"ddpm_fast_version": __version__, "torch_version": torch.__version__, "triton_version": version("triton"),
            "diffusers_version": version("diffusers")}


def _dry_run(args) -> int:
    """--dry-run: the modelled GPU table (bench/gpu_model.py) instead of a run; needs no GPU."""
    if (args.device or "cuda").split(":")[0] != "cuda":
        raise SystemExit(f"--dry-run: models a GPU run; use it with --device cuda, not {args.device}")
    from . import gpu_model

    sizes = _sizes(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)["cuda"], "--sizes")
    try:
        chosen = cases_mod.select(args.ops)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    return gpu_model.dry_run(sizes, _dtypes(args.dtype), chosen)


def plan_impls(device, wanted, compile_on) -> tuple:
    """([(name, kind)] to run, {name: why not}) for this device; kind: fused, eager, compiled, peer."""
    from .. import backends
    from . import peers

    known = set(backends.BACKENDS) | set(EXTRA_IMPLS)
    for w in wanted or ():
        if w not in known:
            raise SystemExit(f"--backends: unknown {w!r}; expected some of {sorted(known)}")
    run, skipped = [], {}
    probe = [n for n in backends.BACKENDS if n != "reference" and (wanted is None or n in wanted)]
    found = backends.availability() if probe else {"reference": (True, "")}  # loading a backend can take seconds
    for name, (ok, reason) in found.items():
        if name == "reference":
            run.append((name, "eager"))
        elif not ok:
            skipped[name] = f"unavailable: {reason}"
        elif name == "triton" and device.type != "cuda":
            skipped[name] = "on the CPU Triton runs only in its interpreter (for checking, never timed)"
        elif name in ("cpu", "cuda") and name != device.type:
            skipped[name] = f"runs {name} tensors only (benchmark device: {device.type})"
        else:
            run.append((name, "fused"))
    if compile_on:
        run.append(("compile", "compiled"))
    else:
        skipped["compile"] = "torch.compile off (--quick or --no-compile; use --compile to time it)"
    if wanted is None or "diffusers" in wanted:
        ok, why = peers.available()
        if ok:
            run.append(("diffusers", "peer"))
        else:
            skipped["diffusers"] = why
    if wanted is not None:
        run = [(n, k) for n, k in run if n in wanted]
        skipped = {n: r for n, r in skipped.items() if n in wanted}
    return run, skipped


class _Progress:
    """tqdm if installed, else one line per step on stderr."""

    def __init__(self, total, desc):
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, mininterval=0.5, leave=False)
        except ImportError:
            self._bar = None
            self._n, self._total = 0, total

    def note(self, text):
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
        else:
            print(f"[{self._n}/{self._total}] {text}", file=sys.stderr, flush=True)

    def update(self, n=1):
        if self._bar is not None:
            self._bar.update(n)
        else:
            self._n += n

    def close(self):
        if self._bar is not None:
            self._bar.close()


def main(argv=None) -> int:
    if "--e2e" in (sys.argv[1:] if argv is None else argv):  # its own parser: see bench/e2e.py
        from .e2e import main as e2e_main

        return e2e_main([a for a in (sys.argv[1:] if argv is None else argv) if a != "--e2e"])
    args = _parser().parse_args(argv)
    if args.host:
        from . import host
        return host.main(args)
    if args.dry_run:
        return _dry_run(args)
    if args.samplers:
        from . import samplers
        return samplers.main(args)
    import torch

    from . import measure, reliability
    from .loops import LOOPS, run_loops
    from .report import SCHEMA, table, write_all

    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device: CUDA was asked for but no CUDA device is visible")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device: expected cpu or cuda, got {device}")
    dev = device.type
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads: expected a positive count, got {args.threads}")
        torch.set_num_threads(args.threads)
    dtypes = _dtypes(args.dtype)
    sizes = _sizes(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)[dev], "--sizes")
    loop_size = _sizes(args.loop_size or (QUICK_LOOP_SIZES if args.quick else LOOP_SIZES)[dev], "--loop-size")[0]
    try:
        chosen = cases_mod.select(args.ops)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    compile_on = (not args.quick) if args.compile is None else args.compile
    loops_on = args.loops
    wanted = [w.strip() for w in args.backends.split(",") if w.strip()] if args.backends else None
    print("ddpm-fast bench: finding backends (a first use may build the C++ extension)...", file=sys.stderr)
    t_discover = time.perf_counter()
    impls, skipped = plan_impls(device, wanted, compile_on)
    discovery_s = time.perf_counter() - t_discover
    gpu = dev == "cuda"
    if args.quick:
        budget = measure.Budget(warmup=1, min_runs=5, min_seconds=0.01, max_runs=20, max_seconds=0.15)
    elif gpu:
        budget = measure.Budget(warmup=10, min_runs=50, min_seconds=0.2, max_runs=2000, max_seconds=1.0)
    else:
        budget = measure.Budget(warmup=2, min_runs=10, min_seconds=0.3, max_runs=200, max_seconds=1.2)

    kept = dev == "cpu" and args.keep_freed_memory and keep_freed_memory()
    meta = {"schema": SCHEMA, "kept_freed_memory": kept, "device": str(device), "device_name": _device_name(device),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": list(sys.argv[1:] if argv is None else argv), "quick": args.quick,
            "dtypes": [str(d).replace("torch.", "") for d in dtypes], "sizes": ["x".join(map(str, s)) for s in sizes],
            "impls": [n for n, _ in impls], "budget": vars(budget), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_start": _loadavg(),
            "discovery_s": discovery_s,
            "load_limit_cores": reliability.load_limit_cores(dev, os.cpu_count() or 1, torch.get_num_threads()),
            "spread_limit_pct": reliability.SPREAD_LIMIT_PCT}
    meta.update(_versions())
    print(f"ddpm-fast bench on {meta['device_name']} ({device}); implementations: {', '.join(meta['impls'])}",
          file=sys.stderr)
    for name, why in skipped.items():
        print(f"  not timed: {name}: {why}", file=sys.stderr)

    copy_bytes = (1 << 30) if gpu else ((32 << 20) if args.quick else (256 << 20))
    copy_gbps, copy_t = measure.copy_bandwidth(device, copy_bytes, budget)
    meta.update(copy_gbps=copy_gbps, copy_bytes=copy_bytes, copy_ms=copy_t.median_ms, copy_runs=copy_t.runs,
                copy_gbps_at={})

    loop_impls = [n for n, k in impls if k in ("fused", "eager", "peer")] if loops_on else []
    units = len(sizes) * len(dtypes) * len(chosen) * len(impls) + len(LOOPS) * len(loop_impls)
    progress = _Progress(units, "ddpm-fast bench")
    rows, check_seed, compiled_key = [], args.seed * 1000 + 1, {}
    for shape in sizes:
        for dtype in dtypes:
            for case in chosen:
                rows += _bench_case(case, shape, dtype, device, impls, skipped, budget, meta, args,
                                    progress, check_seed, compiled_key)
                check_seed += 100
    loops = []
    if loops_on:
        progress.note(f"sampling loops {'x'.join(map(str, loop_size))}")
        loop_dtype = dtypes[0]
        loops = run_loops(device, loop_dtype, loop_size, loop_impls, progress, max_steps=20 if args.quick else None)
        for r in loops:
            r["dtype"] = str(loop_dtype).replace("torch.", "")
    progress.close()
    reliability.assess_loops(loops, meta)
    # the copy rate at each size: median over the op cases (each measured in its own rounds)
    meta["copy_gbps_at"] = {k: statistics.median(v) for k, v in meta["copy_gbps_at"].items() if v}
    meta["elapsed_s"] = time.perf_counter() - started
    meta["loadavg_end"] = _loadavg()
    results = {"meta": meta, "rows": rows, "loops": loops, "skipped_backends": skipped}
    meta["trustworthy"], meta["verdict"] = reliability.verdict(results)
    paths = write_all(results, args.out)
    print(table(results))
    print(f"\nwrote {paths['json']}, {paths['csv']}, {paths['table']}; chart: {paths['png']}")
    print(f"total {meta['elapsed_s']:.1f} s")
    print(meta["verdict"].split(";")[0].split(". ")[0].rstrip(".") + ".")  # the verdict, last
    return 0


def _bench_case(case, shape, dtype, device, impls, skipped, budget, meta, args, progress, seed,
                compiled_key) -> list:
    """Rows for one (case, size, dtype): every implementation checked, timed and counted.
    compiled_key: {"last": (op, var_type, size, dtype) compiled last}, carried between calls."""
    import torch

    from .. import ops, reference
    from . import check, measure, peers, reliability

    size = "x".join(map(str, shape))
    dt = str(dtype).replace("torch.", "")
    nbytes = case.traffic(shape, dtype).total
    gen = torch.Generator().manual_seed(seed)
    first = case.inputs(shape, dtype, device, gen)
    set_bytes = sum(a.numel() * a.element_size() for a in first.args if isinstance(a, torch.Tensor))
    sets = [first] + [case.inputs(shape, dtype, device, gen)
                      for _ in range(measure.rotation_count(set_bytes, device, args.quick) - 1)]

    def row(backend, kind, **kw):
        r = {"op": case.name, "label": case.label, "api": case.op, "backend": backend, "kind": kind, "size": size,
             "device": str(device), "dtype": dt, "status": "ok", "check": "n/a", "max_rel_err": None,
             "median_ms": None, "q1_ms": None, "q3_ms": None, "iqr_ms": None, "runs": 0,
             "speedup_vs_eager": None, "speedup_vs_compile": None, "bytes": nbytes, "gbps": None,
             "pct_copy_bw": None, "aten_ops": None, "kernels": None, "syncs": None, "h2d": None,
             "compile_s": None, "note": "", "input_sets": len(sets), "rounds": None, "spread_pct": None,
             "speedup_vs_eager_q1": None, "speedup_vs_eager_q3": None, "speedup_vs_compile_q1": None,
             "speedup_vs_compile_q3": None, "copy_gbps_at_size": None, "other_load_cores": None,
             "reliable": None, "flags": "", "unreliable_why": ""}
        r.update(kw)
        return r

    out = [row(name, "skipped", status="skipped", note=why) for name, why in skipped.items()]
    fresh = None  # check inputs and reference outputs, shared by every implementation checked
    timed = []  # (row, call, argument sets, count ops?) of every implementation that passed its check
    for name, kind in impls:
        progress.note(f"{case.name} {name} {size} {dt} (check)")
        r = row(name, kind)
        out.append(r)
        try:
            if kind == "peer":
                peer = peers.make(case.peer, device) if case.peer else None
                if peer is None:
                    r.update(status="skipped", note="no diffusers equivalent")
                    continue
                r["label"], r["note"] = case.label, peer.name
                r["max_rel_err"] = check.peer_error(peer, case, sets[0])
                timed.append((r, functools.partial(_no_grad, peer.call),
                              [s.args + (peer.timestep(s.t0),) for s in sets], True))
                continue
            if kind == "compiled":
                # A fresh compile per op variant, size and dtype, so that compile_s is its own
                # compile time; a fwd+bwd case reuses the forward compiled by the forward case just
                # before it (the on-disk inductor cache may also serve kernels from an earlier run).
                key = (case.op, case.var_type, size, dt)
                if compiled_key.get("last") != key:
                    torch._dynamo.reset()
                    compiled_key["last"] = key
                elif case.backward:
                    r["note"] = "forward graph compiled by the fwd case above; compile_s: the backward"
                case.schedule.table(device, reference.compute_dtype(dtype))  # cached before tracing
                fn = torch.compile(getattr(reference, case.op), dynamic=False)
                t0 = time.perf_counter()
                case.run(fn, sets[0].args)
                measure.sync(device)
                r["compile_s"] = time.perf_counter() - t0
            else:
                fn = functools.partial(getattr(ops, case.op), backend=name, validate=False)
            if kind == "eager":
                r["check"] = "oracle"
            else:
                if fresh is None:
                    check_shape = (min(shape[0], CHECK_BATCH[device.type]), *shape[1:])
                    fresh = check.fresh(case, check_shape, dtype, device, seed + 99)
                res = check.check(case, fn, fresh)
                r["check"], r["max_rel_err"] = ("pass" if res.ok else "fail"), res.max_rel_err
                if not res.ok:
                    r.update(status="failed_check", note=f"not timed: {res.detail}")
                    continue
            timed.append((r, functools.partial(_run, case, fn), [s.args for s in sets], kind != "compiled"))
        except Exception as exc:  # report and go on with the next implementation
            r.update(status="error", note=_why(exc))

    # The %copy yardstick: x.clone() over as many sources as cover the op's rotated working set
    # (the same cache footprint), timed in the same rounds as the implementations.
    one = math.prod(shape) * dtype.itemsize
    copy_srcs = [(torch.empty(shape, dtype=dtype, device=device).uniform_(),)
                 for _ in range(max(1, -(-len(sets) * set_bytes // one)))]
    progress.note(f"{case.name} {size} {dt}: timing {len(timed)} implementations interleaved")
    entries = [(call, arg_sets) for _, call, arg_sets, _ in timed] + [(torch.clone, copy_srcs)]
    try:
        got = measure.time_interleaved(entries, device, budget)
    except Exception:  # an implementation failed while timed: find it, time the others without it
        for r, call, arg_sets, _ in timed:
            try:
                for args_ in arg_sets:
                    call(*args_)
            except Exception as exc:
                r.update(status="error", note=f"failed while timed: {_why(exc)}")
        timed = [e for e in timed if e[0]["status"] == "ok"]
        entries = [(call, arg_sets) for _, call, arg_sets, _ in timed] + [(torch.clone, copy_srcs)]
        got = measure.time_interleaved(entries, device, budget)
    copy_t = got.timings[-1]
    copy_gbps = 2 * one / (copy_t.median_ms * 1e-3) / 1e9
    for i, (r, call, arg_sets, count) in enumerate(timed):
        t = got.timings[i]
        r.update(median_ms=t.median_ms, q1_ms=t.q1_ms, q3_ms=t.q3_ms, iqr_ms=t.iqr_ms, runs=t.runs,
                 rounds=got.n_rounds, spread_pct=100.0 * t.iqr_ms / t.median_ms if t.median_ms > 0 else None,
                 other_load_cores=got.load.other_cores, copy_gbps_at_size=copy_gbps,
                 _samples=(t, got.rounds[i]))
        if count:
            try:
                c = measure.count_ops(call, arg_sets[0])
                r.update(aten_ops=c.ops, kernels=c.kernels, syncs=c.syncs, h2d=c.h2d)
            except Exception as exc:
                r["note"] = (r["note"] + "; " if r["note"] else "") + f"ops not counted: {_why(exc)}"
    meta["copy_gbps_at"].setdefault(f"{size} {dt}", []).append(copy_gbps)
    progress.update(len(impls))
    _speedups(out)
    reliability.assess_rows(out, meta)
    for r in out:
        r.pop("_samples", None)
    if device.type == "cuda":
        del sets, fresh, copy_srcs, entries
        torch.cuda.empty_cache()
    return out


def _no_grad(fn, *args):
    import torch

    with torch.no_grad():
        return fn(*args)


def _why(exc) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def _run(case, fn, *args):
    return case.run(fn, args)


def _speedups(rows):
    """GB/s, %copy and the speedups of every timed row; the speedups' spread from the rounds in
    which both implementations ran (interleaved timing pairs them)."""
    from . import measure

    ok = {r["backend"]: r for r in rows if r["status"] == "ok" and r["median_ms"]}
    eager, compiled = ok.get("reference"), ok.get("compile")
    for r in ok.values():
        r["gbps"] = r["bytes"] / (r["median_ms"] * 1e-3) / 1e9
        if r.get("copy_gbps_at_size"):
            r["pct_copy_bw"] = 100.0 * r["gbps"] / r["copy_gbps_at_size"]
        for base, key in ((eager, "speedup_vs_eager"), (compiled, "speedup_vs_compile")):
            if base is None:
                continue
            r[key] = base["median_ms"] / r["median_ms"]
            q = measure.paired_ratio_quartiles(*base["_samples"], *r["_samples"])
            if q is not None:
                r[key + "_q1"], r[key + "_q3"] = q[0], q[2]
