"""Forward noising: q_sample (forward and backward kernels), the v target velocity and the prior term prior_bpd.

q_sample: x_t = sqrt_abar_t x0 + sqrt_1m_abar_t noise, one pass (reads x0, noise; writes x_t); velocity:
v = sqrt_abar_t noise - sqrt_1m_abar_t x0, the same kernel (VELOCITY), no backward kernel.
Backward: one pass (reads grad; writes grad_x0, grad_noise).
prior_bpd: one pass over x0 to per-program partial sums [B, n_chunks], then a fixed-order sum.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import _math as M
from ._dispatch import autograd_function, call, define, wrap_triton
from ._layout import run
from ..schedule import COLUMN
from ._runtime import check_device, compute_dtype, table, tl_dtype


# -- kernels -----------------------------------------------------------------------------------
@triton.jit
def _q_sample_kernel(x0_ptr, nz_ptr, out_ptr, t_ptr, table_ptr,
                     a_sb, a_s1, a_s2, a_s3, n_sb, n_s1, n_s2, n_s3, o_sb, o_s1, o_s2, o_s3, N, T, D2, D3,
                     n_chunks, FLAT: tl.constexpr, BLOCK: tl.constexpr, IDX64: tl.constexpr, CDT: tl.constexpr,
                     VELOCITY: tl.constexpr = False):
    """x_t = q_sample(x0, noise), or with VELOCITY the v target mean_target(x0, ., noise) of mean type v."""
    b, chunk, n = M._program_chunk(n_chunks, BLOCK, IDX64)
    m = n < N
    t = M._load_t(t_ptr, b, T)
    x0 = M._load(x0_ptr, b, n, m, a_sb, a_s1, a_s2, a_s3, D2, D3, FLAT, CDT)
    nz = M._load(nz_ptr, b, n, m, n_sb, n_s1, n_s2, n_s3, D2, D3, FLAT, CDT)
    if VELOCITY:
        out = M.mean_target(x0, x0, nz, table_ptr, t, 3)  # MEAN 3: v
    else:
        out = M.q_sample(x0, nz, table_ptr, t)
    tl.store(out_ptr + M._offsets(b, n, o_sb, o_s1, o_s2, o_s3, D2, D3, FLAT), out, mask=m)


@triton.jit
def linear2_bwd_kernel(g_ptr, gx_ptr, gn_ptr, t_ptr, table_ptr,
                       g_sb, g_s1, g_s2, g_s3, x_sb, x_s1, x_s2, x_s3, n_sb, n_s1, n_s2, n_s3,
                       N, T, D2, D3, n_chunks, CA: tl.constexpr, CB: tl.constexpr,
                       FLAT: tl.constexpr, BLOCK: tl.constexpr, IDX64: tl.constexpr, CDT: tl.constexpr):
    """Backward of y = col_CA(t) a + col_CB(t) b: grad_a = col_CA g, grad_b = col_CB g (one pass)."""
    b, chunk, n = M._program_chunk(n_chunks, BLOCK, IDX64)
    m = n < N
    t = M._load_t(t_ptr, b, T)
    g = M._load(g_ptr, b, n, m, g_sb, g_s1, g_s2, g_s3, D2, D3, FLAT, CDT)
    tl.store(gx_ptr + M._offsets(b, n, x_sb, x_s1, x_s2, x_s3, D2, D3, FLAT), M._col(table_ptr, t, CA) * g, mask=m)
    tl.store(gn_ptr + M._offsets(b, n, n_sb, n_s1, n_s2, n_s3, D2, D3, FLAT),
             M._col(table_ptr, t, CB) * g, mask=m)


@triton.jit
def _prior_kernel(x0_ptr, part_ptr, a_sb, a_s1, a_s2, a_s3, N, D2, D3, n_chunks, sqrt_abar, const,
                  FLAT: tl.constexpr, BLOCK: tl.constexpr, IDX64: tl.constexpr, CDT: tl.constexpr):
    """Partial sums of KL(N(sqrt_abar x0, 1 - abar) || N(0, 1)) = 0.5 (const + (sqrt_abar x0)^2), where the
    per-schedule constant const = -1 - log(1 - abar) + (1 - abar) is computed once in float64 on the host
    (it cancels catastrophically in float32 when abar_{T-1} is near 0)."""
    b, chunk, n = M._program_chunk(n_chunks, BLOCK, IDX64)
    m = n < N
    x0 = M._load(x0_ptr, b, n, m, a_sb, a_s1, a_s2, a_s3, D2, D3, FLAT, CDT)
    mean = sqrt_abar * x0
    kl = 0.5 * (const + mean * mean)
    tl.store(part_ptr + b * n_chunks + chunk, tl.sum(tl.where(m, kl, 0.0), axis=0))


@triton.jit
def _finish_mean_kernel(part_ptr, out_ptr, n_chunks, scale, CBLOCK: tl.constexpr):
    """out[b] = scale * (fixed-order sum of the partials of row b)."""
    b = tl.program_id(0).to(tl.int64)
    tl.store(out_ptr + b, M._row_sum(part_ptr, b, n_chunks, CBLOCK) * scale)


def finish_mean(wrap, part: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, n_chunks] partial sums -> [B] (times scale), deterministic and batch-independent."""
    B, n_chunks = part.shape
    out = torch.empty(B, dtype=part.dtype, device=part.device)
    if B:
        wrap(_finish_mean_kernel)[(B,)](part, out, n_chunks, scale, CBLOCK=64)
    return out


