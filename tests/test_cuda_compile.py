"""csrc/cuda compiles with nvcc for sm_80 and sm_90 without register spills (no GPU needed).

Runs where nvcc exists (CUDA_HOME / CUDA_PATH, PATH, /usr/local/cuda); prints registers and spills per
kernel (pytest -s). Takes a few minutes on 2 cores: one nvcc call builds both architectures.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

CSRC = Path(__file__).resolve().parent.parent / "csrc"
ARCHS = ("80", "90")


def find_nvcc() -> str | None:
    for env in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(env)
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def parse_ptxas(log: str) -> list[dict]:
    """[{kernel, arch, registers, spill_stores, spill_loads, stack}] from `ptxas -v` output."""
    rows, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2)}
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
    return rows


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def short(name: str) -> str:
    """body_kernel<float, ddpm::TrainElem<float>> -> 'body TrainElem<float>'."""
    m = re.search(r"(body_kernel|finish_kernel)<(float|double), ddpm::(\w+)<", name)
    return f"{m.group(1).split('_')[0]} {m.group(3)}<{m.group(2)}>" if m else name[:80]


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found")
def test_cuda_kernels_compile_without_spills(tmp_path):
    nvcc = find_nvcc()
    cuda_inc = str(Path(nvcc).resolve().parent.parent / "include")
    incs = [f"-I{CSRC}"]
    for p in include_paths(device_type="cuda") + [cuda_inc]:
        incs += ["-isystem", p]
    gencode = [f for a in ARCHS for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
    cmd = [nvcc, "-c", str(CSRC / "cuda" / "kernels.cu"), "-o", str(tmp_path / "kernels.o"), "-std=c++20", "-O3",
           "--expt-relaxed-constexpr", "-DDDPM_WITH_CUDA", "-Xptxas", "-v", "--threads", "2",
           "-Xcompiler", "-fPIC", *gencode, *incs]
    if torch._C._GLIBCXX_USE_CXX11_ABI is not None:
        cmd.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, "nvcc failed:\n" + "\n".join(log.splitlines()[-40:])
    rows = parse_ptxas(log)
    names = demangle([r["kernel"] for r in rows])
    for r, n in zip(rows, names):
        r["name"] = short(n)
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
