"""Writing results: the printed table, JSON, CSV and the PNG speedup chart."""
from __future__ import annotations

import csv
import json
import math
import os

SCHEMA = "ddpm_fast.bench/1"

# One CSV row per (op, backend, size, device, dtype); these columns, in this order.
CSV_COLUMNS = (
    "op", "label", "backend", "kind", "size", "device", "dtype", "status", "check", "max_rel_err",
    "median_ms", "q1_ms", "q3_ms", "iqr_ms", "runs", "speedup_vs_eager", "speedup_vs_compile",
    "bytes", "gbps", "pct_copy_bw", "aten_ops", "kernels", "syncs", "h2d", "compile_s", "note",
    "ddpm_fast_version", "torch_version", "triton_version", "diffusers_version", "device_name", "timestamp",
)
META_IN_ROWS = ("ddpm_fast_version", "torch_version", "triton_version", "diffusers_version", "device_name",
                "timestamp")


def _f(x, fmt, none="-"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, fmt)


def table(results: dict) -> str:
    """The human-readable table: one block per (size, dtype), one line per (op, backend)."""
    meta, rows = results["meta"], results["rows"]
    lines = [
        f"ddpm-fast bench: {meta['device_name']} ({meta['device']}), torch {meta['torch_version']}, "
        f"ddpm_fast {meta['ddpm_fast_version']}, {meta['timestamp']}, {meta.get('torch_threads')} torch threads, "
        f"{meta.get('elapsed_s', 0):.0f} s",
        f"copy bandwidth {meta['copy_gbps']:.1f} GB/s (device-to-device copy of {meta['copy_bytes'] >> 20} MiB, "
        f"read + written, fastest of {meta.get('copy_runs', '?')} runs)",
        "ms: median (IQR, or n = runs when fewer than 4) per call; x eager / x compile: speedup against the "
        "eager reference / torch.compile of it; MB, GB/s: the op's own bytes (ddpm_fast.traffic); %copy: GB/s "
        "against a copy at the same size (x.clone() of one input, median, same input rotation: 'copy at size' "
        "below); ops / syncs: aten ops and host syncs per call; err: max error vs float64 reference, relative to "
        "max(1, |ref|)",
    ]
    if meta.get("kept_freed_memory"):
        lines.append("freed memory kept in the process (glibc mallopt; --no-keep-freed-memory to measure without): "
                     "outputs are not page-faulted in on every call, for every implementation alike")
    if (meta.get("discovery_s") or 0) > 10:
        lines.append(f"finding the backends took {meta['discovery_s']:.0f} s (building the C++ extension, or "
                     f"importing diffusers / triton, on a busy machine)")
    loads = [x for x in (meta.get("loadavg_start"), meta.get("loadavg_end")) if x is not None]
    if loads and meta.get("device", "").startswith("cpu") and max(loads) > (meta.get("cpu_count") or 1):
        lines.append(f"WARNING: load average {max(loads):.1f} on {meta.get('cpu_count')} cores while measuring: "
                     f"other processes shared the CPU, CPU timings are inflated and noisy")
    head = (f"{'op':<31} {'backend':<10} {'ms (IQR)':>17} {'x eager':>7} {'x comp':>7} {'MB':>7} "
            f"{'GB/s':>6} {'%copy':>6} {'ops':>5} {'syncs':>5} {'err':>7}  note")
    groups = []
    for r in rows:
        key = (r["size"], r["dtype"])
        if key not in groups:
            groups.append(key)
    for size, dtype in groups:
        at = (meta.get("copy_gbps_at") or {}).get(f"{size} {dtype}")
        lines += ["", f"== {size} {dtype} on {meta['device']} ==" + (f" (copy at size {at:.1f} GB/s)" if at else ""),
                  head, "-" * len(head)]
        hidden = set(results.get("skipped_backends") or ())  # listed once at the end instead
        for r in (r for r in rows if (r["size"], r["dtype"]) == (size, dtype) and r["backend"] not in hidden):
            if r["status"] == "ok":
                spread = f"{r['iqr_ms']:.3f}" if r["runs"] >= 4 else f"n={r['runs']}"  # no IQR from < 4 runs
                ms = f"{r['median_ms']:.3f} ({spread})"
                note = r["note"]
                if r.get("compile_s") is not None:
                    note = f"compiled in {r['compile_s']:.1f} s" + (f"; {note}" if note else "")
                lines.append(
                    f"{r['label']:<31} {r['backend']:<10} {ms:>17} {_f(r['speedup_vs_eager'], '.2f'):>7} "
                    f"{_f(r['speedup_vs_compile'], '.2f'):>7} {r['bytes'] / 1e6:>7.1f} {_f(r['gbps'], '.1f'):>6} "
                    f"{_f(r['pct_copy_bw'], '.0f'):>6} {_f(r['aten_ops'], 'd'):>5} {_f(r['syncs'], 'd'):>5} "
                    f"{_f(r['max_rel_err'], '.1e'):>7}  {note}"
                )
            else:
                lines.append(f"{r['label']:<31} {r['backend']:<10} {r['status'].upper() + ': ' + r['note']}")
    if results.get("loops"):
        lines += ["", "Sampling loops (tiny stand-in network: one 3x3 conv); outside = (loop - network alone) / steps",
                  f"{'loop':<10} {'size':<12} {'impl':<10} {'mode':<10} {'total ms':>10} {'net ms':>9} "
                  f"{'outside ms/step':>15} {'ops/step':>8} {'syncs/step':>10}  note"]
        for r in results["loops"]:
            loop = f"{r['loop']} {r['steps']}"
            if r["status"] == "ok":
                lines.append(
                    f"{loop:<10} {r['size']:<12} {r['impl']:<10} {r['mode']:<10} {r['total_ms']:>10.1f} "
                    f"{r['net_ms']:>9.1f} {r['outside_ms_per_step']:>15.3f} {_f(r['ops_per_step'], '.1f'):>8} "
                    f"{_f(r['syncs_per_step'], '.1f'):>10}  {r['note']}"
                )
            else:
                lines.append(f"{loop:<10} {r['size']:<12} {r['impl']:<10} {r['mode']:<10} "
                             f"{r['status'].upper()}: {r['note']}")
    if results.get("skipped_backends"):
        lines += ["", "Not timed:"] + [f"  {k}: {v}" for k, v in results["skipped_backends"].items()]
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
    """Speedup vs the eager reference per op, one bar per backend, one panel per (size, dtype).
    Returns '' on success, else why no chart was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}); no PNG chart (pip install matplotlib)"
    rows = [r for r in results["rows"] if r["status"] == "ok" and r.get("speedup_vs_eager")]
    groups = sorted({(r["size"], r["dtype"]) for r in rows}) or [("", "")]
    fig, axes = plt.subplots(len(groups), 1, figsize=(12, 4.5 * len(groups)), squeeze=False)
    for ax, (size, dtype) in zip(axes[:, 0], groups):
        sub = [r for r in rows if (r["size"], r["dtype"]) == (size, dtype)]
        ops = list(dict.fromkeys(r["op"] for r in sub))
        backends = list(dict.fromkeys(r["backend"] for r in sub))
        width = 0.8 / max(1, len(backends))
        for j, b in enumerate(backends):
            xs, ys = [], []
            for i, op in enumerate(ops):
                hit = [r for r in sub if r["op"] == op and r["backend"] == b]
                if hit:
                    xs.append(i + (j - (len(backends) - 1) / 2) * width)
                    ys.append(hit[0]["speedup_vs_eager"])
            ax.bar(xs, ys, width, label=b)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(ops)))
        ax.set_xticklabels(ops, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("speedup vs eager reference")
        meta = results["meta"]
        ax.set_title(f"{size} {dtype} on {meta['device_name']} ({meta['device']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return ""


def write_all(results: dict, out_dir: str) -> dict:
    """Write results.json, results.csv and speedup.png into out_dir; returns {kind: path or why not}."""
    os.makedirs(out_dir, exist_ok=True)
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
