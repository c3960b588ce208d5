"""Just-in-time build of the compiled extension ddpm_fast._C from csrc/ (torch.utils.cpp_extension + ninja).

The library is built on first use into a cache directory keyed by a hash of the sources, the flags and
the torch version (``$DDPM_FAST_BUILD_DIR``, default ``~/.cache/ddpm_fast``), under cpp_extension's file
lock, with a one-line message on stderr; later processes load the cached library without a compiler.
The CPU kernels are always built; the CUDA kernels only when CUDA_HOME exists, torch has CUDA and a CUDA
device is present, for the architectures in ``$DDPM_FAST_CUDA_ARCHS`` (default "80;90"), never inferred
from the visible GPU. ``load()`` returns (module or None, reason): the reason says why it failed.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import types
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
NAME = "ddpm_fast_C"
DEFAULT_CUDA_ARCHS = "80;90"
_lock = threading.Lock()
_state: dict = {}


def cuda_archs() -> list[str]:
    """Compute capabilities to build for, e.g. ["80", "90"] ($DDPM_FAST_CUDA_ARCHS: "80;90" or "8.0 9.0")."""
    raw = os.environ.get("DDPM_FAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    archs = [a.replace(".", "").strip() for a in raw.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    for a in archs:
        if not a.isdigit():
            raise ValueError(f"DDPM_FAST_CUDA_ARCHS: expected compute capabilities like '80;90', got {raw!r}")
    return archs


def first_toolkit(candidates) -> str | None:
    """The first folder among ``candidates`` (None entries skipped) that holds a CUDA toolkit
    (include/cuda_runtime.h), or None."""
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return str(c)
    return None


def cuda_home() -> str | None:
    """The CUDA toolkit to build with: $CUDA_HOME, $CUDA_PATH, torch's guess, /usr/local/cuda, the first
    that holds one. torch guesses the parent of the folder of the `nvcc` on PATH, which holds no toolkit
    when that nvcc is a wrapper script (as /usr/local/bin/nvcc is here): the build would then fail to link."""
    from torch.utils import cpp_extension

    return first_toolkit([os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
                          "/usr/local/cuda"])


def want_cuda() -> tuple[bool, str]:
    """(build the CUDA kernels?, why not)."""
    if torch.version.cuda is None:
        return False, "torch was built without CUDA"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    if cuda_home() is None:
        return False, "CUDA_HOME is not set and nvcc was not found"
    return True, ""


def openmp_flags() -> list[str]:
    """-fopenmp where torch's ATen threads with OpenMP: at::parallel_for is inline in ATen's headers and
    runs serially in code compiled without it. Linking it reuses torch's own libgomp.so.1 (same soname)."""
    return ["-fopenmp"] if torch._C.has_openmp else []


def cpu_flags() -> list[str]:
    """-O3, no -ffast-math (it breaks NaN propagation); OpenMP (see openmp_flags); at::vec code for the
    widest vector ISA torch's CPU dispatch uses here (AVX-512, else AVX2; $ATEN_CPU_CAPABILITY lowers it)."""
    flags = ["-O3"] + openmp_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                  "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    elif capability == "AVX2":
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags


def cuda_flags(archs: list[str]) -> list[str]:
    flags = ["-O3", "--expt-relaxed-constexpr"]
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags


def sources(with_cuda: bool) -> list[Path]:
    srcs = [CSRC / "ops.cpp", CSRC / "autograd.cpp", CSRC / "cpu" / "kernels.cpp"]
    if with_cuda:
        srcs.append(CSRC / "cuda" / "kernels.cu")
    return srcs


def _digest(with_cuda: bool, archs: list[str]) -> str:
    h = hashlib.sha256()
    for p in sorted(CSRC.rglob("*")):
        if p.is_file() and p.suffix in (".h", ".cpp", ".cu", ".cuh") and (with_cuda or "cuda" not in p.parts):
            h.update(p.relative_to(CSRC).as_posix().encode())
            h.update(p.read_bytes())
    h.update(repr((torch.__version__, torch.version.cuda, sys.version_info[:2], cpu_flags(),
                   cuda_flags(archs) if with_cuda else None)).encode())
    return h.hexdigest()[:16]


