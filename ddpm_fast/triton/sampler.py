"""Sampler steps and p_mean_variance: ONE kernel from (model_output, x_t, t) to the outputs.

MODE 0 p_mean_variance: writes mean, pred_xstart, and the variance / log variance (full size for a
learned variance, else one value per sample). MODE 1 p_sample_step: writes sample, pred_xstart.
MODE 2 ddim_step: writes sample, pred_xstart. Noise: read from a tensor (NOISE=1), or generated
in-kernel with Philox (NOISE=2: _math.philox_normal(seed, b * N + i), i the element's row-major index within its
sample, the seed read from a device tensor), or none (NOISE=0: t = 0 only / eta = 0). The counter is
the logical index, not the walk order (_layout's logical stride set), so a seed draws the same noise for
contiguous, channels_last and sliced inputs, and the same as the CPU and CUDA backends.

Dynamic thresholding needs each sample's quantile of |x0| before any output can be written:
pass 1 (kernel): |x0| -> a [B, N] buffer; passes 2-3: torch.kthvalue over that buffer (one or two
selections, interpolated as torch.quantile); final pass: the kernel above reading the threshold per
sample. No host sync: the quantile stays on the device.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl

from . import _math as M
from ._dispatch import call, define, wrap_triton
from ._layout import philox_blocks_whole, run
from ._runtime import (LEARNED, MEAN_IDS, VAR_IDS, check_device, seed_tensor, table, tl_dtype,
                       var_offset)


@triton.jit
def _abs_xstart_kernel(mo_ptr, xt_ptr, out_ptr, t_ptr, table_ptr,
                       m_sb, m_s1, m_s2, m_s3, x_sb, x_s1, x_s2, x_s3,
                       N, T, D2, D3, n_chunks, MEAN: tl.constexpr, FLAT: tl.constexpr, BLOCK: tl.constexpr,
                       IDX64: tl.constexpr, CDT: tl.constexpr):
    """|predict_xstart| into a contiguous [B, N] buffer (for the per-sample quantile)."""
    b, chunk, n, m, t = M._program_block_t(t_ptr, T, N, n_chunks, BLOCK, IDX64)
    out = M._load(mo_ptr, b, n, m, m_sb, m_s1, m_s2, m_s3, D2, D3, FLAT, CDT)
    xt = M._load(xt_ptr, b, n, m, x_sb, x_s1, x_s2, x_s3, D2, D3, FLAT, CDT)
    tl.store(out_ptr + b * N + n, tl.abs(M.predict_xstart(out, xt, table_ptr, t, MEAN)), mask=m)


@triton.jit(do_not_specialize=["seed"])
def _sampler_kernel(mo_ptr, xt_ptr, nz_ptr, o1_ptr, o2_ptr, o3_ptr, o4_ptr, seed_ptr, thr_ptr, t_ptr, table_ptr,
                    m_sb, m_s1, m_s2, m_s3, x_sb, x_s1, x_s2, x_s3, z_sb, z_s1, z_s2, z_s3,
                    a_sb, a_s1, a_s2, a_s3, b_sb, b_s1, b_s2, b_s3, c_sb, c_s1, c_s2, c_s3, d_sb, d_s1, d_s2, d_s3,
                    l_sb, l_s1, l_s2, l_s3, N, T, D2, D3, n_chunks, var_offset, sample_max, eta, seed,
                    MODE: tl.constexpr, MEAN: tl.constexpr, VAR: tl.constexpr, CLIP: tl.constexpr, DT: tl.constexpr,
                    NOISE: tl.constexpr, FLAT: tl.constexpr, BLOCK: tl.constexpr, IDX64: tl.constexpr,
                    CDT: tl.constexpr, SEED_FROM_PTR: tl.constexpr = True, NOISE_BLOCKS: tl.constexpr = False):
    """Outputs: MODE 0 (mean, pred_xstart, variance, log_variance); MODE 1 / 2 (sample, pred_xstart). A learned
    variance is read var_offset elements from the model output's mean half, with its strides.
    l_*: the row-major strides (l_sb = N) giving in-kernel noise its counter b * N + row-major index; the
    Philox seed is seed_ptr[0] (SEED_FROM_PTR: a device tensor, graph-safe) or the int seed. NOISE_BLOCKS (a
    flat layout and N % 4 == 0): the chunk's counters are whole Philox blocks, drawn four per block."""
    b, chunk, n, m, t = M._program_block_t(t_ptr, T, N, n_chunks, BLOCK, IDX64)
    out = M._load(mo_ptr, b, n, m, m_sb, m_s1, m_s2, m_s3, D2, D3, FLAT, CDT)
    xt = M._load(xt_ptr, b, n, m, x_sb, x_s1, x_s2, x_s3, D2, D3, FLAT, CDT)
    s = 1.0
    if DT:
        s = tl.minimum(tl.maximum(tl.load(thr_ptr + b).to(CDT), 1.0), sample_max)
    px = M.process_xstart(M.predict_xstart(out, xt, table_ptr, t, MEAN), s, CLIP, DT)
    if NOISE == 1:
        z = M._load(nz_ptr, b, n, m, z_sb, z_s1, z_s2, z_s3, D2, D3, FLAT, CDT)
    elif NOISE == 2:
        z = M._philox_draws(M._seed(seed_ptr, seed, SEED_FROM_PTR), b, chunk, n, l_sb, l_s1, l_s2, l_s3, D2, D3,
                            FLAT, BLOCK, NOISE_BLOCKS).to(CDT)
    if MODE == 2:
        sigma, sqrt_abar_prev, eps_coef = M.ddim_coefs(eta, table_ptr, t)
        res = M.ddim_sample(px, xt, M._col(table_ptr, t, M.SQRT_ABAR), M._col(table_ptr, t, M.SQRT_1M_ABAR),
                            sqrt_abar_prev, eps_coef)
        if NOISE != 0:
            if t != 0:
                res = res + sigma * z
    else:
        lv = M._load_model_log_variance(out, mo_ptr + var_offset, b, n, m, t, table_ptr, m_sb, m_s1, m_s2, m_s3, D2,
                                        D3, VAR, FLAT, CDT)
        if MEAN == 2:
            res = out
        else:
            res = M.posterior_mean(px, xt, table_ptr, t)
        if MODE == 1:
            if NOISE != 0:
                if t != 0:
                    res = res + tl.exp(0.5 * lv) * z
        else:
            if VAR >= 2:
                tl.store(o3_ptr + M._offsets(b, n, c_sb, c_s1, c_s2, c_s3, D2, D3, FLAT), tl.exp(lv), mask=m)
                tl.store(o4_ptr + M._offsets(b, n, d_sb, d_s1, d_s2, d_s3, D2, D3, FLAT), lv, mask=m)
            else:
                if chunk == 0:
                    tl.store(o3_ptr + b, tl.exp(lv))
                    tl.store(o4_ptr + b, lv)
    tl.store(o1_ptr + M._offsets(b, n, a_sb, a_s1, a_s2, a_s3, D2, D3, FLAT), res, mask=m)
    tl.store(o2_ptr + M._offsets(b, n, b_sb, b_s1, b_s2, b_s3, D2, D3, FLAT), px, mask=m)


