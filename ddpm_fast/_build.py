"""Just-in-time builds of ddpm_fast's compiled libraries from csrc/ (torch.utils.cpp_extension + ninja).

Two libraries, each built on first use into a cache directory keyed by a hash of the sources, the flags
and the torch version (``$DDPM_FAST_BUILD_DIR``, default ``~/.cache/ddpm_fast``), under cpp_extension's
file lock, with progress on stderr (stage, objects done, elapsed seconds); later processes load the
cached library without a compiler (``ddpm-fast build`` prebuilds):

- ddpm_fast._C (ops ``torch.ops.ddpm_fast``): the CPU kernels, plus the CUDA kernels when CUDA_HOME
  exists, torch has CUDA and a CUDA device is visible. CUDA architectures: ``$DDPM_FAST_CUDA_ARCHS``
  ("80;90"), else the visible GPUs' compute capabilities, with PTX for the highest. A failed CUDA build
  falls back to a CPU-only build and is recorded (``cuda-<hash>.failed`` in the cache root) so that new
  processes do not retry it silently; ``$DDPM_FAST_RETRY_CUDA_BUILD=1`` or deleting the file retries.
- the emulated-CUDA library (ops ``torch.ops.ddpm_fast_emu``, backend "cuda_emu", only when
  ``$DDPM_FAST_CUDA_EMU=1`` or asked by ``load_emu(force=True)``): csrc/cuda/kernels.cu compiled as host
  C++ against csrc/cuda/emu/cuda_emu.h, with the op families' CUDA host path
  (csrc/ops/host.h) running on CPU tensors.

``$DDPM_FAST_SANITIZE=1`` builds both with AddressSanitizer + UndefinedBehaviorSanitizer (-O1 -g, any UB
report aborts) into separate cache directories; the process must then run with libasan preloaded
(``LD_PRELOAD=$(c++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0``, see .ci/run).
``load()`` / ``load_emu()`` return (module or None, reason): the reason says why it is unavailable.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import threading
import time
import types
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
NAME = "ddpm_fast_C"
EMU_NAME = "ddpm_fast_cuda_emu"
DEFAULT_CUDA_ARCHS = "80;90"  # when no GPU is visible to pick from
PROGRESS_SECONDS = 10.0  # a progress line at least this often while a build runs
_lock = threading.Lock()
_state: dict = {}


def cuda_archs() -> list[str]:
    """Compute capabilities to build for, e.g. ["80", "90"]: $DDPM_FAST_CUDA_ARCHS ("80;90" or "8.0 9.0"),
    else those of the visible GPUs, else DEFAULT_CUDA_ARCHS. The highest also gets PTX (cuda_flags)."""
    raw = os.environ.get("DDPM_FAST_CUDA_ARCHS")
    if raw is None:
        if torch.cuda.is_available():
            caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
            return [f"{major}{minor}" for major, minor in sorted(caps)]
        raw = DEFAULT_CUDA_ARCHS
    archs = [a.replace(".", "").strip() for a in raw.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise ValueError(f"DDPM_FAST_CUDA_ARCHS: expected compute capabilities like '80;90', got {raw!r}")
    return sorted(set(archs), key=int)


def first_toolkit(candidates) -> str | None:
    """The first folder among ``candidates`` (None entries skipped) that holds a CUDA toolkit
    (include/cuda_runtime.h), or None."""
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return str(c)
    return None


class _DropNoCudaRuntimeNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def cpp_extension():
    """torch.utils.cpp_extension, imported without its warning "No CUDA runtime is found, using
    CUDA_HOME=...": logged at import on any machine with a CUDA toolkit but no GPU, it says nothing about
    ddpm_fast's builds (CUDA kernels are built only when a GPU is visible; the CPU and emulated builds
    need no CUDA)."""
    if "torch.utils.cpp_extension" in sys.modules:
        return sys.modules["torch.utils.cpp_extension"]
    log = logging.getLogger("torch.utils.cpp_extension")
    notice_filter = _DropNoCudaRuntimeNotice()
    log.addFilter(notice_filter)
    try:
        from torch.utils import cpp_extension as module
    finally:
        log.removeFilter(notice_filter)
    return module


def cuda_home() -> str | None:
    """The CUDA toolkit to build with: $CUDA_HOME, $CUDA_PATH, torch's guess, /usr/local/cuda, the first
    that holds one. torch guesses the parent of the folder of the `nvcc` on PATH, which holds no toolkit
    when that nvcc is a wrapper script (as /usr/local/bin/nvcc is here): the build would then fail to link."""
    return first_toolkit([os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension().CUDA_HOME,
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


def sanitize() -> bool:
    """$DDPM_FAST_SANITIZE=1: build with ASan + UBSan (separate cache directories)."""
    return os.environ.get("DDPM_FAST_SANITIZE", "") not in ("", "0")


SANITIZER_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]


def openmp_flags() -> list[str]:
    """-fopenmp where torch's ATen threads with OpenMP: at::parallel_for is inline in ATen's headers and
    runs serially in code compiled without it. Linking it reuses torch's own libgomp.so.1 (same soname)."""
    return ["-fopenmp"] if torch._C.has_openmp else []