def build_dir(with_cuda: bool, archs: list[str]) -> Path:
    root = Path(os.environ.get("DDPM_FAST_BUILD_DIR", Path.home() / ".cache" / "ddpm_fast"))
    return root / f"{'cuda' if with_cuda else 'cpu'}-{_digest(with_cuda, archs)}"


def _ensure_ninja_on_path() -> None:
    """Use the `ninja` pip package's binary when no ninja is on PATH."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # noqa: F401

        bin_dir = getattr(ninja, "BIN_DIR", None)
    except ImportError:
        return
    if bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def _excerpt(text: str, lines: int = 12) -> str:
    keep = [ln for ln in str(text).splitlines() if ln.strip()]
    errs = [ln for ln in keep if "error" in ln.lower()]
    return " | ".join((errs or keep)[:lines])[:2000]


def _build(with_cuda: bool, archs: list[str], directory: Path) -> None:
    from torch.utils import cpp_extension

    _ensure_ninja_on_path()
    if not shutil.which("ninja"):
        raise RuntimeError("ninja is missing: pip install ninja")
    cxx = os.environ.get("CXX", "c++")
    if not shutil.which(cxx):
        raise RuntimeError(f"no C++ compiler found ({cxx!r} is not on PATH; set CXX)")
    directory.mkdir(parents=True, exist_ok=True)
    print(f"ddpm_fast: building the compiled extension ({'CPU+CUDA' if with_cuda else 'CPU'}, one time, "
          f"about a minute) in {directory}", file=sys.stderr, flush=True)
    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home()  # the toolkit want_cuda() found (cpp_extension reads this global)
    cpp_extension.load(
        name=NAME,
        sources=[str(s) for s in sources(with_cuda)],
        extra_cflags=cpu_flags() + (["-DDDPM_WITH_CUDA"] if with_cuda else []),
        extra_ldflags=openmp_flags(),
        extra_cuda_cflags=cuda_flags(archs) + ["-DDDPM_WITH_CUDA"],
        extra_include_paths=[str(CSRC)],
        build_directory=str(directory),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=False,
    )


def load() -> tuple[types.ModuleType | None, str]:
    """Build (if needed) and load the library; (module ddpm_fast._C or None, reason it is unavailable)."""
    with _lock:
        if "result" in _state:
            return _state["result"]
        _state["result"] = _load_locked()
        return _state["result"]


def _load_locked():
    if os.environ.get("DDPM_FAST_NO_EXTENSION"):
        return None, "disabled by DDPM_FAST_NO_EXTENSION"
    with_cuda, why_not_cuda = want_cuda()
    archs = cuda_archs() if with_cuda else []
    directory = build_dir(with_cuda, archs)
    lib = directory / f"{NAME}.so"
    try:
        done = directory / "built.ok"  # written after a complete build (a build may be in progress)
        if lib.exists() and done.exists():
            torch.ops.load_library(str(lib))
        else:
            _build(with_cuda, archs, directory)
            done.write_text(torch.__version__)
    except OSError as exc:  # dlopen failure: typically an ABI mismatch with the installed torch
        return None, f"compiled extension could not be loaded (ABI mismatch with torch {torch.__version__}?): {exc}"
    except Exception as exc:  # noqa: BLE001 -- the reason is reported, ddpm_fast keeps working
        return None, f"compiled extension failed to build: {type(exc).__name__}: {_excerpt(exc)}"
    if not hasattr(torch.ops.ddpm_fast, "training_losses"):
        return None, f"compiled extension {lib} loaded but registered no ddpm_fast ops"
    module = types.ModuleType("ddpm_fast._C", "ddpm_fast's compiled ops (torch.ops.ddpm_fast)")
    module.ops = torch.ops.ddpm_fast
    module.library_path = str(lib)
    module.with_cuda = with_cuda
    module.no_cuda_reason = why_not_cuda
    module.cuda_archs = archs
    sys.modules["ddpm_fast._C"] = module
    return module, ""