# -- launcher ----------------------------------------------------------------------------------
def _quantile(a: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row quantile of a [B, N] tensor with torch.quantile's linear interpolation (float32 ranks),
    by one or two torch.kthvalue selections (no size limit, no host sync)."""
    n = a.shape[1]
    rank = np.float32(q) * np.float32(n - 1)
    lo, hi = int(math.floor(rank)), int(math.ceil(rank))
    below = torch.kthvalue(a, lo + 1, dim=1).values
    if hi == lo:
        return below
    above = torch.kthvalue(a, hi + 1, dim=1).values
    return torch.lerp(below, above, float(rank - np.float32(lo)))


def _stride_sets(p, n_out: int, full: bool, noise_mode: int) -> tuple:
    """_sampler_kernel's stride arguments for plan p: the 3 inputs' stride sets, the outputs' (n_out: 2, or 4
    when full), x_t's twice more for the per-sample / absent outputs when not full (never used), then the
    row-major set for in-kernel noise (noise_mode 2; else x_t's, unused)."""
    sets = list(p.strides[:3 + n_out])
    if not full:
        sets += [p.strides[1]] * 2
    sets.append(p.strides[-1] if noise_mode == 2 else p.strides[1])
    return tuple(s for st in sets for s in st)


_cached_stride_sets = functools.lru_cache(maxsize=256)(_stride_sets)


def _stride_args(p, n_out: int, full: bool, noise_mode: int) -> tuple:
    """_stride_sets, cached (the plans repeat); computed each time for symbolic strides (tracing: unhashable)."""
    try:
        return _cached_stride_sets(p, n_out, full, noise_mode)
    except TypeError:
        return _stride_sets(p, n_out, full, noise_mode)


def _launch(wrap, mode, model_output, x_t, t, table_, noise, seed, mean_type, var_type, clip, dynamic_threshold,
            sample_max_value, eta, outs, seed_value=None):
    """Fill outs (see _sampler_kernel) for MODE ``mode``; noise: a tensor, or Philox from seed[0] or the int
    seed_value, or neither."""
    B = x_t.shape[0]
    cdt = table_.dtype
    learned = var_type in LEARNED
    thr = []
    if dynamic_threshold is not None:
        def launch_abs(ins, _, p, c):
            buf = torch.empty((B, p.n), dtype=cdt, device=x_t.device)
            wrap(_abs_xstart_kernel)[c.grid](*ins, buf, t, table_, *p.args, p.n, table_.shape[0], p.sizes[1],
                                             p.sizes[2], c.n_chunks, MEAN=mean_type, FLAT=p.flat, BLOCK=c.block,
                                             IDX64=c.idx64, CDT=tl_dtype(cdt), num_warps=c.warps)
            thr.append(_quantile(buf, dynamic_threshold))

        run((model_output, x_t), (), launch_abs, shape=x_t.shape)  # the mean half (see var_offset)
    noise_mode = 1 if noise is not None else (0 if seed is None and seed_value is None else 2)
    full = mode == 0 and learned  # variance outputs full size (else one value per sample, or none)

    def launch(ins, o, p, c):
        o34 = (o[2], o[3]) if full else ((outs[2], outs[3]) if mode == 0 else (o[0], o[0]))
        wrap(_sampler_kernel)[c.grid](
            *ins, o[0], o[1], *o34, seed if seed is not None else t, thr[0] if thr else t, t, table_,
            *_stride_args(p, len(o), full, noise_mode), p.n, table_.shape[0], p.sizes[1], p.sizes[2], c.n_chunks,
            var_offset(ins[0], var_type), float(sample_max_value), float(eta), 0 if seed_value is None else seed_value,
            MODE=mode, MEAN=mean_type, VAR=var_type, CLIP=clip, DT=dynamic_threshold is not None, NOISE=noise_mode,
            FLAT=p.flat, BLOCK=c.block, IDX64=c.idx64, CDT=tl_dtype(cdt), SEED_FROM_PTR=seed_value is None,
            NOISE_BLOCKS=noise_mode == 2 and philox_blocks_whole(p), num_warps=c.warps)

    ins = (model_output, x_t, noise if noise is not None else x_t)  # planned at x_t's shape: the mean half
    run(ins, outs[:4] if full else outs[:2], launch, logical=noise_mode == 2, shape=x_t.shape, like=1)


def _dt(dynamic_threshold: float):
    return None if dynamic_threshold < 0 else dynamic_threshold


def _per_sample(x):
    return (x.shape[0],) + (1,) * (x.ndim - 1)


def _p_mean_variance(wrap, model_output, x_t, t, table_, mean_type, var_type, clip, dynamic_threshold,
                     sample_max_value):
    """(mean, pred_xstart, variance, log_variance); dynamic_threshold < 0 means none."""
    outs = _p_mean_variance_fake(model_output, x_t, t, table_, mean_type, var_type, clip, dynamic_threshold,
                                 sample_max_value)
    if x_t.numel():
        _launch(wrap, 0, model_output, x_t, t, table_, None, None, mean_type, var_type, clip, _dt(dynamic_threshold),
                sample_max_value, 0.0, outs)
    return outs


def _p_mean_variance_fake(model_output, x_t, t, table_, mean_type, var_type, clip, dynamic_threshold,
                          sample_max_value):
    if var_type in LEARNED:
        return tuple(torch.empty_like(x_t) for _ in range(4))
    return torch.empty_like(x_t), torch.empty_like(x_t), x_t.new_empty(_per_sample(x_t)), x_t.new_empty(_per_sample(x_t))


def _sampler_step(wrap, model_output, x_t, t, table_, noise, seed, ddim, mean_type, var_type, clip, dynamic_threshold,
                  sample_max_value, eta, seed_value=None):
    """(sample, pred_xstart) of one DDPM (ddim=False) or DDIM step; noise tensor, or Philox from seed[0] or the
    int seed_value, or none."""
    outs = (torch.empty_like(x_t), torch.empty_like(x_t))
    if x_t.numel():
        _launch(wrap, 2 if ddim else 1, model_output, x_t, t, table_, noise, seed, mean_type, var_type, clip,
                _dt(dynamic_threshold), sample_max_value, eta, outs, seed_value)
    return outs


@define("p_mean_variance", _p_mean_variance_fake)
def p_mean_variance_op(model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, table_: torch.Tensor,
                       mean_type: int, var_type: int, clip: bool, dynamic_threshold: float,
                       sample_max_value: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, pred_xstart, variance, log_variance); dynamic_threshold < 0 means none."""
    return _p_mean_variance(wrap_triton, model_output, x_t, t, table_, mean_type, var_type, clip, dynamic_threshold,
                            sample_max_value)


@define("sampler_step", lambda model_output, x_t, *rest: (torch.empty_like(x_t), torch.empty_like(x_t)))
def sampler_step_op(model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, table_: torch.Tensor,
                    noise: Optional[torch.Tensor], seed: Optional[torch.Tensor], ddim: bool, mean_type: int,
                    var_type: int, clip: bool, dynamic_threshold: float, sample_max_value: float,
                    eta: float, seed_value: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample, pred_xstart) of one DDPM (ddim=False) or DDIM step; noise tensor, or Philox from seed[0] or the
    int seed_value, or none."""
    return _sampler_step(wrap_triton, model_output, x_t, t, table_, noise, seed, ddim, mean_type, var_type, clip,
                         dynamic_threshold, sample_max_value, eta, seed_value)


# -- backend functions -------------------------------------------------------------------------
def _table(schedule, x_t):
    return table(schedule, x_t.device, torch.float32)


def p_mean_variance(model_output, x_t, t, schedule, *, mean_type, var_type, clip_denoised=False,
                    dynamic_threshold=None, sample_max_value=1.0):
    """dict mean, variance, log_variance, pred_xstart in x_t's dtype (not differentiable on this backend)."""
    args = (model_output, x_t, t, _table(schedule, x_t), MEAN_IDS[mean_type], VAR_IDS[var_type], bool(clip_denoised),
            -1.0 if dynamic_threshold is None else float(dynamic_threshold), float(sample_max_value))
    mean, px, var, logvar = call(p_mean_variance_op, _p_mean_variance, None, args, args[:3])
    return {"mean": mean, "variance": var, "log_variance": logvar, "pred_xstart": px}


def _noise_args(noise, generator, seed, x_t, wanted):
    """(noise tensor, seed tensor, int seed), at most one given: an int seed is passed to the kernel as is (as
    on the compiled path); a generator's draw stays a device tensor (no host read), drawn once x_t is known to
    run here (no generator state used by a call that raises)."""
    if not wanted:
        return None, None, None
    if noise is not None:
        return noise, None, None
    if seed is not None:
        return None, None, int(seed)
    check_device(x_t)
    return None, seed_tensor(None, generator, x_t.device), None


def p_sample_step(model_output, x_t, t, schedule, *, mean_type, var_type, clip_denoised=True, dynamic_threshold=None,
                  sample_max_value=1.0, noise=None, generator=None, seed=None):
    """dict sample, pred_xstart (x_t's dtype). Noise: the tensor, else Philox in-kernel from seed / generator."""
    nz, sd, seed_value = _noise_args(noise, generator, seed, x_t, True)
    args = (model_output, x_t, t, _table(schedule, x_t), nz, sd, False, MEAN_IDS[mean_type], VAR_IDS[var_type],
            bool(clip_denoised), -1.0 if dynamic_threshold is None else float(dynamic_threshold),
            float(sample_max_value), 0.0, seed_value)
    sample, px = call(sampler_step_op, _sampler_step, None, args, (*args[:3], nz))
    return {"sample": sample, "pred_xstart": px}


def ddim_step(model_output, x_t, t, schedule, *, eta=0.0, clip_denoised=True, dynamic_threshold=None,
              sample_max_value=1.0, mean_type="epsilon", var_type="fixed_small", noise=None, generator=None, seed=None):
    """dict sample, pred_xstart (x_t's dtype); noise only when eta != 0."""
    nz, sd, seed_value = _noise_args(noise, generator, seed, x_t, eta != 0.0)
    args = (model_output, x_t, t, _table(schedule, x_t), nz, sd, True, MEAN_IDS[mean_type], VAR_IDS[var_type],
            bool(clip_denoised), -1.0 if dynamic_threshold is None else float(dynamic_threshold),
            float(sample_max_value), float(eta), seed_value)
    sample, px = call(sampler_step_op, _sampler_step, None, args, (*args[:3], nz))
    return {"sample": sample, "pred_xstart": px}
