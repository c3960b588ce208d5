"""csrc/cuda compiles with nvcc for sm_80 and sm_90 without register spills (no GPU needed).

Runs where nvcc exists (CUDA_HOME / CUDA_PATH, PATH, /usr/local/cuda); prints registers and spills per
kernel (pytest -s). Takes a few minutes on 2 cores: one nvcc call builds both architectures.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ddpm_fast._ptxas import compile_kernels, find_nvcc

ARCHS = ("80", "90")


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found")
def test_cuda_kernels_compile_without_spills():
    rows = compile_kernels(find_nvcc(), ARCHS)  # raises RuntimeError with nvcc's last lines if it fails
    for arch in ARCHS:
        assert any(r["arch"] == f"sm_{arch}" for r in rows), f"no kernel compiled for sm_{arch}"
    print(f"\n{'kernel':<40} {'arch':<6} {'regs':>4} {'spill st':>8} {'spill ld':>8} {'stack':>5}")
    for r in sorted(rows, key=lambda r: (r["name"], r["arch"])):
        print(f"{r['name']:<40} {r['arch']:<6} {r.get('registers', -1):>4} {r.get('spill_stores', -1):>8} "
              f"{r.get('spill_loads', -1):>8} {r.get('stack', -1):>5}")
    spilled = [r for r in rows if r.get("spill_stores", 0) or r.get("spill_loads", 0)]
    assert not spilled, f"register spills: {[(r['name'], r['arch'], r['spill_stores']) for r in spilled]}"


@pytest.mark.skipif(find_nvcc() is None or torch.version.cuda is None, reason="needs nvcc and a CUDA build of torch")
def test_cuda_extension_builds_links_and_loads(tmp_path):
    """The whole CPU + CUDA extension (ops, autograd, CPU and CUDA kernels) builds as on a GPU machine,
    links against the toolkit ddpm_fast._build.cuda_home() finds, and loads; its CPU ops run (a few
    minutes: the CUDA kernels for both architectures)."""
    from ddpm_fast import _build

    env = dict(os.environ)
    env.pop("CUDA_HOME", None)  # as a GPU machine may be: the toolkit found from nvcc on PATH
    code = (
        "import torch; from pathlib import Path; import ddpm_fast as F; from ddpm_fast import _build, reference\n"
        f"d = Path({str(tmp_path)!r}); _build._build(True, ['80', '90'], d)\n"
        "torch.ops.load_library(str(d / (_build.NAME + '.so')))\n"
        "s = F.NoiseSchedule.named('linear', 1000); x0, n, t = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 999])\n"
        "torch.testing.assert_close(torch.ops.ddpm_fast.q_sample(x0, t, n, s.table()), reference.q_sample(x0, t, n, s))\n"
        "print('ran')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0 and "ran" in out.stdout, _build._excerpt(out.stdout + out.stderr)
