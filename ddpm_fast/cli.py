"""The `ddpm-fast` command: each subcommand lives in its own module with a main(argv) -> int."""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "info": ("ddpm_fast.info", "list the backends and, for each unavailable one, why"),
    "build": ("ddpm_fast.build", "compile the extension now, with progress (--cuda-emu: the emulated CUDA one too)"),
    "bench": ("ddpm_fast.bench", "check and time every op on every available backend"),
    "demo": ("ddpm_fast.demo", "train a small diffusion model on sklearn's digits end to end"),
    "selftest": ("ddpm_fast.selftest", "on a new (GPU) machine: build, check, capture, bench; one report"),
}


def _usage() -> str:
    lines = ["usage: ddpm-fast {" + ",".join(SUBCOMMANDS) + "} [options]", "       ddpm-fast --version", ""]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `ddpm-fast COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        import platform

        import torch

        from . import __version__

        print(f"ddpm-fast {__version__} (torch {torch.__version__}, Python {platform.python_version()})")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"ddpm-fast: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(SUBCOMMANDS[name][0])
    except ModuleNotFoundError as exc:
        print(f"ddpm-fast {name}: not available in this version ({exc})", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
