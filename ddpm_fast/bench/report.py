"""Writing results: the printed table, JSON, CSV and the PNG speedup chart."""
from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import textwrap

SCHEMA = "ddpm_fast.bench/2"

# One CSV row per (op, backend, size, device, dtype); these columns, in this order.
CSV_COLUMNS = (
    "op", "label", "backend", "kind", "size", "device", "dtype", "status", "check", "max_rel_err",
    "median_ms", "q1_ms", "q3_ms", "iqr_ms", "spread_pct", "runs", "rounds", "reliable", "flags", "unreliable_why",
    "other_load_cores", "speedup_vs_eager", "speedup_vs_eager_q1", "speedup_vs_eager_q3", "speedup_vs_compile",
    "speedup_vs_compile_q1", "speedup_vs_compile_q3", "bytes", "gbps", "copy_gbps_at_size", "pct_copy_bw",
    "aten_ops", "kernels", "syncs", "h2d", "compile_s", "note",
    "ddpm_fast_version", "torch_version", "triton_version", "diffusers_version", "device_name", "timestamp",
)
META_IN_ROWS = ("ddpm_fast_version", "torch_version", "triton_version", "diffusers_version", "device_name",
                "timestamp")


def _f(x, fmt, none="-"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, fmt)


WIDTH = 100  # the console table fits this many columns; every detail is in the CSV / JSON


def _wrap(text, indent="", first=""):
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=indent, break_on_hyphens=False) or [""]