# -- launchers (see _dispatch: wrap is wrap_triton in the library ops, direct in eager) -------------------
def _q_sample(wrap, x0, t, noise, table_, velocity=False):
    """x_t (velocity: v) [B, ...] like x0 (t: int64 [B]; table_: the packed schedule table in the compute dtype)."""
    out = torch.empty_like(x0)
    if out.numel():
        def launch(ins, outs, p, c):
            wrap(_q_sample_kernel)[c.grid](
                *ins, *outs, t, table_, *p.args, p.n, table_.shape[0], p.sizes[1], p.sizes[2], c.n_chunks,
                FLAT=p.flat, BLOCK=c.block, IDX64=c.idx64, CDT=tl_dtype(table_.dtype), VELOCITY=velocity,
                num_warps=c.warps)

        run((x0, noise), (out,), launch)
    return out


def _q_sample_backward(wrap, grad, t, table_, x0_like, noise_like):
    """(grad of x0, grad of noise), laid out like x0_like / noise_like."""
    gx = torch.empty_like(x0_like)
    gn = torch.empty_like(noise_like)
    if grad.numel():
        def launch(ins, outs, p, c):
            wrap(linear2_bwd_kernel)[c.grid](
                *ins, *outs, t, table_, *p.args, p.n, table_.shape[0], p.sizes[1], p.sizes[2], c.n_chunks,
                CA=COLUMN["sqrt_alphas_cumprod"], CB=COLUMN["sqrt_one_minus_alphas_cumprod"], FLAT=p.flat,
                BLOCK=c.block, IDX64=c.idx64, CDT=tl_dtype(table_.dtype), num_warps=c.warps)

        run((grad,), (gx, gn), launch)
    return gx, gn


def _prior_bpd(wrap, x0, abar_last, const):
    """[B] prior term in bits/dim for abar_last = alphas_cumprod[T-1] (float32, float64 for float64 x0)."""
    cdt = compute_dtype(x0)
    B = x0.shape[0]
    N = x0.numel() // B if B else 0
    if B == 0 or N == 0:
        return torch.full((B,), float("nan"), dtype=cdt, device=x0.device)
    result = []

    def launch(ins, outs, p, c):
        part = torch.empty((B, c.n_chunks), dtype=cdt, device=x0.device)
        wrap(_prior_kernel)[c.grid](ins[0], part, *p.args, p.n, p.sizes[1], p.sizes[2], c.n_chunks,
                                    math.sqrt(abar_last), const, FLAT=p.flat, BLOCK=c.block, IDX64=c.idx64,
                                    CDT=tl_dtype(cdt), num_warps=c.warps)
        result.append(finish_mean(wrap, part, 1.0 / (p.n * math.log(2.0))))

    run((x0,), (), launch)
    return result[0]


