"""nvcc's view of csrc/cuda/kernels.cu without a GPU: registers, spills, stack frame, theoretical
occupancy and the global memory instructions of the SASS, per kernel.

compile_kernels() runs ``nvcc -Xptxas -v`` on kernels.cu for the given architectures and parses ptxas'
report (and, with ``sass_arch``, cuobjdump's SASS of that architecture); tests/test_cuda_compile.py
and ``ddpm-fast selftest`` read it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
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


def find_cuobjdump(nvcc: str | None = None) -> str | None:
    """cuobjdump beside nvcc (or its resolved path), on PATH, or the copy the triton wheel ships; or None."""
    dirs = []
    if nvcc:
        dirs += [Path(nvcc).parent, Path(nvcc).resolve().parent]
    for d in dirs:
        if (d / "cuobjdump").exists():
            return str(d / "cuobjdump")
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton.backends.nvidia as nv

        bundled = Path(nv.__file__).parent / "bin" / "cuobjdump"
        return str(bundled) if bundled.exists() else None
    except ImportError:
        return None


def parse_ptxas(log: str) -> list[dict]:
    """[{kernel, arch, registers, spill_stores, spill_loads, stack[, smem]}] from `ptxas -v` output
    (smem: bytes of static shared memory, when ptxas reports some)."""
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
            m = re.search(r"(\d+) bytes smem", line)
            if m:
                current["smem"] = int(m.group(1))
    return rows


# global / local memory instructions counted in the SASS: LDG.E.128, STG.E.U16, STL, ...
_MEM_OP = re.compile(r"\b((?:LDG|STG|LDL|STL)(?:\.[A-Z0-9]+)*)\b")


def parse_sass(text: str) -> dict[str, Counter]:
    """{mangled kernel name: Counter of its memory instructions, e.g. {"STG.E.128": 2, "LDG.E": 8}}
    from ``cuobjdump -sass`` output. Cache and ordering qualifiers are dropped (LDG.E.128.CONSTANT and
    STG.E.128.STRONG.SM count as LDG.E.128 / STG.E.128); the access width is what is counted."""
    out, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = out.setdefault(m.group(1), Counter())
            continue
        if current is None:
            continue
        for op in _MEM_OP.findall(line.split(";")[0]):
            parts = [w for w in op.split(".") if w not in ("CONSTANT", "STRONG", "SM", "GPU", "SYS", "EF", "EL",
                                                                "LU", "NA", "LTC128B", "LTC64B", "ZFILL")]
            current[".".join(parts)] += 1
    return out


def sass_of(cuobjdump: str, obj: Path, arch: str) -> str:
    """cuobjdump's SASS of ``obj`` for sm_``arch``."""
    proc = subprocess.run([cuobjdump, "-sass", "-arch", f"sm_{arch}", str(obj)], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        raise RuntimeError("cuobjdump failed:\n" + proc.stderr[-2000:])
    return proc.stdout


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def short(name: str) -> str:
    """body_kernel<float, ddpm::TrainElem<float>, false> -> 'body TrainElem<float>'; the instance that
    draws its noise in-kernel (third argument true) -> 'body PSampleElem<float> noise'."""
    m = re.search(r"(body_kernel|finish_kernel)<(float|double), ddpm::(\w+)<[^>]*>\s*(?:, (true|false)\s*)?>", name)
    if not m:
        return name[:80]
    return f"{m.group(1).split('_')[0]} {m.group(3)}<{m.group(2)}>" + (" noise" if m.group(4) == "true" else "")


def block_threads(kernels_cu: Path = CSRC / "cuda" / "kernels.cu") -> dict[str, int]:
    """Threads a block of each kernel kind launches, read from kernels.cu: {"body": kThreads,
    "finish": kFinishThreads}."""
    text = kernels_cu.read_text()
    out = {}
    for kind, const in (("body", "kThreads"), ("finish", "kFinishThreads")):
        m = re.search(rf"constexpr int {const} = (\d+);", text)
        if not m:
            raise RuntimeError(f"{kernels_cu}: no `constexpr int {const} = N;`")
        out[kind] = int(m.group(1))
    return out


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


def compile_kernels(nvcc: str, archs=("80", "90"), output: Path | None = None,
                    sass_arch: str | None = None) -> list[dict]:
    """Compile kernels.cu for ``archs``; ptxas' rows, each with a short demangled ``name``, its block's
    ``threads`` and theoretical ``blocks_per_sm`` / ``occupancy`` (occupancy()). With ``sass_arch`` (one
    of ``archs``), that architecture's rows also get ``sass``: the Counter of their memory instructions
    (parse_sass; needs cuobjdump, else RuntimeError). Raises RuntimeError with nvcc's last lines when it
    fails."""
    cuobjdump = None
    if sass_arch is not None:
        cuobjdump = find_cuobjdump(nvcc)
        if cuobjdump is None:
            raise RuntimeError("cuobjdump not found (beside nvcc, on PATH, or in the triton wheel)")
    with tempfile.TemporaryDirectory() as tmp:
        obj = output or Path(tmp) / "kernels.o"
        proc = subprocess.run(nvcc_command(nvcc, archs, obj), capture_output=True, text=True, timeout=1500)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise RuntimeError("nvcc failed:\n" + "\n".join(log.splitlines()[-40:]))
        sass = parse_sass(sass_of(cuobjdump, obj, sass_arch)) if cuobjdump else {}
    rows = parse_ptxas(log)
    threads = block_threads()
    for r, n in zip(rows, demangle([r["kernel"] for r in rows])):
        r["name"] = short(n)
        r["threads"] = threads["finish" if r["name"].startswith("finish") else "body"]
        r.update(occupancy(r.get("registers", 255), r["threads"], r["arch"], r.get("smem", 0)))
        if sass_arch is not None and r["arch"] == f"sm_{sass_arch}":
            r["sass"] = sass.get(r["kernel"], Counter())
    return rows
