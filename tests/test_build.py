"""Build robustness (ddpm_fast._build, native.availability): CUDA architectures, the fallback when the CUDA
kernels do not run on the GPU, a failed CUDA build recorded and replaced by a CPU-only build, progress
lines, `ddpm-fast build`, and no "No CUDA runtime is found" warning. No GPU or compiler run needed: the
GPU and the compiler are replaced where a test says so."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import types

import pytest
import torch

from ddpm_fast import _build, backends, native


def test_cuda_archs_from_env_or_visible_gpus(monkeypatch):
    monkeypatch.setenv("DDPM_FAST_CUDA_ARCHS", "9.0 8.0;80")
    assert _build.cuda_archs() == ["80", "90"]
    monkeypatch.setenv("DDPM_FAST_CUDA_ARCHS", "sm80")
    with pytest.raises(ValueError, match="DDPM_FAST_CUDA_ARCHS"):
        _build.cuda_archs()
    monkeypatch.delenv("DDPM_FAST_CUDA_ARCHS")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: [(12, 0), (8, 6)][i])
    assert _build.cuda_archs() == ["86", "120"]


def test_cuda_flags_add_ptx_for_the_highest_arch():
    flags = " ".join(_build.cuda_flags(["80", "90"]))
    assert "arch=compute_80,code=sm_80" in flags and "arch=compute_90,code=sm_90" in flags
    assert "arch=compute_90,code=compute_90" in flags and "code=compute_80" not in flags


def test_gpu_without_a_kernel_image_falls_back_to_triton(monkeypatch):
    """availability('cuda') launches one tiny kernel; when it fails the backend is unavailable with the
    reason, and backend="auto" on CUDA tensors goes on to the next backend."""
    fake = types.SimpleNamespace(with_cuda=True, no_cuda_reason="", cuda_archs=["80", "90"])
    monkeypatch.setattr(_build, "load", lambda: (fake, ""))
    monkeypatch.setattr(native, "_register_fakes", lambda: None)
    monkeypatch.setitem(sys.modules, "ddpm_fast._C", fake)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (12, 0))

    def no_image():
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(native, "_launch_tiny_cuda_kernel", no_image)
    monkeypatch.delitem(_build._state, "cuda_runs", raising=False)
    backends._load.cache_clear()
    try:
        ok, reason = native.availability("cuda")
        assert not ok and "sm_120" in reason and "80;90" in reason and "no kernel image" in reason, reason
        assert backends.availability()["cuda"] == (False, reason)
        assert backends.select("auto", "cuda") is not native
    finally:
        _build._state.pop("cuda_runs", None)
        backends._load.cache_clear()


def test_failed_cuda_build_is_recorded_and_leaves_the_cpu_backend(monkeypatch, tmp_path, capsys):
    assert native.availability("cpu")[0]  # the real library first, so that torch.ops.ddpm_fast has its ops
    monkeypatch.setenv("DDPM_FAST_BUILD_DIR", str(tmp_path))
    monkeypatch.delenv("DDPM_FAST_RETRY_CUDA_BUILD", raising=False)
    monkeypatch.setattr(_build, "want_cuda", lambda: (True, ""))
    monkeypatch.setenv("DDPM_FAST_CUDA_ARCHS", "80")
    built = []

    def fake_load_or_build(directory, lib, build):
        built.append(directory.name.split("-")[0])
        if directory.name.startswith("cuda"):
            raise RuntimeError("nvcc fatal   : Unsupported gpu architecture 'compute_80'")

    monkeypatch.setattr(_build, "_load_or_build", fake_load_or_build)
    module, reason = _build._load_locked()
    assert module is not None and not module.with_cuda, reason
    assert built == ["cuda", "cpu"]
    assert "Unsupported gpu architecture" in module.no_cuda_reason
    assert "later processes will not retry" in capsys.readouterr().err
    record = _build.cuda_failure_record(["80"])
    assert record.exists()
    # a new process (fresh state) does not retry, and says why and how to retry
    built.clear()
    module, _ = _build._load_locked()
    assert built == ["cpu"] and "failed earlier" in module.no_cuda_reason and str(record) in module.no_cuda_reason
    monkeypatch.setenv("DDPM_FAST_RETRY_CUDA_BUILD", "1")
    built.clear()
    _build._load_locked()
    assert built == ["cuda", "cpu"]


def test_progress_reports_stage_objects_and_seconds(tmp_path, monkeypatch):
    monkeypatch.setattr(_build, "PROGRESS_SECONDS", 0.0)
    out = io.StringIO()
    progress = _build.Progress("CPU", tmp_path, 2, stream=out)
    assert progress.stage() == "compiling 2 sources: 0/2 done"
    (tmp_path / "ops.o").write_bytes(b"")
    assert progress.stage() == "compiling 2 sources: 1/2 done (ops.o)"
    (tmp_path / "kernels.o").write_bytes(b"")
    assert progress.stage() == "linking (2/2 objects compiled)"
    with progress:
        pass
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("ddpm_fast: [CPU] built (") and lines[-1].endswith(" s)"), lines


def test_no_cuda_runtime_warning_and_build_command(tmp_path):
    """`ddpm-fast build` on the cached library: says what is ready, and torch's "No CUDA runtime is found"
    warning (logged when cpp_extension is imported on a machine with a toolkit and no GPU) is not shown."""
    env = dict(os.environ)
    env.pop("DDPM_FAST_CUDA_EMU", None)
    out = subprocess.run([sys.executable, "-m", "ddpm_fast.cli", "build"], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0 and "compiled extension: ready" in out.stdout, out.stdout + out.stderr
    assert "emulated CUDA library" not in out.stdout
    assert "No CUDA runtime is found" not in out.stderr, out.stderr


def _family_headers() -> list[str]:
    """The csrc/ops headers that declare bodies: those with DDPM_BODY(Name) lines."""
    import re

    return sorted(p.name for p in (_build.CSRC / "ops").glob("*.h")
                  if re.search(r"^DDPM_BODY\(\w+\)$", p.read_text(), flags=re.M))


def test_every_op_family_reaches_the_drivers():
    """The drivers get their bodies from csrc/ops/families.h (DDPM_BODY lines, no central list of bodies):
    it includes every family header, every body in one is followed by its DDPM_BODY line, and the build
    compiles every family's .cpp."""
    import re

    ops = _build.CSRC / "ops"
    listed = sorted(re.findall(r'#include "(\w+\.h)"', (ops / "families.h").read_text()))
    assert listed == _family_headers() and len(listed) >= 4, (listed, _family_headers())
    for name in listed:
        text = (ops / name).read_text()
        bodies = re.findall(r"template <class S> struct (\w+Elem)\b", text)
        registered = re.findall(r"^DDPM_BODY\((\w+)\)$", text, flags=re.M)
        assert bodies and bodies == registered, (name, bodies, registered)
        assert (ops / name).with_suffix(".cpp") in _build.op_sources(), name
    for driver in ("cpu/kernels.cpp", "cuda/kernels.cu"):
        text = (_build.CSRC / driver).read_text()
        assert re.search(r'#define DDPM_BODY\(Body\).*\n#include "\.\./ops/families\.h"\s*$', text), driver
