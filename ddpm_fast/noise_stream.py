"""The in-kernel noise stream, defined in float64 numpy: what every fused backend's seeded draw must equal.

A seeded step (p_sample_step, ddim_step, solver_update's draw_noise) draws element i of sample b (i its
row-major index, N elements per sample) at counter g = b * N + i: lane g % 4 of triton.language.randn4x(seed,
g // 4). That is one Philox-4x32-10 block per four counters (counter (g // 4, 0), key the seed's two 32-bit
words), its four output words as triton's uniform floats (float32, exact here), and Box-Muller on words (0, 1)
for lanes 0 (cosine) and 1 (sine), on words (2, 3) for lanes 2 and 3. The kernels compute it in float32
(csrc/ddpm_math.h's philox_normal, csrc/cpu/simd_philox.h, ddpm_fast/triton/_math.py's philox_normal); this
module is their independent check (tests/test_native_ops.py, ``ddpm-fast selftest``).
"""
from __future__ import annotations

import numpy as np

_M32 = np.uint64(0xFFFFFFFF)


def _philox_block(seed: int, blocks: np.ndarray) -> tuple:
    """The four output words (uint64 arrays holding 32-bit values) of Philox-4x32-10 for counters (blocks, 0)."""
    c0, c1 = blocks & _M32, blocks >> np.uint64(32)
    c2, c3 = np.zeros_like(c0), np.zeros_like(c0)
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    for _ in range(10):
        p0, p2 = c0 * np.uint64(0xD2511F53), c2 * np.uint64(0xCD9E8D57)  # < 2^64: exact in uint64
        c0, c1, c2, c3 = ((p2 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p2 & _M32,
                          (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p0 & _M32)
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def _uniform(word: np.ndarray) -> np.ndarray:
    """triton.language.uint_to_uniform_float of 32-bit words, as float64 (the float32 values, exactly)."""
    a = word.astype(np.uint32).view(np.int32)
    return (np.where(a < 0, ~a, a).astype(np.float32) * np.float32(4.6566127342e-10)).astype(np.float64)


def normals(seed: int, counters: np.ndarray) -> tuple:
    """(z, radius): the draws of ``counters`` (uint64) under ``seed`` (an int in [0, 2**63)) in float64, and each
    draw's Box-Muller radius sqrt(-2 log max(u, 1e-7)) (error bounds scale with it)."""
    counters = np.asarray(counters, dtype=np.uint64)
    c0, c1, c2, c3 = _philox_block(seed, counters >> np.uint64(2))
    lane = counters & np.uint64(3)
    second_pair = lane >= 2
    u_radius = np.maximum(_uniform(np.where(second_pair, c2, c0)), float(np.float32(1e-7)))
    angle = 2.0 * np.pi * _uniform(np.where(second_pair, c3, c1))
    radius = np.sqrt(-2.0 * np.log(u_radius))
    return radius * np.where(lane & np.uint64(1), np.sin(angle), np.cos(angle)), radius