def _g(x, digits=4, none="-"):
    """A number in ``digits`` significant digits, never in exponent form for the sizes here."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    if abs(x) >= 10 ** digits:
        return f"{x:.0f}"
    return f"{x:.{digits}g}" if abs(x) >= 10 ** -(digits - 1) else f"{x:.{digits - 1}f}"


def _line(fixed: str, flags: str) -> list:
    """A table line, its flags wrapped onto the next line when they would pass WIDTH."""
    if not flags:
        return [fixed.rstrip()]
    if len(fixed) + len(flags) <= WIDTH:
        return [fixed + flags]
    return [fixed.rstrip(), " " * (WIDTH - len(flags)) + flags]


def _row(r: dict, first: str, indent: int, columns) -> list:
    """A table row's lines: `first` (its leading columns), then for an "ok" row columns(r) and its flags,
    otherwise its status and note wrapped at `indent` columns."""
    if r["status"] == "ok":
        return _line(first + columns(r), "!" + r["flags"] if r.get("flags") else "")
    return _wrap(f"{r['status'].upper()}: {r['note']}", indent=" " * indent, first=first)


def _op_columns(r: dict) -> str:
    """The columns of an "ok" op row after its label and backend (OP_HEAD)."""
    spread = "-"
    if r.get("spread_pct") is not None and r["runs"] >= 4:
        spread = f"{r['spread_pct']:.0f}" if r["spread_pct"] < 999.5 else ">999"
    return (f"{_g(r['median_ms']):>7} {spread:>4} {_g(r['speedup_vs_eager'], 3):>7} "
            f"{_g(r['speedup_vs_compile'], 3):>6} {_f(r['pct_copy_bw'], '.0f'):>5} {_f(r['aten_ops'], 'd'):>4} "
            f"{_f(r['syncs'], 'd'):>5} ")


def _loop_columns(r: dict) -> str:
    """The columns of an "ok" sampling-loop row after its loop, impl and mode."""
    return (f"{_g(r['total_ms'], 5):>9} {_g(r['net_ms'], 5):>9} {_g(r['outside_ms_per_step']):>15} "
            f"{_f(r['ops_per_step'], '.1f'):>8} {_f(r['syncs_per_step'], '.1f'):>10}  ")


OP_HEAD = (f"{'op':<30} {'backend':<9} {'ms':>7} {'IQR%':>4} {'x eager':>7} {'x comp':>6} {'%copy':>5} "
           f"{'ops':>4} {'syncs':>5} ")


def table(results: dict) -> str:
    """The human-readable table, at most WIDTH columns: one block per (size, dtype), one line per (op,
    backend); rows flagged unreliable carry '!' and their flags; the verdict on the run at the end."""
    meta, rows = results["meta"], results["rows"]
    lines = _wrap(
        f"ddpm-fast bench: {meta['device_name']} ({meta['device']}), torch {meta['torch_version']}, "
        f"ddpm_fast {meta['ddpm_fast_version']}, {meta['timestamp']}, {meta.get('torch_threads')} torch threads, "
        f"{meta.get('elapsed_s', 0):.0f} s")
    lines += _wrap(f"copy bandwidth {meta['copy_gbps']:.1f} GB/s (device-to-device copy of {meta['copy_bytes'] >> 20} "
                   f"MiB, read + written, fastest of {meta.get('copy_runs', '?')} runs)")
    lines += _wrap(
        "ms: median per call; IQR%: interquartile range of the runs in % of the median; implementations of an "
        "op are timed interleaved (rotated within each round); x eager / x comp: speedup against the eager "
        "reference / torch.compile of it; %copy: GB/s of the op's own bytes (ddpm_fast.traffic) against "
        "x.clone() of one input at the same size, timed in the same rounds; ops / syncs: aten ops and host "
        "syncs per call. '!': unreliable (spread: IQR% > "
        f"{meta.get('spread_limit_pct', 20):.0f}; load: other processes used > "
        f"{meta.get('load_limit_cores', 0):.2f} cores; few: < 5 runs; >copy: implausibly above the copy "
        "rate). Errors, runs, quartiles and speedup ranges: results.csv / results.json.")
    if meta.get("kept_freed_memory"):
        lines += _wrap("freed memory kept in the process (glibc mallopt; --no-keep-freed-memory to measure "
                       "without): outputs are not page-faulted in on every call, for every implementation alike")
    if (meta.get("discovery_s") or 0) > 10:
        lines += _wrap(f"finding the backends took {meta['discovery_s']:.0f} s (building the C++ extension, or "
                       f"importing diffusers / triton, on a busy machine)")
    loads = [x for x in (meta.get("loadavg_start"), meta.get("loadavg_end")) if x is not None]
    if loads and meta.get("device", "").startswith("cpu") and max(loads) > (meta.get("cpu_count") or 1):
        lines += _wrap(f"WARNING: load average {max(loads):.1f} on {meta.get('cpu_count')} cores while measuring: "
                       f"other processes shared the CPU, CPU timings are inflated and noisy")
    groups = []
    for r in rows:
        key = (r["size"], r["dtype"])
        if key not in groups:
            groups.append(key)
    hidden = set(results.get("skipped_backends") or ())  # listed once at the end instead
    for size, dtype in groups:
        # the copy rate at this size, measured with each op in its rounds: its range over the ops
        at = [r["copy_gbps_at_size"] for r in rows if (r["size"], r["dtype"]) == (size, dtype)
              and r.get("copy_gbps_at_size")]
        at_text = ""
        if at:
            lo, hi = min(at), max(at)
            at_text = f" (copy at size {lo:.1f} GB/s)" if hi < 1.1 * lo else \
                f" (copy at size {lo:.1f}-{hi:.1f} GB/s over the ops: see copy_gbps_at_size)"
        lines += [""] + _wrap(f"== {size} {dtype} on {meta['device']} ==" + at_text, indent="   ")
        lines += [OP_HEAD + "flags", "-" * WIDTH]
        for r in (r for r in rows if (r["size"], r["dtype"]) == (size, dtype) and r["backend"] not in hidden):
            lines += _row(r, f"{r['label']:<30} {r['backend']:<9} ", 41, _op_columns)
    loop_rows = results.get("loops") or []
    if loop_rows:
        sizes = sorted({r["size"] for r in loop_rows})
        lines += [""] + _wrap(f"Sampling loops, {', '.join(sizes)} (stand-in network: one 3x3 conv); outside ms/step "
                              f"= (loop - network alone) / steps")
        lines += [f"{'loop':<10} {'impl':<9} {'mode':<10} {'total ms':>9} {'net ms':>9} {'outside ms/step':>15} "
                  f"{'ops/step':>8} {'syncs/step':>10}  flags", "-" * WIDTH]
        no_graph = [r for r in loop_rows if r["mode"] == "cuda_graph" and r["status"] == "skipped"
                    and r["note"] == "CUDA graphs need a CUDA device"]
        for r in loop_rows:
            if r in no_graph:
                continue
            loop = f"{r['loop']} {r['steps']}"
            lines += _row(r, f"{loop:<10} {r['impl']:<9} {r['mode']:<10} ", 32, _loop_columns)
        notes = sorted({r["note"] for r in loop_rows if r["status"] == "ok" and r["note"]})
        if no_graph:
            notes.append("cuda_graph mode not run: CUDA graphs need a CUDA device")
        lines += [x for n in notes for x in _wrap(n, indent="  ", first="  ")]
    if results.get("skipped_backends"):
        lines += ["", "Not timed:"]
        for k, v in results["skipped_backends"].items():
            lines += _wrap(f"{k}: {v}", indent="    ", first="  ")
    if meta.get("verdict"):
        lines += [""] + _wrap(meta["verdict"])
    return "\n".join(lines)


def write_json(results: dict, path: str):
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)


def write_csv(results: dict, path: str):
    meta = results["meta"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in results["rows"]:
            row = {k: meta.get(k) for k in META_IN_ROWS}
            row.update({k: v for k, v in r.items() if k in CSV_COLUMNS and k not in META_IN_ROWS})
            w.writerow({k: "" if v is None else v for k, v in row.items()})


def write_png(results: dict, path: str) -> str:
    """Speedup against the eager reference: one panel per (size, dtype), one group of horizontal
    bars per op (named as in the table), one bar per implementation, its paired-round IQR as an
    error bar. Rows flagged unreliable are hatched and marked '!'; the run's verdict is in the
    title. Returns '' on success, else why no chart was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}); no PNG chart (pip install matplotlib)"
    meta = results["meta"]
    rows = [r for r in results["rows"]
            if r["status"] == "ok" and r.get("speedup_vs_eager") and r["backend"] != "reference"]
    groups = list(dict.fromkeys((r["size"], r["dtype"]) for r in rows)) or [("", "")]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    colors = {b: plt.cm.tab10(i) for i, b in enumerate(backends)}
    heights = []
    for size, dtype in groups:
        heights.append(max(1, len({r["label"] for r in rows if (r["size"], r["dtype"]) == (size, dtype)})))
    bar_h = 0.8 / max(1, len(backends))
    fig_h = sum(1.2 + 0.28 * h * max(1, len(backends)) + 0.3 for h in heights) + 0.9
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, fig_h), squeeze=False,
                             gridspec_kw={"height_ratios": [h * max(1, len(backends)) + 3 for h in heights]})
    for ax, (size, dtype) in zip(axes[:, 0], groups):
        sub = [r for r in rows if (r["size"], r["dtype"]) == (size, dtype)]
        labels = list(dict.fromkeys(r["label"] for r in sub))
        for j, b in enumerate(backends):
            for i, label in enumerate(labels):
                hit = [r for r in sub if r["label"] == label and r["backend"] == b]
                if not hit:
                    continue
                r = hit[0]
                y = i + (j - (len(backends) - 1) / 2) * bar_h
                x = r["speedup_vs_eager"]
                bad = r.get("reliable") is False
                ax.barh(y, x, bar_h * 0.92, color=colors[b], alpha=0.45 if bad else 1.0,
                        hatch="///" if bad else None, edgecolor="black" if bad else colors[b], linewidth=0.6)
                lo, hi = r.get("speedup_vs_eager_q1"), r.get("speedup_vs_eager_q3")
                if lo is not None and hi is not None:
                    ax.errorbar(x, y, xerr=[[max(0.0, x - lo)], [max(0.0, hi - x)]], fmt="none", ecolor="black",
                                elinewidth=0.8, capsize=2)
                ax.text(max(x, hi or x) * 1.08, y, f"{x:.3g}x" + (f"  ! {r['flags']}" if bad else ""),
                        va="center", fontsize=9, color="firebrick" if bad else "black")
        ax.axvline(1.0, color="black", linewidth=1.0)
        ax.set_xscale("log")
        lo_x, hi_x = ax.get_xlim()
        ax.set_xlim(lo_x, hi_x * 8)  # room for the value labels
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=10)
        ax.invert_yaxis()
        ax.tick_params(axis="x", labelsize=10)
        ax.set_xlabel("speedup vs the eager reference (log scale; 1 = eager; bar: median, whisker: IQR over rounds)",
                      fontsize=10)
        ax.set_title(f"{size} {dtype}, {meta['device_name']} ({meta['device']})", fontsize=11)
        handles = [Patch(color=colors[b], label=b) for b in backends]
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="///", label="unreliable (!): see flags"))
        ax.legend(handles=handles, fontsize=10, loc="lower right")
        ax.grid(axis="x", which="major", alpha=0.3)
    verdict = meta.get("verdict", "")
    head = verdict.split(":", 1)[0] if verdict else ""
    if head:
        flagged = sum(1 for r in results["rows"] if r.get("status") == "ok" and r.get("reliable") is False)
        timed = sum(1 for r in results["rows"] if r.get("status") == "ok")
        fig.suptitle(f"ddpm-fast bench, {meta['timestamp']}: {head} ({flagged} of {timed} timed rows flagged"
                     + (", --quick smoke run" if meta.get("quick") else "") + ")",
                     fontsize=12, color="black" if meta.get("trustworthy") else "firebrick")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return ""


def results_dir(path) -> pathlib.Path:
    """Create the output folder ``path`` (parents too). A folder created here gets a .gitignore that
    ignores everything in it (as pytest does for its cache), so results never show up as untracked
    files in a git working tree; an existing folder is left as it is."""
    path = pathlib.Path(path)
    if not path.exists():
        path.mkdir(parents=True)
        (path / ".gitignore").write_text("# made by ddpm-fast: results, not sources\n*\n")
    elif not path.is_dir():
        raise SystemExit(f"{path}: exists and is not a folder")
    return path


def write_all(results: dict, out_dir: str) -> dict:
    """Write results.json, results.csv and speedup.png into out_dir; returns {kind: path or why not}."""
    results_dir(out_dir)
    paths = {k: os.path.join(out_dir, n) for k, n in
             (("json", "results.json"), ("csv", "results.csv"), ("png", "speedup.png"), ("table", "table.txt"))}
    why_no_png = write_png(results, paths["png"])
    if why_no_png:
        results["meta"]["png"] = why_no_png
        paths["png"] = why_no_png
    write_json(results, paths["json"])
    write_csv(results, paths["csv"])
    with open(paths["table"], "w") as f:
        f.write(table(results) + "\n")
    return paths
