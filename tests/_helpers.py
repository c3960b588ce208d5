"""Helpers shared by several test files (`from _helpers import ...`: pytest puts tests/ on sys.path).

diffusers' schedulers against ours (tests/test_diffusers_compat.py, tests/test_parity_diffusers.py; the spy
also fits tests/test_diffusers_solvers.py): the parent computing in float64, a parent / ours / float64-parent
triple, a model output per variance type and a counter of the parent's step calls. NoHostSync: a dispatch
mode that fails on every host read of a tensor value.
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


def to64(s):
    """The parent computing in float64 from its own float32 betas: the accuracy yardstick."""
    s.betas = s.betas.double()
    s.alphas = 1.0 - s.betas
    s.alphas_cumprod = torch.cumprod(s.alphas, 0)
    if hasattr(s, "one"):
        s.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(s, "final_alpha_cumprod"):
        s.final_alpha_cumprod = (torch.tensor(1.0, dtype=torch.float64) if s.config.set_alpha_to_one
                                 else s.alphas_cumprod[0])
    return s


def make_schedulers(parent_cls, fast_cls, cfg, spacing, n, num_train_timesteps):
    """(parent, ours from the parent's config, the parent in float64) built from cfg over num_train_timesteps
    (unless cfg sets it); spacing: None (no set_timesteps), a config dict (merged into cfg, then n steps) or
    "custom" (a fixed list of timesteps)."""
    cfg = {"num_train_timesteps": num_train_timesteps, **cfg}
    if isinstance(spacing, dict):
        cfg.update(spacing)
    a = parent_cls(**cfg)
    b = fast_cls.from_config(a.config)
    g = to64(parent_cls(**cfg))
    for s in (a, b, g):
        if spacing == "custom":
            s.set_timesteps(timesteps=[97, 60, 33, 20, 5, 2])
        elif spacing is not None:
            s.set_timesteps(n)
    return a, b, g


def scheduler_model_output(var, gen, batch, channels):
    """A model output [batch, channels (2 * channels for the learned variance types), 4, 4] for diffusers'
    variance_type var: "learned" outputs the variance itself (positive), "learned_range" a value in [-1, 1]."""
    mo = torch.randn(batch, 2 * channels if var.startswith("learned") else channels, 4, 4, generator=gen)
    if var == "learned":
        mo[:, channels:] = mo[:, channels:].abs() * 0.01 + 1e-4
    if var == "learned_range":
        mo[:, channels:] = torch.tanh(mo[:, channels:])
    return mo


class CountParentSteps:
    """Counts the calls of cls.step (patched through monkeypatch, undone with it) in ``n``."""

    def __init__(self, monkeypatch, cls):
        self.n = 0
        original = cls.step

        def spy(this, *args, **kwargs):
            self.n += 1
            return original(this, *args, **kwargs)

        monkeypatch.setattr(cls, "step", spy)


class NoHostSync(TorchDispatchMode):
    """Fails on any op that reads a tensor value on the host (.item(), int(t), bool(mask.any()), nonzero)."""

    FORBIDDEN = (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero, torch.ops.aten.nonzero_static,
                 torch.ops.aten.item)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.FORBIDDEN:
            raise AssertionError(f"host sync: {func}")
        return func(*args, **(kwargs or {}))


def run_bench_cli(out, *flags):
    """`ddpm-fast bench <flags> --quick --out <out>` in a child process: its stdout (asserts it exited 0)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "ddpm_fast.cli", "bench", *flags, "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
