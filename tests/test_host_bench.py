"""`ddpm-fast bench --host` (ddpm_fast/bench/host.py) in its quick mode, end to end on the CPU: the
rows it times, the structure of its JSON and table, and that every number is a measured positive
time. No timing is compared with any threshold."""
import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

from ddpm_fast import backends, ops
from ddpm_fast.bench import host

from _helpers import run_bench_cli

HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
DIFFERENTIABLE = {"q_sample", "q_posterior", "predict_xstart", "normal_kl", "discretized_gaussian_log_likelihood",
                  "vb_terms_bpd", "prior_bpd", "training_losses hybrid", "training_losses mse"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("host")
    stdout = run_bench_cli(out, "--host")
    with open(out / "host.json") as f:
        return json.load(f), stdout


def _runnable_backends():
    return [name for name, (ok, _) in backends.availability().items() if ok and name in ("reference", "cpu")]


def test_every_op_on_every_runnable_backend_is_timed(quick_run):
    results, _ = quick_run
    timed = {(r["op"], r["mode"], r["impl"]) for r in results["rows"] if r["kind"] != "skipped"}
    ops_timed = {r["op"].split(" ")[0] for r in results["rows"] if r["kind"] == "backend"}
    assert set(ops.__all__) <= ops_timed
    for backend in _runnable_backends():
        for op in ops.__all__:
            assert any(o.split(" ")[0] == op and m == "fwd" and i == backend for o, m, i in timed), (op, backend)
        for op in DIFFERENTIABLE:
            assert (op, "fwd+bwd", backend) in timed, (op, backend)
        assert ("GaussianDiffusion.training_losses", "fwd+bwd", backend) in timed
        assert ("GaussianDiffusion.p_sample", "fwd", backend) in timed


def test_unrunnable_backends_are_listed_with_a_reason(quick_run):
    results, stdout = quick_run
    skipped = {r["impl"]: r["note"] for r in results["rows"] if r["kind"] == "skipped"}
    for name in backends.BACKENDS:
        if name not in _runnable_backends():
            assert skipped.get(name), name  # triton on CPU tensors: the interpreter, named as the reason
            assert name in stdout


@pytest.mark.skipif(not HAVE_DIFFUSERS, reason="diffusers not installed")
def test_peers_are_timed(quick_run):
    results, _ = quick_run
    impls = {r["impl"] for r in results["rows"] if r["kind"] == "peer"}
    for method in ("add_noise", "get_velocity", "step"):
        assert any(method in i for i in impls), method
    assert any("DDIMScheduler.step" in i for i in impls)


def test_times_and_ratios_are_measured_and_consistent(quick_run):
    results, _ = quick_run
    meta = results["meta"]
    assert meta["threads"] == 1 and meta["quick"] is True and meta["size"] == "2x3x8x8"
    base = [r for r in results["rows"] if r["kind"] == "baseline"]
    assert len(base) == 1 and base[0]["impl"] == "torch.add" and base[0]["x_torch_add"] == 1.0
    ref = {(r["op"], r["mode"]): r["us_per_call"] for r in results["rows"] if r["impl"] == "reference"}
    for r in results["rows"]:
        if r["kind"] == "skipped":
            assert r["us_per_call"] is None
            continue
        assert r["blocks"] == meta["rounds"], r
        assert math.isfinite(r["us_per_call"]) and r["us_per_call"] > 0, r
        assert math.isfinite(r["x_torch_add"]) and r["x_torch_add"] > 0, r
        if r["impl"] == "reference":
            assert r["x_reference"] == 1.0
        elif (r["op"], r["mode"]) in ref:
            assert math.isfinite(r["x_reference"]) and r["x_reference"] > 0, r


def test_the_autograd_floor_is_timed_as_the_fwd_bwd_rows_are(quick_run):
    """One aten op forward and backward, called as every fwd+bwd row is: the least any differentiable call costs."""
    results, _ = quick_run
    floor = [r for r in results["rows"] if r["kind"] == "floor"]
    assert len(floor) == 1 and floor[0]["impl"] == "torch.mul" and floor[0]["mode"] == "fwd+bwd"
    assert floor[0]["us_per_call"] > 0
    row = next(r for r in host.plan("cpu") if r.kind == "floor")
    (grad,) = row.fn()
    assert grad.shape == host.TINY and torch.isfinite(grad).all()


@pytest.mark.skipif(not backends.availability()["cpu"][0], reason="the compiled CPU backend is unavailable")
def test_issue_17_targets_are_reported_with_their_ratios(quick_run):
    results, stdout = quick_run
    targets = {t["target"]: t for t in results["targets"]}
    expected = {"q_sample fwd, cpu": ("torch.add", 4.0), "training_losses hybrid fwd+bwd, cpu": ("reference", 0.25),
                "training_losses mse fwd+bwd, cpu": ("reference", 0.25)}
    if HAVE_DIFFUSERS:
        expected.update({f"Fast{m}": ("diffusers", 0.5) for m in (
            "DDPMScheduler.add_noise", "DDPMScheduler.get_velocity", "DDPMScheduler.step", "DDIMScheduler.step")})
    assert set(targets) == set(expected)
    for name, (baseline, bound) in expected.items():
        t = targets[name]
        assert (t["of"], t["bound"]) == (baseline, bound), name
        assert math.isfinite(t["ratio"]) and t["ratio"] > 0, name
        # the losses carry the autograd floor's ratio against the same reference call
        assert (t["floor"] is not None) == name.startswith("training_losses"), name
        if t["floor"] is not None:
            assert math.isfinite(t["floor"]) and t["floor"] > 0, name
    assert "issue 17's targets" in stdout


def test_targets_pair_each_fast_method_with_its_parent():
    """targets() divides each Fast row by the diffusers row of the same method, round by round."""
    rows = [host.Row("aten", "fwd", "torch.add", "baseline"), host.Row("m", "fwd+bwd", "torch.mul", "floor"),
            host.Row("add_noise", "fwd", "diffusers DDPMScheduler.add_noise", "peer"),
            host.Row("add_noise", "fwd", "ddpm_fast Fast DDPMScheduler.add_noise", "backend"),
            host.Row("step", "fwd", "diffusers DDPMScheduler.step", "peer"),
            host.Row("step", "fwd", "ddpm_fast Fast DDPMScheduler.step", "backend"),
            host.Row("q_sample", "fwd", "cpu", "backend")]
    times = ([1.0, 1.0], [50.0, 60.0], [10.0, 20.0], [2.0, 6.0], [100.0, 100.0], [30.0, 20.0], [4.0, 3.0])
    for r, us in zip(rows, times):
        r.samples_us = list(us)
    if not backends.available("cpu"):
        assert host.targets(rows, {}) == []
        return
    got = {t["target"]: t["ratio"] for t in host.targets(rows, {})}
    assert got == {"q_sample fwd, cpu": 3.5, "FastDDPMScheduler.add_noise": 0.25, "FastDDPMScheduler.step": 0.25}


@pytest.mark.skipif(not backends.availability()["cpu"][0], reason="the compiled CPU backend is unavailable")
def test_floors_are_reported(quick_run):
    results, stdout = quick_run
    floors = results["floors"]
    assert [f["ceiling"] for f in floors] == ["torch.add", "torch.randn_like"]
    for f in floors:
        assert f["ceiling_us"] > 0 and f["op_us"] > 0
        assert math.isclose(f["ratio"], f["ceiling_us"] / f["op_us"], rel_tol=1e-9)
    assert "CPU bandwidth floors" in stdout


def test_time_rows_interleaves_and_counts_every_block():
    calls = []
    rows = [host.Row("a", "fwd", "x", "backend", lambda: calls.append("a")),
            host.Row("b", "fwd", "y", "backend", lambda: calls.append("b")),
            host.Row("c", "fwd", "z", "skipped", note="why")]
    host.time_rows(rows, rounds=4, block_s=1e-5)
    assert len(rows[0].samples_us) == len(rows[1].samples_us) == 4 and rows[2].samples_us == []
    # after warm-up each round times both rows: the order alternates between rounds
    assert calls.count("a") > 4 and calls.count("b") > 4


def test_the_calls_return_the_ops_outputs():
    """A timed call runs the op: its output has the op's shape, and fwd+bwd returns a finite gradient."""
    rows = {(r.op, r.mode, r.impl): r for r in host.plan("cpu")}
    backend = _runnable_backends()[-1]
    out = rows[("q_sample", "fwd", backend)].fn()
    assert isinstance(out, torch.Tensor) and out.shape == host.TINY
    grads = rows[("training_losses hybrid", "fwd+bwd", backend)].fn()
    assert grads[0].shape == (2, 6, 8, 8) and torch.isfinite(grads[0]).all()


def test_ratios_pair_the_rounds():
    row, base = host.Row("a", "fwd", "x", "backend"), host.Row("b", "fwd", "y", "baseline")
    row.samples_us, base.samples_us = [10.0, 40.0, 30.0], [5.0, 10.0, 30.0]  # ratios 2, 4, 1
    assert host.round_ratio(row, base) == 2.0
    assert row.us == 30.0


TRITON_OK = importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not TRITON_OK, reason="triton not installed")
def test_triton_stubbed_section(quick_run):
    """The Triton section: every op of the Triton backend timed with its launches stubbed, each row beside the
    compiled CPU path's same call, the launches it made counted (none may be missed: each call launches)."""
    results, stdout = quick_run
    stubbed = results["triton_stubbed"]
    assert stubbed["skipped"] is None, stubbed["skipped"]
    rows = {(r["op"], r["mode"]): r for r in stubbed["rows"]}
    assert set(host.TRITON_TARGETS) <= set(rows)
    for op in DIFFERENTIABLE:
        assert (op, "fwd+bwd") in rows, op
    for key, r in rows.items():
        assert r["launches"] >= (2 if key[1] == "fwd+bwd" else 1), r
        assert math.isfinite(r["triton_us"]) and r["triton_us"] > 0, r
        if backends.availability()["cpu"][0]:
            assert r["cpu_us"] > 0 and math.isfinite(r["x_cpu"]) and r["x_cpu"] > 0, r
        assert (r["target"] == "<= 2") == (key in host.TRITON_TARGETS)
    assert rows[("training_losses hybrid", "fwd")]["launches"] == 1  # the loss kernel (a sample in one chunk: it
    #                                                                   finishes the terms itself)
    assert "kernels stubbed" in stdout


@pytest.mark.skipif(not TRITON_OK, reason="triton not installed")
def test_triton_stubbed_runs_in_a_child_without_the_interpreter(tmp_path):
    """Without TRITON_INTERPRET=1 in this process the section runs in a child process that sets it."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json; from ddpm_fast.bench import host; "
            "print(json.dumps(host.triton_stubbed(quick=True)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["skipped"] is None, out["skipped"]
    assert {(r["op"], r["mode"]) for r in out["rows"]} >= set(host.TRITON_TARGETS)