def cpu_flags() -> list[str]:
    """-O3, no -ffast-math (it breaks NaN propagation); OpenMP (see openmp_flags); at::vec code for the
    widest vector ISA torch's CPU dispatch uses here (AVX-512, else AVX2; $ATEN_CPU_CAPABILITY lowers it).
    Under $DDPM_FAST_SANITIZE: -O1 and the sanitizer flags instead of -O3."""
    flags = (["-O1"] + SANITIZER_FLAGS if sanitize() else ["-O3"]) + openmp_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                  "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    elif capability == "AVX2":
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags


def emu_flags() -> list[str]:
    """The emulated-CUDA build: -O1 (it checks code paths, not speed: a short build), hidden symbols so
    that its copies of ddpm's C++ functions never bind to those of ddpm_fast._C loaded beside it."""
    flags = ["-DDDPM_CUDA_EMU", "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-Wno-unknown-pragmas"]
    return flags + (["-O1"] + SANITIZER_FLAGS if sanitize() else ["-O1"])


def linker_flags() -> list[str]:
    return openmp_flags() + (["-fsanitize=address,undefined"] if sanitize() else [])


def cuda_flags(archs: list[str]) -> list[str]:
    """nvcc flags: SASS for each arch, plus PTX for the highest (JIT-compiled on newer GPUs)."""
    flags = ["-O3", "--expt-relaxed-constexpr"]
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    if archs:
        top = max(archs, key=int)
        flags += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
    return flags


def op_sources() -> list[Path]:
    """The op family files csrc/ops/*.cpp (schemas and host functions; each registers itself with
    TORCH_LIBRARY_FRAGMENT), found by name: a new family needs no change here."""
    return sorted((CSRC / "ops").glob("*.cpp"))


def sources(with_cuda: bool) -> list[Path]:
    srcs = op_sources() + [CSRC / "cpu" / "kernels.cpp"]
    if with_cuda:
        srcs.append(CSRC / "cuda" / "kernels.cu")
    return srcs


def emu_sources() -> list[Path]:
    return op_sources() + [CSRC / "cuda" / "emu" / "kernels_emu.cpp"]


def _digest(kind: str, flags) -> str:
    """Hash of the sources a build of ``kind`` ("cpu", "cuda", "cuda_emu") compiles, the flags and torch."""
    skip = {"cpu": {"cuda"}, "cuda": set(), "cuda_emu": {"cpu"}}[kind]
    h = hashlib.sha256()
    for p in sorted(CSRC.rglob("*")):
        if p.is_file() and p.suffix in (".h", ".cpp", ".cu", ".cuh") and not skip & set(p.relative_to(CSRC).parts):
            h.update(p.relative_to(CSRC).as_posix().encode())
            h.update(p.read_bytes())
    h.update(repr((torch.__version__, torch.version.cuda, sys.version_info[:2], flags)).encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("DDPM_FAST_BUILD_DIR", Path.home() / ".cache" / "ddpm_fast"))


def build_dir(with_cuda: bool, archs: list[str]) -> Path:
    kind = "cuda" if with_cuda else "cpu"
    digest = _digest(kind, (cpu_flags(), cuda_flags(archs) if with_cuda else None))
    return cache_root() / f"{'asan-' if sanitize() else ''}{kind}-{digest}"


def emu_build_dir() -> Path:
    return cache_root() / f"{'asan-' if sanitize() else ''}cuda_emu-{_digest('cuda_emu', emu_flags())}"


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


