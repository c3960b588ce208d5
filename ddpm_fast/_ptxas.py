"""nvcc's view of csrc/cuda/kernels.cu without a GPU: registers, spills and stack frame per kernel.

compile_kernels() runs ``nvcc -Xptxas -v`` on kernels.cu for the given architectures and parses ptxas'
report; tests/test_cuda_compile.py and ``ddpm-fast selftest`` read it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME / $CUDA_PATH, PATH or /usr/local/cuda, or None."""
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


# Per-SM limits of sm_80 (A100) and sm_90 (H100/H200), from the CUDA occupancy calculator's tables.
SM_LIMITS = {"sm_80": dict(regs=65536, threads=2048, blocks=32, smem=167936),
             "sm_90": dict(regs=65536, threads=2048, blocks=32, smem=233472)}


def occupancy(registers: int, threads_per_block: int, arch: str = "sm_90", smem_per_block: int = 0) -> dict:
    """Theoretical occupancy of a kernel: {blocks_per_sm, occupancy (resident warps / max warps)}.
    Registers are allocated per warp in units of 256 (a thread's count rounded up to 8)."""
    lim = SM_LIMITS[arch]
    warps = -(-threads_per_block // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = lim["regs"] // (regs_per_warp * warps)
    by_threads = lim["threads"] // (warps * 32)
    by_smem = lim["smem"] // smem_per_block if smem_per_block else lim["blocks"]
    blocks = min(by_regs, by_threads, by_smem, lim["blocks"])
    return {"blocks_per_sm": blocks, "occupancy": blocks * warps * 32 / lim["threads"]}


def nvcc_command(nvcc: str, archs, output: Path) -> list[str]:
    """The nvcc call that compiles kernels.cu to an object for ``archs`` with ptxas' report."""
    import torch
    from torch.utils.cpp_extension import include_paths

    cuda_inc = str(Path(nvcc).resolve().parent.parent / "include")
    incs = [f"-I{CSRC}"]
    for p in include_paths(device_type="cuda") + [cuda_inc]:
        incs += ["-isystem", p]
    gencode = [f for a in archs for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
    cmd = [nvcc, "-c", str(CSRC / "cuda" / "kernels.cu"), "-o", str(output), "-std=c++20", "-O3",
           "--expt-relaxed-constexpr", "-DDDPM_WITH_CUDA", "-Xptxas", "-v", "--threads", str(os.cpu_count() or 2),
           "-Xcompiler", "-fPIC", *gencode, *incs]
    if torch._C._GLIBCXX_USE_CXX11_ABI is not None:
        cmd.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
    return cmd


def compile_kernels(nvcc: str, archs=("80", "90"), output: Path | None = None) -> list[dict]:
    """Compile kernels.cu for ``archs``; ptxas' rows, each with a short demangled ``name``. Raises
    RuntimeError with nvcc's last lines when it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        obj = output or Path(tmp) / "kernels.o"
        proc = subprocess.run(nvcc_command(nvcc, archs, obj), capture_output=True, text=True, timeout=1500)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError("nvcc failed:\n" + "\n".join(log.splitlines()[-40:]))
    rows = parse_ptxas(log)
    for r, n in zip(rows, demangle([r["kernel"] for r in rows])):
        r["name"] = short(n)
    return rows
