"""`ddpm-fast selftest` on a machine without a GPU: the CPU stages run and pass, every GPU stage is
listed as skipped with its reason, one JSON and one summary are written; --dry-run lists the budget."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from ddpm_fast import ops, selftest
from ddpm_fast.bench import cases

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def test_dry_run_lists_every_stage_with_budget(capsys):
    assert selftest.main(["--dry-run"]) == 0
    text = capsys.readouterr().out
    for stage in selftest.STAGES:
        assert stage.name in text
        if stage.needs_gpu:
            assert f"{stage.name:<11} {stage.budget_s:>4} s  GPU  skipped here: needs a CUDA GPU" in text
    total = sum(s.budget_s for s in selftest.STAGES)
    assert f"budget {total} s" in text and total <= 8 * 60


def test_cpu_run_passes_and_skips_gpu_stages_with_reasons(tmp_path, capsys):
    assert selftest.main(["--skip", "aot", "--out", str(tmp_path)]) == 0
    (run_dir,) = tmp_path.iterdir()
    report = json.loads((run_dir / "selftest.json").read_text())
    by_name = {s["name"]: s for s in report["stages"]}
    assert set(by_name) == {s.name for s in selftest.STAGES} - {"aot"}
    assert report["passed"] is True
    assert by_name["build"]["status"] == "passed" and by_name["build"]["backends"]["cpu"]["available"]
    assert by_name["ops"]["status"] == "passed" and by_name["ops"]["checked"] > 0
    assert "cpu" in by_name["ops"]["backends"]
    for stage in selftest.STAGES:
        if stage.needs_gpu:
            assert by_name[stage.name]["status"] == "skipped"
            assert "needs a CUDA GPU" in by_name[stage.name]["reason"]
    summary = (run_dir / "summary.txt").read_text()
    assert "PASSED" in summary and "skipped" in summary
    assert summary in capsys.readouterr().out


@pytest.mark.parametrize("layout", selftest.LAYOUTS)
def test_relayout_keeps_values_and_grad_flag(layout):
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    y = selftest.relayout(x, layout)
    assert torch.equal(y, x.detach()) and y.requires_grad and y.is_leaf
    assert y.is_contiguous() == (layout == "contiguous")
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


def test_ops_stage_reports_a_wrong_result_and_layout_dependent_noise(monkeypatch):
    """A backend whose q_sample is off by 1e-3, and whose seeded DDPM step draws other noise for
    channels_last inputs, fails both checks."""
    real_q_sample, real_step = ops.q_sample, ops.p_sample_step

    def off_q_sample(*args, **kwargs):
        return real_q_sample(*args, **kwargs) + 1e-3

    def layout_step(model_output, x_t, *args, **kwargs):
        if kwargs.get("seed") is not None and x_t.is_contiguous(memory_format=torch.channels_last):
            kwargs["seed"] += 1
        return real_step(model_output, x_t, *args, **kwargs)

    monkeypatch.setattr(ops, "q_sample", off_q_sample)
    monkeypatch.setattr(ops, "p_sample_step", layout_step)
    monkeypatch.setattr(cases, "CASES", tuple(c for c in cases.CASES if c.name in ("q_sample", "p_sample_step")))
    res = selftest.check_ops(torch.device("cpu"), ["cpu"], dtypes=(torch.float32,), layouts=("contiguous",
                             "channels_last"), fuzz=0)
    q_fail = [f for f in res["failures"] if f.startswith("q_sample cpu")]
    noise_fail = [f for f in res["failures"] if "seeded sample in channels_last" in f]
    assert q_fail and all("max error" in f for f in q_fail)
    assert noise_fail and not any("seeded sample in contiguous" in f for f in res["failures"])


def test_noise_stream_check_passes_the_cpu_kernels_and_reports_another_stream(monkeypatch):
    """The CPU kernels draw the stream (every layout and shape of the check); a backend that draws its noise
    under another key (the seed's lowest bit flipped) fails it in each, naming a draw."""
    res = selftest.check_noise_stream(torch.device("cpu"), ["cpu"])
    assert res["checked"] == 4 and res["failures"] == [] and 0 < res["max_error"] < 1e-5
    real_step = ops.p_sample_step

    def other_key_step(*args, **kwargs):
        if kwargs.get("seed") is not None:
            kwargs["seed"] ^= 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(ops, "p_sample_step", other_key_step)
    res = selftest.check_noise_stream(torch.device("cpu"), ["cpu"])
    assert len(res["failures"]) == 4 and all("the stream's" in f for f in res["failures"])


def test_check_ops_runs_every_case_on_the_backend(monkeypatch):
    calls = []
    real = ops.q_sample

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "q_sample", spy)
    monkeypatch.setattr(cases, "CASES", (cases.BY_NAME["q_sample"],))
    res = selftest.check_ops(torch.device("cpu"), ["cpu", "reference"], dtypes=(torch.float32,), fuzz=1)
    assert res["failures"] == [] and res["checked"] == 3 * 2 * len(selftest.LAYOUTS)
    assert calls.count("cpu") == calls.count("reference") == 3 * len(selftest.LAYOUTS)


def test_fused_backends_on_cpu_name_the_ones_that_cannot_run():
    ok, why = selftest._fused_backends(torch.device("cpu"))
    assert "cpu" in ok or "cpu" in why
    assert set(ok) | set(why) == {"cpu", "cuda_emu"}
    assert all(isinstance(r, str) and r for r in why.values())


