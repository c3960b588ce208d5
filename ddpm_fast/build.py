"""`ddpm-fast build`: compile ddpm_fast's libraries now (with progress) instead of on first use.

Builds the compiled extension (CPU kernels, plus CUDA kernels when a GPU and a toolkit are present) and,
with --cuda-emu or DDPM_FAST_CUDA_EMU=1, the emulated-CUDA library of backend "cuda_emu". Cached in
$DDPM_FAST_BUILD_DIR (default ~/.cache/ddpm_fast): later processes load them without a compiler.
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ddpm-fast build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda-emu", action="store_true",
                        help="also build the emulated CUDA backend (default: only when DDPM_FAST_CUDA_EMU=1)")
    args = parser.parse_args(argv)

    from . import _build

    status = 0
    start = time.monotonic()
    module, reason = _build.load()
    if module is None:
        print(f"compiled extension: FAILED: {reason}", file=sys.stderr)
        status = 1
    else:
        kind = "CPU+CUDA" if module.with_cuda else f"CPU only ({module.no_cuda_reason})"
        print(f"compiled extension: ready, {kind}: {module.library_path} ({time.monotonic() - start:.0f} s)")
    if args.cuda_emu or _build.emu_requested():
        start = time.monotonic()
        lib, reason = _build.load_emu(force=True)
        if lib is None:
            print(f"emulated CUDA library: FAILED: {reason}", file=sys.stderr)
            status = 1
        else:
            print(f"emulated CUDA library: ready: {lib} ({time.monotonic() - start:.0f} s)")
    return status
