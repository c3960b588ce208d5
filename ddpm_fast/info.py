"""`ddpm-fast info`: versions, devices, and every backend with the reason it is unavailable and what it hands
to the reference (ddpm_fast.backends.CAPABILITIES)."""
from __future__ import annotations

import argparse
import platform
import sys


def report() -> str:
    import torch

    from . import __version__
    from .backends import availability, fallback_rules

    lines = [
        f"ddpm_fast {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA build {torch.version.cuda})",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    if torch.cuda.is_available():
        lines.append(f"device: {torch.cuda.get_device_name()} ({torch.cuda.device_count()} GPU)")
    else:
        lines.append("device: CPU only (no CUDA device visible)")
    lines.append("backends:")
    for name, (ok, reason) in availability().items():
        lines.append(f"  {name:<10} {'available' if ok else 'unavailable: ' + reason}")
        lines += [f"  {'':<10}   {rule}" for rule in fallback_rules(name)]
    from . import _build

    module = sys.modules.get("ddpm_fast._C")
    if module is not None:
        lines.append(f"compiled extension: {module.library_path}"
                     + (f" (CUDA archs {';'.join(module.cuda_archs)} + PTX)" if module.with_cuda else ""))
    emu = _build._state.get("emu", (None, ""))[0]
    if emu:
        lines.append(f"emulated CUDA library: {emu}")
    if _build.sanitize():
        lines.append("sanitizers: ASan + UBSan builds (DDPM_FAST_SANITIZE)")
    return "\n".join(lines)


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="ddpm-fast info", description=__doc__).parse_args(argv)
    print(report())
    return 0