class Progress:
    """Progress lines on stderr while a build runs in ``directory``: stage (compiling k/n objects, linking),
    the objects finished, elapsed seconds; one when an object finishes and at least every PROGRESS_SECONDS."""

    def __init__(self, what: str, directory: Path, nsources: int, stream=None):
        self.what, self.directory, self.nsources = what, directory, nsources
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.monotonic()
        self._wall_start = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ddpm_fast-build-progress", daemon=True)

    def say(self, text: str) -> None:
        print(f"ddpm_fast: [{self.what}] {text} ({time.monotonic() - self.start:.0f} s)", file=self.stream,
              flush=True)

    def objects_done(self) -> list[str]:
        """Object files this build has written so far (older ones in a reused directory do not count)."""
        try:
            return sorted(p.name for p in self.directory.glob("*.o") if p.stat().st_mtime >= self._wall_start - 1)
        except OSError:
            return []

    def stage(self) -> str:
        done = self.objects_done()
        if len(done) >= self.nsources:
            return f"linking ({self.nsources}/{self.nsources} objects compiled)"
        return f"compiling {self.nsources} sources: {len(done)}/{self.nsources} done" + (
            f" ({', '.join(done)})" if done else "")

    def _run(self) -> None:
        last_seen, last_print = 0, time.monotonic()
        while not self._stop.wait(0.5):
            n = len(self.objects_done())
            if n != last_seen or time.monotonic() - last_print >= PROGRESS_SECONDS:
                last_seen, last_print = n, time.monotonic()
                self.say(self.stage())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self._stop.set()
        self._thread.join()
        self.say("failed" if exc_type else "built")
        return False


def _check_tools() -> None:
    _ensure_ninja_on_path()
    if not shutil.which("ninja"):
        raise RuntimeError("ninja is missing: pip install ninja")
    cxx = os.environ.get("CXX", "c++")
    if not shutil.which(cxx):
        raise RuntimeError(f"no C++ compiler found ({cxx!r} is not on PATH; set CXX)")


def _build(with_cuda: bool, archs: list[str], directory: Path) -> types.ModuleType:
    """Compile ddpm_fast._C into ``directory`` (progress on stderr) and import it."""
    ext = cpp_extension()
    _check_tools()
    directory.mkdir(parents=True, exist_ok=True)
    what = "CPU+CUDA" if with_cuda else "CPU"
    srcs = sources(with_cuda)
    print(f"ddpm_fast: building the compiled extension ({what}{', sanitizers' if sanitize() else ''}; one time, "
          f"about {'several minutes' if with_cuda else 'a minute'} on 2 cores) in {directory}",
          file=sys.stderr, flush=True)
    if with_cuda:
        ext.CUDA_HOME = cuda_home()  # the toolkit want_cuda() found (cpp_extension reads this global)
    with Progress(what, directory, len(srcs)):
        return ext.load(
            name=NAME,
            sources=[str(s) for s in srcs],
            extra_cflags=cpu_flags() + (["-DDDPM_WITH_CUDA"] if with_cuda else []),
            extra_ldflags=linker_flags(),
            extra_cuda_cflags=cuda_flags(archs) + ["-DDDPM_WITH_CUDA"],
            extra_include_paths=[str(CSRC)],
            build_directory=str(directory),
            with_cuda=with_cuda,
            is_python_module=True,  # the ops' direct bindings (csrc/ops/direct.h)
            verbose=False,
        )


def _build_emu(directory: Path) -> types.ModuleType:
    """Compile the emulated-CUDA library into ``directory`` (progress on stderr) and import it."""
    ext = cpp_extension()
    _check_tools()
    directory.mkdir(parents=True, exist_ok=True)
    srcs = emu_sources()
    print(f"ddpm_fast: building the emulated CUDA backend{' (sanitizers)' if sanitize() else ''} (one time, about "
          f"two minutes on 2 cores) in {directory}", file=sys.stderr, flush=True)
    with Progress("cuda_emu", directory, len(srcs)):
        return ext.load(
            name=EMU_NAME,
            sources=[str(s) for s in srcs],
            extra_cflags=emu_flags(),
            extra_ldflags=["-fsanitize=address,undefined"] if sanitize() else [],
            extra_include_paths=[str(CSRC)],
            build_directory=str(directory),
            with_cuda=False,
            is_python_module=True,  # the ops' direct bindings (csrc/ops/direct.h)
            verbose=False,
        )


def _load_or_build(directory: Path, lib: Path, build) -> types.ModuleType:
    """The library at ``lib`` imported as a Python module (its ops registered in torch.ops on load; the module
    holds their direct bindings, csrc/ops/direct.h), built first when no complete build is there."""
    done = directory / "built.ok"  # written after a complete build (a build may be in progress)
    module = sys.modules.get(lib.stem)  # loaded earlier in this process
    if module is None and not (lib.exists() and done.exists()):
        module = build()  # cpp_extension.load's import of what it built
        done.write_text(torch.__version__)
    if module is None:
        spec = importlib.util.spec_from_file_location(lib.stem, lib)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    sys.modules[lib.stem] = module
    return module


def _failure_text(exc: BaseException) -> str:
    if isinstance(exc, OSError):  # dlopen failure: typically an ABI mismatch with the installed torch
        return f"could not be loaded (ABI mismatch with torch {torch.__version__}?): {exc}"
    return f"failed to build: {type(exc).__name__}: {_excerpt(exc)}"


