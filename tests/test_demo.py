"""`ddpm-fast demo` end to end for a few steps (needs scikit-learn and matplotlib)."""
import json

import pytest
import torch

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (extra 'demo')")
pytest.importorskip("matplotlib", reason="the demo needs matplotlib (extra 'demo')")

from ddpm_fast import cli  # noqa: E402
from ddpm_fast.demo import load_digits_split  # noqa: E402
from ddpm_fast.demo_model import DigitsUNet  # noqa: E402


def test_digits_split():
    train, held = load_digits_split(0.15, seed=0)
    assert train.shape[1:] == held.shape[1:] == (1, 8, 8) and len(train) + len(held) == 1797
    assert train.min() == -1 and train.max() == 1 and abs(len(held) - 270) <= 1


def test_demo_runs_a_few_steps(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--steps", "4", "--diffusion-steps", "10", "--eval-points", "2", "--eval-images", "8",
                   "--final-eval-images", "8", "--num-samples", "4", "--ddim-steps", "5", "--channels", "8",
                   "--batch-size", "8", "--out-dir", str(out), "--no-progress"])
    assert rc == 0
    for name in ("checkpoint.pt", "metrics.json", "bpd_curve.png", "samples_ddpm.png", "samples_ddim.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / ".gitignore").read_text().splitlines()[-1] == "*"  # a results folder git ignores
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s for s, _ in metrics["bpd_curve"]] == [0, 4]
    bpd = metrics["heldout_bpd_final"]
    assert 0 < bpd < 100 and metrics["heldout_images_final"] == 8 and metrics["diffusion_steps"] == 10
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    model = DigitsUNet(1, 2, channels=8)
    model.load_state_dict(ckpt["ema"])
    assert model(torch.zeros(2, 1, 8, 8), torch.tensor([0, 9])).shape == (2, 2, 8, 8)
    assert "bits/dim" in capsys.readouterr().out


def test_demo_rejects_bad_flags(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--num-samples", "0", "--out-dir", str(tmp_path)])


def test_demo_help_gives_every_option_a_text_and_its_default(capsys):
    from ddpm_fast.demo import _parser

    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--help"])
    assert exc.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at hyphens too
    for action in _parser()._actions:
        if action.dest == "help":
            continue
        assert action.help, action.dest
        assert f"(default:{action.default})" in text, action.dest
    assert "(default:demo-results)" in text


def test_version(capsys):
    import ddpm_fast

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"ddpm-fast {ddpm_fast.__version__} (torch {torch.__version__}")


def test_results_dir_ignores_itself_and_leaves_existing_folders_alone(tmp_path):
    from ddpm_fast.bench.report import results_dir

    new = results_dir(tmp_path / "a" / "b")
    assert new.is_dir() and (new / ".gitignore").read_text().splitlines()[-1] == "*"
    mine = tmp_path / "mine"
    mine.mkdir()
    results_dir(mine)
    assert not (mine / ".gitignore").exists()


TINY_DEMO = ["demo", "--steps", "2", "--diffusion-steps", "10", "--eval-points", "2", "--eval-images", "4",
             "--final-eval-images", "4", "--num-samples", "4", "--ddim-steps", "4", "--sampler-steps", "4",
             "--channels", "8", "--batch-size", "4", "--no-progress"]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++", "euler", "euler_a", "unipc"])
def test_demo_sampler(tmp_path, capsys, sampler):
    """--sampler NAME writes that sampler's grid (only it) and a samplers.md row with its steps and figure."""
    if sampler not in ("ddpm", "ddim"):
        pytest.importorskip("diffusers", reason="the drop-in samplers need diffusers")
    out = tmp_path / "demo"
    assert cli.main(TINY_DEMO + ["--sampler", sampler, "--out-dir", str(out)]) == 0
    assert sorted(p.name for p in out.glob("samples_*.png")) == [f"samples_{sampler}.png"]
    rows = json.loads((out / "metrics.json").read_text())["samplers"]
    assert [r["sampler"] for r in rows] == [sampler, "real"]
    assert rows[0]["steps"] == {"ddpm": 10}.get(sampler, 4)
    assert 0 <= rows[0]["nn_rms"] <= 2 and rows[0]["seconds_per_sample"] > 0
    table = (out / "samplers.md").read_text()
    assert table.count("\n") == 4 and f"(`{sampler}`) | {rows[0]['steps']} |" in table
    assert table in capsys.readouterr().out + "\n"


def test_demo_diffusers_loop_follows_the_diffusion_schedule():
    """The drop-in scheduler uses the demo diffusion's alphas_cumprod, and its loop hands the model the same
    integer timesteps p_sample_loop would (0-based, T-1 first) with the eps half of the output used."""
    pytest.importorskip("diffusers", reason="the drop-in samplers need diffusers")
    from ddpm_fast.demo import diffusers_sample_loop, diffusers_scheduler
    from ddpm_fast.diffusion import create_gaussian_diffusion

    diffusion = create_gaussian_diffusion(steps=10, learn_sigma=True, noise_schedule="cosine",
                                          rescale_learned_sigmas=True)
    scheduler = diffusers_scheduler("dpmsolver++", diffusion)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(),
                               torch.from_numpy(diffusion.alphas_cumprod), rtol=1e-6, atol=1e-9)  # float32 cumprod
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.cat([torch.zeros_like(x), torch.full_like(x, float("nan"))], dim=1)  # NaN variance: unused

    x = diffusers_sample_loop(scheduler, diffusion, model, (2, 1, 8, 8), 5, torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    assert [t.tolist() for t in seen] == [[int(t)] * 2 for t in scheduler.timesteps]
    assert [int(t[0]) for t in seen] == [9, 7, 5, 4, 2]  # 0-based integers into T=10 (linspace spacing)


def test_nn_rms():
    from ddpm_fast.demo import nn_rms

    ref = torch.stack([torch.full((1, 8, 8), -1.0), torch.full((1, 8, 8), 1.0)])
    assert nn_rms(ref, ref) == 0
    assert nn_rms(torch.full((3, 1, 8, 8), 0.5), ref) == pytest.approx(0.5)


def test_demo_rejects_an_unknown_sampler(tmp_path):
    with pytest.raises(SystemExit, match="--sampler"):
        cli.main(["demo", "--sampler", "ddpm,heun", "--out-dir", str(tmp_path)])
