"""What the launchers share: can a tensor run here, compute dtype, packed table, block size, seeds."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import triton.language as tl

from .. import options
from ..schedule import NoiseSchedule
from ..backends import FALLBACK_WARNED, BackendUnavailableError

# The Triton interpreter is chosen when kernels are defined (at import), from this variable.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Option ids as the kernels receive them (ddpm_fast.options; the family modules import them from here).
MEAN_IDS, VAR_IDS, WEIGHTING_IDS = options.MEAN_IDS, options.VAR_IDS, options.WEIGHTING_IDS
LEARNED = options.LEARNED_VAR_IDS


_BF16 = torch.bfloat16


def check_device(*tensors) -> None:
    """Raise BackendUnavailableError (with every reason) if these tensors cannot run on Triton here."""
    if INTERPRET:  # CPU or CUDA tensors, not bfloat16 (the interpreter has no bf16 arithmetic); else CUDA ones
        for x in tensors:
            if x is not None and (x.dtype is _BF16 or not (x.is_cpu or x.is_cuda)):
                break
        else:
            return
    else:
        for x in tensors:
            if x is not None and not x.is_cuda:
                break
        else:
            return
    reasons = []
    for x in tensors:
        if x is None:
            continue
        if x.device.type == "cpu" and not INTERPRET:
            reasons.append(
                "triton runs CPU tensors only through its interpreter, which is off: set TRITON_INTERPRET=1 "
                "before importing ddpm_fast (for checking only; use CUDA tensors for speed)"
            )
        elif x.device.type not in ("cpu", "cuda"):
            reasons.append(f"triton kernels here run CUDA tensors, got a tensor on {x.device}")
        if x.dtype == torch.bfloat16 and INTERPRET:
            reasons.append("the Triton interpreter cannot do bfloat16 arithmetic (bf16 runs on a GPU only)")
    if reasons:
        raise BackendUnavailableError("backend='triton' cannot take these inputs: " + "; ".join(dict.fromkeys(reasons)))


def compute_dtype(*tensors) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16 / bf16 / fp32 all compute in fp32)."""
    for x in tensors:
        if x is not None and x.dtype == torch.float64:
            return torch.float64
    return torch.float32


def tl_dtype(dtype: torch.dtype):
    """The Triton type of a compute dtype (float64 or float32)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


# table(schedule, device, cdt): the schedule's packed [T, len(COLUMNS)] table in the compute dtype, on ``device``
# (NoiseSchedule.table itself: no wrapper frame per call)
table = NoiseSchedule.table


def var_offset(x: torch.Tensor, var_type: int) -> int:
    """Elements from the mean half of a model output (or its gradient) [B, 2C, ...] to its variance half: C times
    the channel stride (0 without a learned variance). Kernels address the mean half by x's own strides, planned
    at x_t's shape (_layout.run's shape), and the variance half at this offset: no half is made as a view."""
    return (x.shape[1] // 2) * x.stride(1) if var_type in LEARNED else 0


def block_for(n: int) -> tuple:
    """(BLOCK, num_warps) for n elements per sample. The interpreter prefers few large programs."""
    p = 1 << max(int(n) - 1, 0).bit_length()
    if INTERPRET:
        return max(16, min(p, 4096)), 4
    return max(128, min(p, 1024)), 4


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# CUDA's limit on grid axis 0 (axes 1 and 2 stop at 65535, so the batch is never put there), and the
# largest element index a kernel may compute in int32.
MAX_PROGRAMS = 2**31 - 1
INT32_INDEX_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class LaunchConfig:
    """How an elementwise kernel covers [batch, n]: grid (n_chunks * batch,) on axis 0, program p handling
    chunk p % n_chunks of sample p // n_chunks (_math._program_chunk); block elements per program; idx64:
    element indices in int64 (n + block would pass INT32_INDEX_LIMIT), else int32."""

    grid: tuple
    block: int
    warps: int
    n_chunks: int
    idx64: bool
    # the launchers' argument tails on this plan (a config is made per cached plan, _layout), each kept under the
    # key of what else it depends on (kernel, table, options): a repeated launch reads one dict entry
    tails: dict = field(default_factory=dict, compare=False, repr=False)


def launch_config(n: int, batch: int) -> LaunchConfig:
    """The launch for n elements per sample and batch samples (n, batch >= 1).

    Raises ValueError if n_chunks * batch programs exceed MAX_PROGRAMS (about 2^41 elements at BLOCK 1024).
    """
    block, warps = block_for(n)
    n_chunks = cdiv(n, block)
    programs = n_chunks * batch
    if programs > MAX_PROGRAMS:
        raise ValueError(f"input: {batch} samples x {n} elements need {programs} Triton programs of {block} "
                         f"elements, more than the {MAX_PROGRAMS} a grid can hold; split the batch")
    return LaunchConfig((programs,), block, warps, n_chunks, n_chunks * block > INT32_INDEX_LIMIT)


def device_guard(device: torch.device):
    """A context that makes ``device`` the current CUDA device for a launch (Triton launches on the
    current device); a no-op for CPU tensors (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def seed_tensor(seed, generator, device) -> torch.Tensor:
    """An int64 [1] tensor on ``device`` holding the Philox seed, made without a host sync.

    seed (int) -> filled on the device; else drawn from ``generator`` (or torch's default one for
    the device) by torch.randint on the device.
    """
    if seed is not None:
        return torch.full((1,), int(seed), dtype=torch.int64, device=device)
    return torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64, device=device)


# Whether backend="triton" warned that float64 runs on the reference (ddpm_fast.backends.route decides that
# fallback from its capability table; tests clear this list to see the warning again).
_FP64_WARNED = FALLBACK_WARNED["triton"]