def load() -> tuple[types.ModuleType | None, str]:
    """Build (if needed) and load the library; (module ddpm_fast._C or None, reason it is unavailable)."""
    with _lock:
        if "result" not in _state:
            _state["result"] = _load_locked()
        return _state["result"]


def cuda_failure_record(archs: list[str]) -> Path:
    """Where a failed CUDA build of these sources and flags is recorded."""
    return cache_root() / f"{build_dir(True, archs).name}.failed"


def _load_locked():
    if os.environ.get("DDPM_FAST_NO_EXTENSION"):
        return None, "disabled by DDPM_FAST_NO_EXTENSION"
    with_cuda, why_not_cuda = want_cuda()
    archs = cuda_archs() if with_cuda else []
    if with_cuda:
        record = cuda_failure_record(archs)
        if record.exists() and not os.environ.get("DDPM_FAST_RETRY_CUDA_BUILD"):
            with_cuda = False
            why_not_cuda = (f"the CUDA build failed earlier ({record.read_text().strip()}); delete {record} or "
                            "set DDPM_FAST_RETRY_CUDA_BUILD=1 to retry")
        else:
            directory = build_dir(True, archs)
            try:
                direct = _load_or_build(directory, directory / f"{NAME}.so", lambda: _build(True, archs, directory))
            except Exception as exc:  # noqa: BLE001 -- recorded; the CPU build below still gives the cpu backend
                why_not_cuda = f"the CUDA extension {_failure_text(exc)}"
                record.parent.mkdir(parents=True, exist_ok=True)
                record.write_text(why_not_cuda)
                print(f"ddpm_fast: {why_not_cuda}\nddpm_fast: building the CPU kernels alone; recorded in {record} "
                      "(later processes will not retry)", file=sys.stderr, flush=True)
                with_cuda = False
    if not with_cuda:
        archs = []
        directory = build_dir(False, archs)
        try:
            direct = _load_or_build(directory, directory / f"{NAME}.so", lambda: _build(False, archs, directory))
        except Exception as exc:  # noqa: BLE001 -- the reason is reported, ddpm_fast keeps working
            return None, f"compiled extension {_failure_text(exc)}"
    lib = build_dir(with_cuda, archs) / f"{NAME}.so"
    if not hasattr(torch.ops.ddpm_fast, "training_losses"):
        return None, f"compiled extension {lib} loaded but registered no ddpm_fast ops"
    module = types.ModuleType("ddpm_fast._C", "ddpm_fast's compiled ops (torch.ops.ddpm_fast)")
    module.ops = torch.ops.ddpm_fast
    module.direct = direct  # each op's direct binding (csrc/ops/direct.h): ddpm_fast.native's EagerKernel
    module.library_path = str(lib)
    module.with_cuda = with_cuda
    module.no_cuda_reason = why_not_cuda
    module.cuda_archs = archs
    sys.modules["ddpm_fast._C"] = module
    return module, ""


def direct_bindings(emulated: bool) -> types.ModuleType:
    """The loaded library's extension module (load() / load_emu() first): each op's direct binding, a function
    of the op's name (csrc/ops/direct.h)."""
    return _state["emu_direct"] if emulated else _state["result"][0].direct


def emu_requested() -> bool:
    """$DDPM_FAST_CUDA_EMU=1: build and offer the emulated CUDA backend."""
    return os.environ.get("DDPM_FAST_CUDA_EMU", "") not in ("", "0")


def load_emu(force: bool = False) -> tuple[str | None, str]:
    """Build (if needed) and load the emulated-CUDA library when $DDPM_FAST_CUDA_EMU=1 (or ``force``);
    (library path or None, reason it is unavailable). Its ops are torch.ops.ddpm_fast_emu."""
    with _lock:
        if "emu" in _state and (_state["emu"][0] is not None or not force):
            return _state["emu"]
        if not (force or emu_requested()):
            return None, ("off: set DDPM_FAST_CUDA_EMU=1 to build (on first use; `ddpm-fast build --cuda-emu` "
                          "prebuilds it) and use it")
        directory = emu_build_dir()
        lib = directory / f"{EMU_NAME}.so"
        try:
            _state["emu_direct"] = _load_or_build(directory, lib, lambda: _build_emu(directory))
        except Exception as exc:  # noqa: BLE001 -- the reason is reported, ddpm_fast keeps working
            _state["emu"] = (None, f"emulated CUDA library {_failure_text(exc)}")
            return _state["emu"]
        if not hasattr(torch.ops.ddpm_fast_emu, "training_losses"):
            _state["emu"] = (None, f"emulated CUDA library {lib} loaded but registered no ddpm_fast_emu ops")
        else:
            _state["emu"] = (str(lib), "")
        return _state["emu"]
