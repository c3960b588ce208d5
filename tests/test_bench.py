"""`ddpm-fast bench`: the --quick run end to end on the CPU and the files it writes; the byte
counts of ddpm_fast.traffic; the check that gates timing; op and sync counting; interleaved timing
and the flags that mark unreliable rows. No timings are asserted anywhere."""
import csv
import datetime
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys

import pytest
import torch

from ddpm_fast import reference, traffic
from ddpm_fast.bench import cases, check, measure, reliability, report
from ddpm_fast.bench.report import CSV_COLUMNS, SCHEMA
from ddpm_fast.schedule import COLUMNS

HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _bench(out, *extra):
    cmd = [sys.executable, "-m", "ddpm_fast.cli", "bench", "--quick", "--device", "cpu", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = _bench(out, "--loops")
    with open(out / "results.json") as f:
        results = json.load(f)
    return out, proc.stdout, results


def test_quick_json(quick_run):
    _, _, results = quick_run
    meta, rows = results["meta"], results["rows"]
    assert meta["schema"] == SCHEMA
    assert meta["device"] == "cpu" and meta["quick"] is True
    assert meta["torch_version"] == torch.__version__
    assert meta["ddpm_fast_version"] and meta["device_name"]
    datetime.datetime.fromisoformat(meta["timestamp"])
    assert meta["copy_gbps"] > 0 and meta["copy_bytes"] > 0
    assert meta["kept_freed_memory"] is (platform.libc_ver()[0] == "glibc")  # mallopt needs glibc
    assert set(meta["copy_gbps_at"]) == {"8x3x32x32 float32"} and meta["copy_gbps_at"]["8x3x32x32 float32"] > 0
    assert isinstance(meta["trustworthy"], bool) and meta["verdict"].startswith(
        "TRUSTWORTHY" if meta["trustworthy"] else "NOT TRUSTWORTHY")
    assert not meta["trustworthy"] and "--quick" in meta["verdict"]  # a smoke run is never a measurement
    shape = (8, 3, 32, 32)  # the --quick CPU size
    assert meta["sizes"] == ["8x3x32x32"] and meta["dtypes"] == ["float32"]
    for case in cases.CASES:
        mine = {r["backend"]: r for r in rows if r["op"] == case.name}
        ref = mine["reference"]
        assert ref["status"] == "ok" and ref["check"] == "oracle", ref
        assert ref["median_ms"] > 0 and ref["q1_ms"] <= ref["median_ms"] <= ref["q3_ms"] and ref["runs"] >= 1
        assert ref["bytes"] == case.traffic(shape, torch.float32).total
        assert ref["aten_ops"] > 1 and ref["syncs"] == 0  # the reference never syncs
        assert ref["speedup_vs_eager"] == pytest.approx(1.0)
        assert ref["gbps"] == pytest.approx(ref["bytes"] / (ref["median_ms"] * 1e-3) / 1e9)
        assert ref["pct_copy_bw"] == pytest.approx(100 * ref["gbps"] / ref["copy_gbps_at_size"])
        assert mine["compile"]["status"] == "skipped"  # off under --quick
        for r in mine.values():
            assert r["size"] == "8x3x32x32" and r["device"] == "cpu" and r["dtype"] == "float32"
            assert r["status"] in ("ok", "skipped", "failed_check", "error")
            if r["status"] != "ok":
                assert r["note"], r  # every row that was not timed says why
            if r["kind"] == "fused" and r["status"] == "ok":
                assert r["check"] == "pass"
            if r["status"] == "ok":  # every timed row is assessed, and a flagged one says why
                assert r["rounds"] >= 1 and r["spread_pct"] == pytest.approx(100 * r["iqr_ms"] / r["median_ms"])
                assert r["reliable"] is (r["flags"] == "") and bool(r["unreliable_why"]) is (r["flags"] != "")
                assert set(filter(None, r["flags"].split(","))) <= {"spread", "load", "few", ">copy"}
        assert mine["triton"]["status"] == "skipped"  # never timed on the CPU
        if HAVE_DIFFUSERS:
            peer = mine["diffusers"]
            assert peer["status"] == ("ok" if case.peer else "skipped"), peer
    if HAVE_DIFFUSERS:
        step = next(r for r in rows if r["op"] == "p_sample_step" and r["backend"] == "diffusers")
        assert step["syncs"] > 0  # DDPMScheduler.step syncs on .item()
        assert step["max_rel_err"] < 1e-4  # the same math on the same inputs
    loops = {(r["loop"], r["impl"], r["mode"]): r for r in results["loops"]}
    for loop in ("ddpm", "ddim"):
        eager = loops[(loop, "reference", "eager")]
        assert eager["status"] == "ok" and eager["steps"] == 20 and eager["total_ms"] > 0
        assert eager["syncs_per_step"] == 0
        graph = loops[(loop, "reference", "cuda_graph")]
        assert graph["status"] == "skipped" and "CUDA" in graph["note"]
        if HAVE_DIFFUSERS:
            assert loops[(loop, "diffusers", "eager")]["syncs_per_step"] > 0


def test_quick_csv_png_table(quick_run):
    out, stdout, results = quick_run
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        table_rows = list(reader)
    assert len(table_rows) == len(results["rows"])
    keys = {(r["op"], r["backend"], r["size"], r["device"], r["dtype"]) for r in table_rows}
    assert len(keys) == len(table_rows)  # one row per op, backend, size, device, dtype
    for r in table_rows:
        assert r["torch_version"] == torch.__version__ and r["timestamp"] == results["meta"]["timestamp"]
        assert r["device_name"] and r["ddpm_fast_version"]
        if r["status"] == "ok":
            assert float(r["median_ms"]) > 0 and int(r["bytes"]) > 0
    png = (out / "speedup.png")
    if HAVE_MATPLOTLIB:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib" in results["meta"]["png"]
    table = (out / "table.txt").read_text()
    assert table.strip() in stdout
    assert "== 8x3x32x32 float32 on cpu ==" in table and "copy bandwidth" in table
    for case in cases.CASES:
        assert case.label in table
    assert "Sampling loops" in table and "Not timed:" in table
    assert max(len(line) for line in table.splitlines()) <= report.WIDTH
    assert " ".join(table.split()).endswith(" ".join(results["meta"]["verdict"].split()))  # the verdict ends it
    flagged = [r for r in results["rows"] if r["status"] == "ok" and not r["reliable"]]
    lines = table.splitlines()
    for r in flagged:  # each flagged row is marked on its table line (or the next: long flags wrap there)
        assert any(line.startswith(f"{r['label']:<30} {r['backend']:<9}")
                   and (line.endswith(f"!{r['flags']}") or nxt.strip() == f"!{r['flags']}")
                   for line, nxt in zip(lines, lines[1:] + [""])), (r, table)
    for r in table_rows:
        if r["status"] == "ok":
            assert r["reliable"] in ("True", "False") and (r["reliable"] == "False") is bool(r["flags"])


def test_compile_path(tmp_path):
    """torch.compile of the reference: compiled, checked, timed, its compile time reported."""
    _bench(tmp_path, "--compile", "--ops", "q_sample", "--backends", "reference,compile", "--no-loops")
    with open(tmp_path / "results.json") as f:
        rows = {r["backend"]: r for r in json.load(f)["rows"]}
    assert set(rows) == {"reference", "compile"}
    r = rows["compile"]
    assert r["status"] == "ok" and r["check"] == "pass", r
    assert r["compile_s"] > 0 and r["median_ms"] > 0 and r["speedup_vs_compile"] == pytest.approx(1.0)


@pytest.mark.parametrize("args, flag", [(["--sizes", "8x3"], "--sizes"), (["--ops", "nope"], "--ops"),
                                        (["--dtype", "int8"], "--dtype"), (["--backends", "nope"], "--backends")])
def test_bad_arguments_name_the_flag(args, flag, tmp_path):
    from ddpm_fast.bench import main

    with pytest.raises(SystemExit) as exc:
        main([*args, "--quick", "--out", str(tmp_path)])
    assert flag in str(exc.value.code)
    assert not os.listdir(tmp_path)  # nothing measured, nothing written


# -- traffic ----------------------------------------------------------------------------------
def test_traffic_counts():
    shape, n, b = (2, 3, 4, 4), 96, 2
    rows = b * (8 + 4 * len(COLUMNS))  # t and one float32 table row per sample
    assert traffic.q_sample(shape, torch.float32) == traffic.Traffic(2 * n * 4 + rows, n * 4)
    assert traffic.q_sample(shape, torch.bfloat16) == traffic.Traffic(2 * n * 2 + rows, n * 2)
    assert traffic.q_posterior(shape, torch.float16) == traffic.Traffic(2 * n * 2 + rows, n * 2 + 2 * b * 2)
    # epsilon target: the MSE reads model_output and noise, not x0; [B] loss and mse in float32
    simple = traffic.training_losses(shape, torch.bfloat16, mean_type="epsilon", var_type="fixed_small",
                                     loss_type="mse")
    assert simple == traffic.Traffic(2 * n * 2 + rows, 2 * b * 4)
    both = traffic.training_losses(shape, torch.bfloat16, mean_type="epsilon", var_type="fixed_small",
                                   loss_type="mse", backward=True)
    assert both == simple + traffic.Traffic(simple.read + 2 * b * 4, n * 2)
    # hybrid: model_output has doubled channels; loss, mse and vb
    hybrid = traffic.training_losses(shape, torch.float32, mean_type="epsilon", var_type="learned_range",
                                     loss_type="mse")
    assert hybrid == traffic.Traffic((2 * n + 2 * n) * 4 + rows, 3 * b * 4)
    assert traffic.vb_terms_bpd(shape, torch.float64, var_type="learned_range") == traffic.Traffic(
        4 * n * 8 + b * (8 + 8 * len(COLUMNS)), b * 8)
    assert traffic.p_sample_step(shape, torch.float32, var_type="fixed_small") == traffic.Traffic(2 * n * 4 + rows,
                                                                                                   2 * n * 4)
    given = traffic.p_sample_step(shape, torch.float32, var_type="fixed_small", noise_given=True)
    assert given.read == 3 * n * 4 + rows
    assert traffic.ddim_step(shape, torch.float32, noise_given=True).read == 2 * n * 4 + rows  # eta = 0: no noise
    assert traffic.copy(100).total == 200
    assert traffic.normal_kl([(2, 3), (2, 1), (1, 3), ()], torch.float32) == traffic.Traffic((6 + 2 + 3 + 1) * 4, 24)


def test_traffic_rejects_bad_arguments():
    with pytest.raises(TypeError, match="dtype"):
        traffic.q_sample((2, 3), torch.int64)
    with pytest.raises(ValueError, match="shape"):
        traffic.q_sample((), torch.float32)


# -- the check that gates timing ----------------------------------------------------------------
def _perturbed(op, scale):
    def fn(*args, **kwargs):
        out = op(*args, **kwargs)
        if isinstance(out, dict):
            return {k: v * scale for k, v in out.items()}
        if isinstance(out, tuple):
            return tuple(v * scale for v in out)
        return out * scale
    return fn


@pytest.mark.parametrize("name", ["q_sample", "losses_hybrid_bwd", "p_sample_step", "ddim_step"])
def test_check_accepts_reference_and_rejects_wrong_results(name):
    case = cases.BY_NAME[name]
    data = check.fresh(case, (3, 2, 8, 8), torch.float32, "cpu", seed=5)
    op = getattr(reference, case.op)
    good = check.check(case, op, data)
    assert good.ok, good
    bad = check.check(case, _perturbed(op, 1 + 1e-4), data)
    assert not bad.ok and "bound" in bad.detail


def test_check_rejects_wrong_seeded_noise():
    case = cases.BY_NAME["p_sample_step"]
    data = check.fresh(case, (4, 3, 16, 16), torch.float32, "cpu", seed=6)

    def half_noise(*args, noise=None, seed=None, **kwargs):  # correct with explicit noise only
        if noise is None:
            g = torch.Generator().manual_seed(seed)
            noise = 0.5 * torch.randn(args[1].shape, generator=g)
        return reference.p_sample_step(*args, noise=noise, **kwargs)

    res = check.check(case, half_noise, data)
    assert not res.ok and "seeded noise" in res.detail


def test_check_rejects_wrong_dtype():
    case = cases.BY_NAME["q_sample"]
    data = check.fresh(case, (2, 3, 4, 4), torch.bfloat16, "cpu", seed=7)
    res = check.check(case, lambda x0, t, n, s: reference.q_sample(x0.float(), t, n.float(), s), data)
    assert not res.ok and "bfloat16" in res.detail


def test_reduction_floor_is_log2_of_terms():
    case = cases.BY_NAME["losses_simple"]
    data = check.fresh(case, (2, 3, 8, 8), torch.float32, "cpu", seed=8)
    ref = list(data.ref64)
    eps = torch.finfo(torch.float32).eps
    err_ref = float((data.refd[0].double() - ref[0]).abs().max())
    scale = max(1.0, float(ref[0].abs().max()))
    allowed = 2 * err_ref + 2 * eps * scale * math.ceil(math.log2(3 * 8 * 8))
    nudged = [ref[0].float() + 0.9 * allowed] + [r.float() for r in ref[1:]]
    assert check.compare(case, nudged, data.ref64, data.refd, reduced=3 * 8 * 8).ok
    pushed = [ref[0].float() + 1.5 * allowed] + [r.float() for r in ref[1:]]
    assert not check.compare(case, pushed, data.ref64, data.refd, reduced=3 * 8 * 8).ok


# -- counting ---------------------------------------------------------------------------------
def test_op_counter_counts_ops_and_syncs():
    x = torch.randn(16)
    with measure.OpCounter() as c:
        y = (x * 2 + 1).sum()
        float(y)
        torch.nonzero(x > 0)
    assert c.syncs == 2  # the scalar read and nonzero
    assert c.ops >= 5 and c.h2d == 0


def test_select_ops():
    assert [c.name for c in cases.select("training_losses")] == [
        "losses_simple", "losses_simple_bwd", "losses_hybrid", "losses_hybrid_bwd"]
    assert [c.name for c in cases.select("q_sample,ddim_step")] == ["q_sample", "ddim_step"]
    with pytest.raises(ValueError, match="--ops"):
        cases.select("nope")


def test_time_calls_rotates_inputs():
    seen = []
    sets = [(i,) for i in range(3)]
    t = measure.time_calls(seen.append, sets, "cpu", measure.Budget(warmup=1, min_runs=5, min_seconds=0.0,
                                                                    max_runs=5, max_seconds=10.0))
    assert t.runs == 5 and seen == [0, 0, 1, 2, 0, 1]


def test_time_interleaved_rotates_implementations_within_rounds():
    calls = []
    a = (lambda x: calls.append(("a", x)), [(0,), (1,)])
    b = (lambda x: calls.append(("b", x)), [(5,)])
    c = (lambda x: calls.append(("c", x)), [(7,)])
    got = measure.time_interleaved([a, b, c], "cpu", measure.Budget(warmup=1, min_runs=3, min_seconds=0.0,
                                                                    max_runs=3, max_seconds=10.0))
    assert [t.runs for t in got.timings] == [3, 3, 3] and got.n_rounds == 3
    timed = calls[3:]  # after one warm-up call each
    # equally fast entries: one call each per round, the round's first entry rotating a, b, c
    assert [name for name, _ in timed] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [x for name, x in timed if name == "a"] == [0, 1, 0]  # each entry rotates its own input sets
    assert got.rounds == [[0, 1, 2]] * 3


def test_time_interleaved_gives_fast_entries_more_calls_per_round():
    import time

    slow = (lambda: time.sleep(0.02), [()])
    fast = (lambda: None, [()])
    got = measure.time_interleaved([slow, fast], "cpu", measure.Budget(warmup=3, min_runs=2, min_seconds=0.0,
                                                                       max_runs=20, max_seconds=10.0))
    # the slow entry sets the rounds; the fast one gets up to max_runs // min_runs = 10 calls in each
    assert got.timings[0].runs == 2 and 2 < got.timings[1].runs <= 20
    assert set(got.rounds[1]) == {0, 1}


def test_paired_ratio_quartiles_pairs_rounds():
    base = measure.summarize([10.0, 20.0, 30.0])
    other = measure.summarize([5.0, 5.0, 10.0, 15.0])
    q = measure.paired_ratio_quartiles(base, [0, 1, 2], other, [0, 0, 1, 2])
    assert q == pytest.approx((2.0, 2.0, 2.0))  # 10 / 5, 20 / 10, 30 / 15
    assert measure.paired_ratio_quartiles(base, [0, 1, 2], other, [3, 3, 3, 3]) is None


def test_load_between_counts_only_other_processes():
    # 2 s of wall time; the machine was busy 3.0 core-seconds, 1.0 of them ours: others used 1 core
    load = measure.load_between((10.0, 100.0, 5.0), (12.0, 103.0, 6.0))
    assert load.other_cores == pytest.approx(1.0) and load.own_cores == pytest.approx(0.5)
    assert measure.load_between((0.0, None, 0.0), (1.0, None, 0.5)).other_cores is None
    probe = measure.LoadProbe().stop()
    if os.path.exists("/proc/stat"):
        assert probe.other_cores is not None and probe.other_cores >= 0


def test_flags_mark_spread_load_few_and_copy():
    limit = reliability.load_limit_cores("cpu", cpu_count=4, torch_threads=2)
    assert limit == pytest.approx(2 + reliability.LOAD_SLACK_CORES)
    good = {"runs": 50, "spread_pct": 5.0, "other_load_cores": 0.1, "pct_copy_bw": 70.0}
    assert reliability.flags_of(good, limit) == []
    assert [f for f, _ in reliability.flags_of(dict(good, spread_pct=35.0), limit)] == ["spread"]
    assert [f for f, _ in reliability.flags_of(dict(good, other_load_cores=2.5), limit)] == ["load"]
    assert [f for f, _ in reliability.flags_of(dict(good, runs=3), limit)] == ["few"]
    assert [f for f, _ in reliability.flags_of(dict(good, pct_copy_bw=5412.0), limit)] == [">copy"]
    assert reliability.flags_of(dict(good, other_load_cores=9.0), None) == []  # load unknown: not flagged
    rows = [dict(good, status="ok"), dict(good, status="ok", spread_pct=35.0, other_load_cores=3.0)]
    meta = {"load_limit_cores": limit, "quick": False}
    reliability.assess_rows(rows, meta)
    assert rows[0]["reliable"] and not rows[1]["reliable"] and rows[1]["flags"] == "spread,load"
    ok, text = reliability.verdict({"meta": meta, "rows": rows, "loops": []})
    assert not ok and text.startswith("NOT TRUSTWORTHY: 1 of 2 timed rows") and "load: 1, spread: 1" in text
    ok, text = reliability.verdict({"meta": meta, "rows": rows[:1], "loops": []})
    assert ok and text.startswith("TRUSTWORTHY")


# -- --dry-run: the modelled GPU table ---------------------------------------------------------
def test_dry_run_prints_the_gpu_model_without_a_gpu(capsys, tmp_path, monkeypatch):
    """`bench --device cuda --dry-run` prints the bandwidth model (bench/gpu_model.py) for the asked
    sizes, dtypes and ops, needs no GPU, measures and writes nothing, and exits 0."""
    from ddpm_fast.bench import gpu_model, main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    status = main(["--device", "cuda", "--dry-run", "--sizes", "8x3x16x16", "--dtype", "float32,bfloat16",
                   "--ops", "q_sample,p_sample_step"])
    out = capsys.readouterr().out
    assert status == 0 and not os.listdir(tmp_path)
    assert out.count("Modelled at memory bandwidth only") == 2 and "8x3x16x16 bfloat16" in out
    assert "us @H100 SXM" in out and "us @H200" in out
    lines = [line for line in out.splitlines() if line.startswith(("q_sample", "p_sample_step", "vb_terms"))]
    assert len(lines) == 2 * 3, lines  # q_sample and the two p_sample_step cases, per dtype
    # the q_sample row: x0 + noise read, x_t written, plus t and one table row per sample
    row = gpu_model.rows((8, 3, 16, 16), torch.float32, cases.select("q_sample"))[0]
    assert row["fused_bytes"] == traffic.q_sample((8, 3, 16, 16), torch.float32).total
    assert row["eager_bytes"] > row["fused_bytes"] and row["eager_ops"] >= 2
    assert row["fused_us_H100 SXM"] == pytest.approx(row["fused_bytes"] / 3.35e12 * 1e6)
    assert row["fused_us_H200"] == pytest.approx(row["fused_bytes"] / 4.8e12 * 1e6)
    mb = f"{row['fused_bytes'] / 1e6:.1f}"
    assert any(line.startswith("q_sample") and mb in line.split() for line in lines)


@pytest.mark.parametrize("args, flag", [(["--device", "cpu"], "--dry-run"), (["--dtype", "float64"], "--dtype"),
                                        (["--sizes", "8x3"], "--sizes"), (["--ops", "nope"], "--ops")])
def test_dry_run_rejects_bad_arguments_naming_the_flag(args, flag):
    from ddpm_fast.bench import main

    with pytest.raises(SystemExit) as exc:
        main(["--dry-run", *args])
    assert flag in str(exc.value.code)
