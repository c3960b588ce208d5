"""`ddpm-fast bench --samplers` (ddpm_fast/bench/samplers.py) in its quick mode, end to end on the CPU: the
table's and the JSON's structure, and that both sides (ours and the diffusers parent) ran every row.
No timing is compared with any threshold."""
import json
import math

import pytest

pytest.importorskip("diffusers", reason="the samplers benchmark compares with diffusers")

import ddpm_fast as F  # noqa: E402
from ddpm_fast.bench import samplers  # noqa: E402

from _helpers import run_bench_cli  # noqa: E402

NAMES = ["DPM++ 2M", "DPM++ 3M SDE", "DPM++ 3M SDE Philox", "Euler", "Euler a", "Euler a Philox",
         "UniPC bh2 o3"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("samplers")
    stdout = run_bench_cli(out, "--samplers")
    assert (out / "samplers.txt").read_text().strip() in stdout
    return json.loads((out / "samplers.json").read_text()), stdout


def test_rows_cover_every_sampler_size_and_guidance(quick_run):
    results, _ = quick_run
    keys = [(r["sampler"], r["size"], r["cfg"]) for r in results["rows"]]
    sizes = ["x".join(map(str, s)) for s in samplers.QUICK_SIZES]
    assert sorted(keys) == sorted((n, s, c) for n in NAMES for s in sizes for c in (False, True))
    assert [r["sampler"] for r in results["host"]] == NAMES
    assert results["meta"]["quick"] is True and results["meta"]["target_speedup"] == 3.0


def test_both_sides_ran_every_row(quick_run):
    results, _ = quick_run
    m = results["meta"]
    for r in results["rows"] + results["host"]:
        steps = m["host_steps"] * m["host_loops"] if r in results["host"] else m["steps"] * m["loops"]
        for side in ("parent", "ours"):
            assert r[f"{side}_steps_timed"] == steps, (r["sampler"], side)
            assert r[f"{side}_us"] > 0 and math.isfinite(r[f"{side}_us"])
            assert r[f"{side}_ops"]["full"] >= 1  # the step produced a full-size sample
        assert r["ours_ops"]["host_reads"] == 0, r["sampler"]  # the drop-ins step without a host read
        assert r["ratio"] == pytest.approx(r["parent_us"] / r["ours_us"])
        assert r["shared_steps_timed"] == steps and r["shared_us"] > 0
        assert r["bound"] == pytest.approx(r["parent_us"] / r["shared_us"])
        assert r["met"] in (True, False)
    for r in results["rows"]:  # the parent's guidance arithmetic adds full-size ops; ours is inside the fused step
        if r["cfg"]:
            plain = next(p for p in results["rows"] if (p["sampler"], p["size"], p["cfg"]) ==
                         (r["sampler"], r["size"], False))
            assert r["parent_ops"]["full"] > plain["parent_ops"]["full"]
            if F.availability()["cpu"][0]:  # one compiled op per step, with or without guidance
                assert r["ours_ops"]["full"] == plain["ours_ops"]["full"], r["sampler"]


def test_table_has_a_line_per_row_and_the_targets(quick_run):
    results, stdout = quick_run
    lines = stdout.splitlines()
    for r in results["rows"]:
        assert sum(1 for ln in lines if ln.startswith(f"{r['sampler']:19s} {r['size']:12s} "
                                                      f"{'yes' if r['cfg'] else 'no':3s}")) == 1
    assert sum(">= 3x" in ln for ln in lines) == len(results["rows"])
    assert sum("<= 0.5x" in ln for ln in lines) == len(results["host"])
    assert "host time per step on 1x4x8x8" in stdout


def test_philox_rows_draw_the_noise_inside_the_fused_step(quick_run):
    """The "Philox" rows run the drop-in with in_kernel_noise: one full-size op per step fewer than the same
    sampler's default row (no randn_tensor draw), the parent's side the same."""
    results, _ = quick_run
    for r in results["rows"] + results["host"]:
        if r["sampler"] in samplers.IN_KERNEL_NOISE:
            default = next(d for d in results["rows"] + results["host"]
                           if (d["sampler"], d["size"], d["cfg"]) == (r["sampler"][:-len(" Philox")], r["size"], r["cfg"]))
            assert r["parent_ops"] == default["parent_ops"]
            assert r["ours_ops"]["full"] == default["ours_ops"]["full"] - 1, (r["sampler"], r["size"], r["cfg"])


@pytest.mark.parametrize("which", range(7))
def test_guidance_in_the_step_matches_the_pipeline_arithmetic(which):
    """Both sides step the same guided model output: ours combines the [2B] output inside its step, the parent
    steps uncond + s (cond - uncond); a short loop gives the same samples."""
    import torch

    name, parent_cls, fast_cls, config = samplers.samplers()[which]
    x, model_output = samplers._inputs((2, 4, 8, 8), 7.5, torch.device("cpu"), seed=0)
    ours = samplers.Side(fast_cls, config, True, 7.5, 0)
    parent = samplers.Side(parent_cls, config, False, 7.5, 0)
    assert ours.guided(model_output) is model_output and parent.guided(model_output).shape == x.shape
    for side in (ours, parent):
        side.scheduler.set_timesteps(6)
    xa = xb = x
    for t in parent.scheduler.timesteps:
        xa, xb = ours.step(model_output, t, xa), parent.step(model_output, t, xb)
    torch.testing.assert_close(xa, xb, rtol=1e-4, atol=1e-4 * xb.abs().max().item())


@pytest.mark.parametrize("which", range(7))
def test_the_shared_side_runs_scale_model_input_and_the_parents_noise_draw(which):
    """SharedSide calls ours' scale_model_input every step and draws diffusers' noise from its generator exactly
    for the samplers whose step draws noise on the parent's default path."""
    import torch

    name, _, fast_cls, config = samplers.samplers()[which]
    side = samplers.SharedSide(fast_cls, config, None, 0, name in samplers.NOISE_DRAWING)
    calls = []
    real = side.scheduler.scale_model_input
    side.scheduler.scale_model_input = lambda x, t: calls.append(t) or real(x, t)
    x, model_output = samplers._inputs((1, 4, 8, 8), None, torch.device("cpu"), seed=0)
    before = side.generator.get_state()
    times = side.loop(x, model_output, 4)
    assert len(times) == len(calls) == 4
    assert (not torch.equal(before, side.generator.get_state())) == (name in ("DPM++ 3M SDE", "Euler a"))


@pytest.mark.parametrize("args, flag", [(["--threads", "0"], "--threads"), (["--device", "mps"], "--device")])
def test_bad_arguments_name_the_flag(args, flag, tmp_path):
    from ddpm_fast.bench import runner

    with pytest.raises(SystemExit, match=flag):
        runner.main(["--samplers", "--quick", "--out", str(tmp_path), *args])
