"""Which timings to trust: every timed row is flagged when its own spread, the machine's load while
it was timed, its run count or its result against the copy rate makes it unreliable, and the run as
a whole gets a verdict. The flags travel into the table, the CSV, the JSON and the chart.

Flags (a row may carry several):
- ``spread``: the interquartile range of its runs is more than SPREAD_LIMIT_PCT of its median, so
  its median (and every ratio built on it) is not known to better than that.
- ``load``: other processes took more CPU than the benchmark left free (cores not used by its
  torch threads, plus LOAD_SLACK_CORES for the background a quiet machine has), measured from
  /proc/stat over the interleaved timing of the row's op: its timings are inflated by however
  much of its threads' time was taken, which varies from run to run.
- ``few``: fewer than MIN_RUNS runs, too few to tell the spread.
- ``>copy``: more than MAX_PCT_COPY of the copy rate at the same size: a streaming op cannot beat a
  copy by that much, so either its timing or the copy's was disturbed.
"""
from __future__ import annotations

SPREAD_LIMIT_PCT = 20.0
LOAD_SLACK_CORES = 0.25
MIN_RUNS = 5
MAX_PCT_COPY = 150.0


def load_limit_cores(device_type: str, cpu_count: int, torch_threads: int) -> float:
    """Cores other processes may use before a row is flagged: those the benchmark leaves free (on
    the CPU its torch threads; on a GPU run the one host thread that launches), plus the slack."""
    busy = torch_threads if device_type == "cpu" else 1
    return max(0, cpu_count - busy) + LOAD_SLACK_CORES


def flags_of(row: dict, load_limit: float | None) -> list:
    """[(flag, why)] for one timed row (empty: reliable)."""
    out = []
    runs = row.get("runs") or 0
    if runs < MIN_RUNS:
        out.append(("few", f"{runs} runs < {MIN_RUNS}"))
    elif row.get("spread_pct") is not None and row["spread_pct"] > SPREAD_LIMIT_PCT:
        out.append(("spread", f"IQR {row['spread_pct']:.0f}% of the median > {SPREAD_LIMIT_PCT:.0f}%"))
    other = row.get("other_load_cores")
    if load_limit is not None and other is not None and other > load_limit:
        out.append(("load", f"other processes used {other:.2f} cores > {load_limit:.2f}"))
    pct = row.get("pct_copy_bw")
    if pct is not None and pct > MAX_PCT_COPY:
        out.append((">copy", f"{pct:.0f}% of the copy rate > {MAX_PCT_COPY:.0f}%"))
    return out


def _mark(row: dict, flags: list):
    row["reliable"] = not flags
    row["flags"] = ",".join(f for f, _ in flags)
    row["unreliable_why"] = "; ".join(w for _, w in flags)


def assess_rows(rows: list, meta: dict):
    """Set reliable / flags / unreliable_why on every timed ("ok") row."""
    for r in rows:
        if r.get("status") == "ok":
            _mark(r, flags_of(r, meta.get("load_limit_cores")))


def assess_loops(loops: list, meta: dict):
    """Sampling loops run once each: flagged by load only."""
    limit = meta.get("load_limit_cores")
    for r in loops:
        if r.get("status") == "ok":
            other = r.get("other_load_cores")
            flags = []
            if limit is not None and other is not None and other > limit:
                flags.append(("load", f"other processes used {other:.2f} cores > {limit:.2f}"))
            _mark(r, flags)


def verdict(results: dict) -> tuple:
    """(trustworthy, one paragraph saying why) for the whole run."""
    meta = results["meta"]
    timed = [r for r in results["rows"] if r.get("status") == "ok"]
    loops = [r for r in results.get("loops") or () if r.get("status") == "ok"]
    flagged = [r for r in timed if not r.get("reliable")]
    flagged_loops = [r for r in loops if not r.get("reliable")]
    counts = {}
    for r in flagged + flagged_loops:
        for f in r["flags"].split(","):
            counts[f] = counts.get(f, 0) + 1
    by_flag = ", ".join(f"{f}: {n}" for f, n in sorted(counts.items()))
    load_known = any(r.get("other_load_cores") is not None for r in timed)
    parts = []
    if not timed:
        return False, "NOT TRUSTWORTHY: nothing was timed."
    if flagged or flagged_loops:
        parts.append(f"{len(flagged)} of {len(timed)} timed rows and {len(flagged_loops)} of {len(loops)} "
                     f"sampling loops are flagged unreliable ({by_flag})")
    else:
        parts.append(f"all {len(timed)} timed rows and {len(loops)} sampling loops passed the checks (spread <= "
                     f"{SPREAD_LIMIT_PCT:.0f}%, other processes <= {meta.get('load_limit_cores', 0):.2f} cores, "
                     f">= {MIN_RUNS} runs, <= {MAX_PCT_COPY:.0f}% of the copy rate)")
    if not load_known:
        parts.append("the machine's load could not be measured here (no /proc/stat)")
    if meta.get("quick"):
        parts.append("--quick is a smoke run with few runs at a tiny size, not a measurement")
    ok = not flagged and not flagged_loops and not meta.get("quick") and load_known
    head = "TRUSTWORTHY" if ok else "NOT TRUSTWORTHY"
    tail = "" if ok else (" Re-run on a quiet machine (nothing else running) before quoting these numbers; "
                          "flagged rows are marked '!' in the table, hatched in the chart, and carry "
                          "reliable=false in the CSV / JSON.")
    return ok, f"{head}: " + "; ".join(parts) + "." + tail
