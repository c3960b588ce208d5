"""@triton.jit kernels that draw seeded noise two ways, for tests/test_native_ops.py (imported only where
Triton is installed): tl.randn4x's four lanes per Philox block, and ddpm_fast's Triton helper
_math.philox_normal per counter."""
import triton
import triton.language as tl

from ddpm_fast.triton import _math


@triton.jit
def randn4x_kernel(out_ptr, seed, n_blocks, BLOCK: tl.constexpr):
    """out[4 k + j] = lane j of tl.randn4x(seed, k) for blocks k < n_blocks."""
    blocks = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n0, n1, n2, n3 = tl.randn4x(seed, blocks)
    m = blocks < n_blocks
    tl.store(out_ptr + 4 * blocks, n0, mask=m)
    tl.store(out_ptr + 4 * blocks + 1, n1, mask=m)
    tl.store(out_ptr + 4 * blocks + 2, n2, mask=m)
    tl.store(out_ptr + 4 * blocks + 3, n3, mask=m)


@triton.jit
def philox_normal_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
    """out[g] = _math.philox_normal(seed, g) for counters g < n."""
    counters = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    tl.store(out_ptr + counters, _math.philox_normal(seed, counters), mask=counters < n)


@triton.jit
def philox_normal_rows_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
    """out[g] = _math._philox_normal_rows(seed, ...) for counters g < n, BLOCK per program (a multiple of 4)."""
    first = (tl.program_id(0) * BLOCK).to(tl.int64)
    counters = first + tl.arange(0, BLOCK)
    tl.store(out_ptr + counters, _math._philox_normal_rows(seed, first, BLOCK), mask=counters < n)
