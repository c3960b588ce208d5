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