def test_gpu_model_counts_eager_traffic_above_the_fused_floor():
    from ddpm_fast.bench import gpu_model

    table = gpu_model.rows((8, 3, 16, 16), torch.float32)
    assert [r["op"] for r in table] == [c.label for c in cases.CASES]
    for r in table:
        assert r["eager_bytes"] >= r["fused_bytes"] > 0 and r["eager_ops"] >= 1
    q = table[0]  # q_sample: eager is x0 * a, noise * b, add: at least 3 full reads + 3 full writes
    n = 8 * 3 * 16 * 16 * 4
    assert q["eager_bytes"] >= 6 * n and q["fused_bytes"] >= 3 * n
    assert "H100" in gpu_model.table_text(table)


def test_occupancy_from_registers():
    from ddpm_fast._ptxas import occupancy

    # 128 registers x 4 warps: 16 K registers a block -> 4 blocks of 65536 -> 16 of 64 warps
    assert occupancy(128, 128) == {"blocks_per_sm": 4, "occupancy": 0.25}
    # 80 registers round to 2560 a warp, 8 warps a block: 3 blocks (24 of 64 warps)
    assert occupancy(80, 256, "sm_80") == {"blocks_per_sm": 3, "occupancy": 0.375}
    # few registers: the 2048-thread limit decides
    assert occupancy(16, 256) == {"blocks_per_sm": 8, "occupancy": 1.0}


def test_parse_ptxas_report():
    from ddpm_fast._ptxas import parse_ptxas

    log = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z3fooPf\n"
           "    32 bytes stack frame, 0 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers\n")
    assert parse_ptxas(log) == [{"kernel": "_Z3fooPf", "arch": "sm_90", "stack": 32, "spill_stores": 0,
                                 "spill_loads": 4, "registers": 40}]


@pytest.mark.parametrize("name", [n for n in selftest.SOLVER_LOOPS if n not in selftest.IN_KERNEL_NOISE_LOOPS])
def test_solver_loops_of_the_gpu_stages_run_and_match_their_parent(name):
    """The drop-in loops the graphs / sync_free stages capture on a GPU run here eagerly, and end where the
    diffusers parent's loop ends (same noise: the same generator seed)."""
    import diffusers

    torch.manual_seed(0)
    scheduler, run = selftest.solver_loop(name, "cpu")
    x = torch.randn(4, 4, 16, 16)
    ours = run(x.clone(), torch.Generator().manual_seed(3))
    parent = getattr(diffusers, type(scheduler).__name__[len("Fast"):])(**selftest.SOLVER_LOOPS[name][1])
    parent.set_timesteps(10)
    y, generator = x.clone(), torch.Generator().manual_seed(3)
    kwargs = {} if "UniPC" in type(parent).__name__ else {"generator": generator}
    for t in parent.timesteps:
        y = parent.step(torch.tanh(parent.scale_model_input(y, t)), t, y, **kwargs).prev_sample
    torch.testing.assert_close(ours, y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", selftest.IN_KERNEL_NOISE_LOOPS)
def test_in_kernel_noise_loops_of_the_gpu_stages_draw_in_the_op(name):
    """The drop-in loops with in_kernel_noise run here eagerly: the same generator seed gives the same loop, another
    seed another, and neither is the loop of the parent's draw (the same drop-in without the opt-in)."""
    scheduler, run = selftest.solver_loop(name, "cpu")
    assert scheduler.in_kernel_noise is True and name in selftest.NOISY_LOOPS
    x = torch.randn(selftest.LOOP_SHAPE, generator=torch.Generator().manual_seed(0)) * 15.8
    first = run(x.clone(), torch.Generator().manual_seed(3))
    again = selftest.solver_loop(name, "cpu")[1](x.clone(), torch.Generator().manual_seed(3))
    other = selftest.solver_loop(name, "cpu")[1](x.clone(), torch.Generator().manual_seed(4))
    parents_draw = selftest.solver_loop(name.split(",")[0], "cpu")[1](x.clone(), torch.Generator().manual_seed(3))
    assert torch.isfinite(first).all() and torch.equal(first, again)
    assert not torch.equal(first, other) and not torch.equal(first, parents_draw)


@pytest.mark.parametrize("name", selftest.FUNCTIONAL_LOOPS)
def test_functional_loops_of_the_gpu_stages_draw_their_noise_from_the_generator(name):
    """The functional-step loops the graphs / sync_free stages capture on a GPU run here eagerly: the noise is
    the generator's (same seed, same loop; another seed, another) and each loop starts afresh after reset()."""
    reset, run = selftest.functional_loop(name, "cpu")
    x = torch.randn(selftest.LOOP_SHAPE, generator=torch.Generator().manual_seed(0)) * 15.8
    first = run(x.clone(), torch.Generator().manual_seed(3))
    reset()
    again = run(x.clone(), torch.Generator().manual_seed(3))
    reset()
    other = run(x.clone(), torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.isfinite(first).all()
    assert name in selftest.NOISY_LOOPS


@pytest.mark.parametrize("returncode", [0, 3])
def test_bench_stages_run_the_cli_and_report_its_exit(monkeypatch, tmp_path, returncode):
    """The GPU stages bench / samplers run `ddpm-fast bench [--samplers] --device D --quick` in a child process,
    keep its output in a log, and fail with the child's last stderr lines when it exits non-zero."""
    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, returncode, stdout="table\n", stderr="one\ntwo\n")

    monkeypatch.setattr(selftest.subprocess, "run", fake_run)
    res = selftest._run_stage(selftest.BY_NAME["samplers"], torch.device("cuda", 0), tmp_path)
    assert seen[0][-7:] == ["bench", "--samplers", "--device", "cuda:0", "--quick", "--out", str(tmp_path / "samplers")]
    assert (tmp_path / "samplers.log").read_text() == "table\none\ntwo\n"
    if returncode == 0:
        assert res["failures"] == []
    else:
        assert res["failures"] == ["samplers exited 3: one | two"]
