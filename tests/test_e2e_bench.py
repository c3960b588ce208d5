"""`ddpm-fast bench --e2e --quick` on the CPU: the files it writes and their structure, that the two
training ways reach the same loss curve, that the saved-tensor split and the time split add up, and
the agreement check itself. No timing is asserted (only that the parts of a step fit in it)."""
import csv
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from ddpm_fast.bench import e2e

HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
pytestmark = pytest.mark.skipif(not HAVE_DIFFUSERS, reason="the e2e benchmark needs diffusers")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    cmd = [sys.executable, "-m", "ddpm_fast.cli", "bench", "--e2e", "--quick", "--device", "cpu", "--threads", "1",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "e2e.json") as f:
        results = json.load(f)
    return out, proc.stdout, results


def test_files_and_meta(quick_run):
    out, stdout, results = quick_run
    meta = results["meta"]
    assert meta["schema"] == e2e.SCHEMA and meta["quick"] is True and meta["device"] == "cpu"
    assert meta["torch_threads"] == 1 and meta["torch_version"] == torch.__version__
    assert meta["fused_backend"] in ("cpu", "reference") and meta["elapsed_s"] > 0
    assert set(meta["params"]) == {m.name for m in e2e.MODELS} and min(meta["params"].values()) > 0
    for name in ("e2e.json", "e2e.csv", "e2e.txt"):
        assert (out / name).stat().st_size > 0
    if HAVE_MATPLOTLIB:
        assert (out / "e2e_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "QUICK MODE" in stdout
    text = (out / "e2e.txt").read_text()
    assert max(len(line) for line in text.splitlines()) <= 100


def test_training_rows(quick_run):
    _, _, results = quick_run
    plan = results["meta"]["plan"]
    rows = results["train"]
    keys = {(r["model"], r["sampler"], r["way"]) for r in rows}
    assert keys == {(m.name, s, w) for m in e2e.MODELS for s in ("uniform", "loss-second-moment")
                    for w in e2e.WAYS_TRAIN}
    for r in rows:
        assert r["steps"] == plan["train_steps"] and r["timed_steps"] == plan["train_steps"] - plan["warmup"]
        assert len(r["losses"]) == plan["train_steps"] and all(v > 0 for v in r["losses"])
        assert 0 < r["net_fwd_ms"] and 0 < r["net_bwd_ms"]
        assert r["net_ms"] == pytest.approx(r["net_fwd_ms"] + r["net_bwd_ms"], rel=1e-6)
        # quick: one timed step, so the medians are its values and the parts add up exactly
        assert r["outside_ms"] == pytest.approx(r["total_ms"] - r["net_ms"], rel=1e-6, abs=1e-9)
        assert 0 < r["math_ms"] <= r["outside_ms"] < r["total_ms"]
        assert 0 < r["math_share"] <= r["outside_share"] < 1
        assert r["peak_step_bytes"] is None  # CUDA only
    by = {(r["model"], r["sampler"], r["way"]): r for r in rows}
    for m in e2e.MODELS:
        for s in ("uniform", "loss-second-moment"):
            eager, fused = by[(m.name, s, "eager")], by[(m.name, s, "fused")]
            assert eager["speedup_total"] == 1.0
            # the same network saves the same tensors either way; the split is by who saved them
            assert eager["net_saved_bytes"] == fused["net_saved_bytes"] > 0
            if results["meta"]["fused_backend"] != "reference":
                assert 0 < fused["loss_saved_bytes"] < eager["loss_saved_bytes"]


def test_loss_curves_agree(quick_run):
    _, _, results = quick_run
    assert len(results["agreement"]) == 2 * len(e2e.MODELS)
    for a in results["agreement"]:
        assert a["same_timesteps"] and a["agree"], a
        assert a["step0_rel_diff"] <= e2e.AGREE_RTOL
    by = {(r["model"], r["sampler"], r["way"]): r["losses"] for r in results["train"]}
    for m in e2e.MODELS:
        eager, fused = by[(m.name, "uniform", "eager")], by[(m.name, "uniform", "fused")]
        assert fused == pytest.approx(eager, rel=e2e.AGREE_RTOL)


def test_sampling_rows(quick_run):
    _, _, results = quick_run
    plan = results["meta"]["plan"]
    rows = results["sample"]
    assert {(r["model"], r["loop"], r["way"]) for r in rows} == {
        (m.name, loop, w) for m in e2e.MODELS for loop in ("ddpm", "ddim") for w in e2e.WAYS_SAMPLE}
    for r in rows:
        full = e2e.T if r["loop"] == "ddpm" else e2e.DDIM_STEPS
        run = plan["ddpm_steps"][r["model"]] if r["loop"] == "ddpm" else plan["ddim_steps"]
        assert r["steps_full"] == full and r["steps_run"] == run
        assert r["note"] == f"first {run} of {full} steps"  # a cut loop says so
        assert 0 < r["net_ms"] < r["total_ms"] and r["math_ms"] > 0
        assert r["loop_ms"] > r["loop_outside_ms"] > 0
        # the same scheduler math on the same model output, noise and generator: float32 rounding
        # over two steps (|x| of a few units, float32 spacing ~2e-7 near 1)
        assert r["max_abs_diff"] < 1e-5


def test_sweep_rows(quick_run):
    _, _, results = quick_run
    rows = results["sweep"]
    want = {(k, f"{b}x{e2e.SWEEP_CHANNELS}x{s}x{s}", w) for s in e2e.SWEEP_SIZES for b in e2e.SWEEP_BATCHES
            for k, ways in (("train", e2e.WAYS_TRAIN), ("ddpm", e2e.WAYS_SAMPLE)) for w in ways}
    assert {(r["kind"], r["size"], r["way"]) for r in rows} == want and len(rows) == len(want)
    for r in rows:
        assert 0 < r["outside_share"] < 1 and 0 < r["math_share"] <= r["outside_share"] + 1e-12
        assert r["net_ms"] > 0 and r["total_ms"] > 0


def test_csv(quick_run):
    out, _, results = quick_run
    with open(out / "e2e.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == e2e.CSV_COLUMNS
        rows = list(reader)
    sections = [r["section"] for r in rows]
    for name in ("train", "agreement", "sample", "sweep"):
        assert sections.count(name) == len(results[name])
    assert all(r["device"] == "cpu" and r["timestamp"] for r in rows)


def test_agreement_detects_a_different_curve():
    ts = [torch.tensor([3, 5]), torch.tensor([7, 9])]
    same = e2e._agreement("m", "uniform", [1.0, 0.5], [1.0, 0.5 * (1 + 1e-6)], ts, ts)
    assert same["agree"] and same["max_rel_diff_first"] == pytest.approx(1e-6)
    off = e2e._agreement("m", "uniform", [1.0, 0.5], [1.0, 0.5 * (1 + 1e-3)], ts, ts)
    assert not off["agree"]
    other_t = e2e._agreement("m", "uniform", [1.0, 0.5], [1.0, 0.5], ts, [ts[0], torch.tensor([7, 8])])
    assert not other_t["agree"] and not other_t["same_timesteps"]


def test_timed_net_marks_where_backward_enters_the_network():
    clock = e2e.Clock(torch.device("cpu"))
    net = torch.nn.Conv2d(2, 2, 1)
    timed = e2e.TimedNet(lambda x, t: net(x), clock)
    saved = e2e.SavedBytes(timed)
    x = torch.randn(2, 2, 4, 4)
    with saved.hooks():
        out = timed(x, None)
        loss = (out.exp() * 2).sum()  # exp saves its output: a loss-side tensor
    assert len(timed.forwards) == 1 and timed.grad_arrived == []
    loss.backward()
    assert len(timed.grad_arrived) == 1
    assert saved.net_bytes == x.numel() * 4 + net.weight.numel() * 4  # conv saves its input and weight
    assert saved.loss_bytes == out.numel() * 4