# -- library ops and autograd ---------------------------------------------------------------------
@define("q_sample", lambda x0, t, noise, table_: torch.empty_like(x0))
def q_sample_op(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, table_: torch.Tensor) -> torch.Tensor:
    return _q_sample(wrap_triton, x0, t, noise, table_)


@define("q_sample_backward",
            lambda grad, t, table_, x0_like, noise_like: (torch.empty_like(x0_like), torch.empty_like(noise_like)))
def q_sample_backward_op(grad: torch.Tensor, t: torch.Tensor, table_: torch.Tensor, x0_like: torch.Tensor,
                         noise_like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _q_sample_backward(wrap_triton, grad, t, table_, x0_like, noise_like)


_velocity = functools.partial(_q_sample, velocity=True)


@define("velocity", lambda x0, t, noise, table_: torch.empty_like(x0))
def velocity_op(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, table_: torch.Tensor) -> torch.Tensor:
    return _q_sample(wrap_triton, x0, t, noise, table_, True)


def _q_sample_setup(ctx, inputs, output):
    x0, t, noise, table_ = inputs
    ctx.save_for_backward(t, table_, x0, noise)


def _q_sample_bwd(ctx, grad):
    t, table_, x0, noise = ctx.saved_tensors
    args = (grad, t, table_, x0, noise)
    gx, gn = call(q_sample_backward_op, _q_sample_backward, None, args, args)
    return gx, None, gn, None


q_sample_op.register_autograd(_q_sample_bwd, setup_context=_q_sample_setup)
_QSample = autograd_function("QSample", _q_sample, _q_sample_setup, _q_sample_bwd)


@define("prior_bpd", lambda x0, abar_last, const: x0.new_empty((x0.shape[0],), dtype=compute_dtype(x0)))
def prior_bpd_op(x0: torch.Tensor, abar_last: float, const: float) -> torch.Tensor:
    """[B] prior term in bits/dim for abar_last = alphas_cumprod[T-1] (float32, float64 for float64 x0)."""
    return _prior_bpd(wrap_triton, x0, abar_last, const)


def _prior_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.abar_last = inputs[1]


def _prior_bwd(ctx, grad):
    # d/dx0 of the mean over dims of 0.5 abar x0^2 / ln 2: a small unfused expression (no model depends on it).
    (x0,) = ctx.saved_tensors
    g = grad.reshape(-1, *([1] * (x0.ndim - 1))) * ctx.abar_last * x0.to(grad.dtype) / (x0[0].numel() * math.log(2.0))
    return g.to(x0.dtype), None, None


prior_bpd_op.register_autograd(_prior_bwd, setup_context=_prior_setup)
_PriorBpd = autograd_function("PriorBpd", _prior_bpd, _prior_setup, _prior_bwd)


def prior_constants(schedule) -> tuple:
    """(abar_{T-1}, -1 - log(1 - abar) + (1 - abar)) from the schedule's float64 CPU tables (no device read)."""
    abar = float(schedule.alphas_cumprod.numpy()[-1])  # CPU float64 tables, read through numpy
    lv = float(schedule.log_one_minus_alphas_cumprod.numpy()[-1])
    return abar, math.expm1(lv) - lv


# -- backend functions -------------------------------------------------------------------------
def q_sample(x0, t, noise, schedule):
    """x_t [B, ...] in x0's dtype."""
    check_device(x0, noise)
    args = (x0, t, noise, table(schedule, x0.device, torch.float32))
    return call(q_sample_op, _q_sample, _QSample, args, args, diff=(x0, noise))


def velocity(x0, t, noise, schedule):
    """v [B, ...] in x0's dtype (no gradient kernel: the router runs the reference for inputs that need one)."""
    check_device(x0, noise)
    args = (x0, t, noise, table(schedule, x0.device, torch.float32))
    return call(velocity_op, _velocity, None, args, args)


def prior_bpd(x0, schedule):
    """[B] bits/dim in float32 (float64 for float64 x0)."""
    check_device(x0)
    args = (x0, *prior_constants(schedule))
    return call(prior_bpd_op, _prior_bpd, _PriorBpd, args, (x0,), diff=(x0,))
