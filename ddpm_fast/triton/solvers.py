"""Multistep sampler steps: solver_update, ONE kernel for every step of ddpm_fast/solvers/steps.py.

Each step (DPM-Solver++ orders 1-3 ODE / SDE, Euler with churn, Euler ancestral, UniPC corrector +
predictor) is a linear combination, with per-sample coefficients, of x, the (guided) model output, up to
three history entries, UniPC's last_sample and one normal noise draw. The coefficients are one row of a
small table ``rows`` [R, 14] (columns COLUMNS; ddpm_fast/solvers/tables.py), picked per sample by
``row_index`` [B]. Per element, in the compute dtype (the rows' dtype: float32, float64 for float64):

    g = u, or guided_output(u, c, guidance_scale) with model_cond c; g *= cfg_factor[b] if given
    x_s = x + churn noise
    m = conv_sample x_s + conv_model g;  m = process_xstart(m, thresh[b]) if thresh given
    corrected = c_this x_s + c_last last + c_model m + c_h1 h1 + c_h2 h2 + c_h3 h3
    x_prev = p_corr corrected + p_m0 m + p_h1 h1 + p_h2 h2 + p_noise noise

An absent input reads as 0 (its terms are not computed). Outputs: x_prev (returned, x's dtype), m into
m_out and corrected into last_sample (when given), both in place. Every input of an element is read
before any output of it is written, by the same thread: m_out may be h3's memory (UniPC at full order),
last_sample is read then overwritten. Noise: a tensor (NOISE=1), Philox in-kernel (NOISE=2:
_math.philox_normal(seed, b * N + row-major index), the stream of p_sample_step and of the C++ kernels for a seed,
whatever the layout), or none (NOISE=0). One pass: reads up to 8 tensors, writes up to 3.
The result is ddpm_fast.reference.solver_update's (the one definition); the C++ twin: csrc/ops/solvers.h.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _math as M
from ._dispatch import call, define, wrap_triton
from ._layout import philox_blocks_whole, run
from ._runtime import check_device, seed_tensor, tl_dtype

# The columns of a row, in order (ddpm_fast/solvers/tables.py FUSED_COLUMNS; csrc/ops/solvers.h SolverCol).
COLUMNS = ("churn", "conv_sample", "conv_model", "c_this", "c_last", "c_model", "c_h1", "c_h2", "c_h3",
           "p_corr", "p_m0", "p_h1", "p_h2", "p_noise")
NUM_COLUMNS = tl.constexpr(len(COLUMNS))
CHURN, CONV_SAMPLE, CONV_MODEL, C_THIS, C_LAST, C_MODEL, C_H1, C_H2, C_H3, P_CORR, P_M0, P_H1, P_H2, P_NOISE = (
    tl.constexpr(i) for i in range(len(COLUMNS)))


@triton.jit
def _solver_update_kernel(x_ptr, u_ptr, c_ptr, h1_ptr, h2_ptr, h3_ptr, last_ptr, nz_ptr,
                          xp_ptr, m_ptr, lo_ptr, rows_ptr, row_index_ptr, cfg_ptr, thr_ptr, seed_ptr,
                          x_sb, x_s1, x_s2, x_s3, u_sb, u_s1, u_s2, u_s3, c_sb, c_s1, c_s2, c_s3,
                          h1_sb, h1_s1, h1_s2, h1_s3, h2_sb, h2_s1, h2_s2, h2_s3, h3_sb, h3_s1, h3_s2, h3_s3,
                          l_sb, l_s1, l_s2, l_s3, z_sb, z_s1, z_s2, z_s3, p_sb, p_s1, p_s2, p_s3,
                          m_sb, m_s1, m_s2, m_s3, lo_sb, lo_s1, lo_s2, lo_s3, r_sb, r_s1, r_s2, r_s3,
                          N, R, D2, D3, n_chunks, guidance_scale,
                          HAS_COND: tl.constexpr, HAS_CFG: tl.constexpr, HAS_THRESH: tl.constexpr,
                          HAS_H1: tl.constexpr, HAS_H2: tl.constexpr, HAS_H3: tl.constexpr,
                          HAS_LAST: tl.constexpr, NOISE: tl.constexpr, FLAT: tl.constexpr, BLOCK: tl.constexpr,
                          IDX64: tl.constexpr, CDT: tl.constexpr, NOISE_BLOCKS: tl.constexpr):
    """x_prev -> xp_ptr, m -> m_ptr, corrected -> lo_ptr (HAS_LAST) for the chunk of one sample.
    Strides: x, u (model_output), c (model_cond), h1..h3, l (last_sample read), z (noise), p (x_prev),
    m (m_out), lo (last_sample written), r (row-major: the in-kernel noise counter b * N + index).
    NOISE_BLOCKS (a flat layout and N % 4 == 0): the chunk's counters are whole Philox blocks, four draws each."""
    b, chunk, n = M._program_chunk(n_chunks, BLOCK, IDX64)
    mask = n < N
    row = rows_ptr + M._load_t(row_index_ptr, b, R) * NUM_COLUMNS  # this sample's row (index clamped to [0, R))
    # -- every input first (m_out may alias h3, last_sample is read then written) --
    x = M._load(x_ptr, b, n, mask, x_sb, x_s1, x_s2, x_s3, D2, D3, FLAT, CDT)
    guided = M._load(u_ptr, b, n, mask, u_sb, u_s1, u_s2, u_s3, D2, D3, FLAT, CDT)
    if HAS_COND:
        cond = M._load(c_ptr, b, n, mask, c_sb, c_s1, c_s2, c_s3, D2, D3, FLAT, CDT)
        guided = M.guided_output(guided, cond, guidance_scale)
    if HAS_CFG:
        guided = guided * tl.load(cfg_ptr + b).to(CDT)
    if HAS_H1:
        h1 = M._load(h1_ptr, b, n, mask, h1_sb, h1_s1, h1_s2, h1_s3, D2, D3, FLAT, CDT)
    if HAS_H2:
        h2 = M._load(h2_ptr, b, n, mask, h2_sb, h2_s1, h2_s2, h2_s3, D2, D3, FLAT, CDT)
    if HAS_H3:
        h3 = M._load(h3_ptr, b, n, mask, h3_sb, h3_s1, h3_s2, h3_s3, D2, D3, FLAT, CDT)
    if HAS_LAST:
        last = M._load(last_ptr, b, n, mask, l_sb, l_s1, l_s2, l_s3, D2, D3, FLAT, CDT)
    if NOISE == 1:
        noise = M._load(nz_ptr, b, n, mask, z_sb, z_s1, z_s2, z_s3, D2, D3, FLAT, CDT)
    elif NOISE == 2:
        noise = M._philox_draws(tl.load(seed_ptr), b, chunk, n, r_sb, r_s1, r_s2, r_s3, D2, D3, FLAT, BLOCK,
                                NOISE_BLOCKS).to(CDT)
    # -- the step --
    x_s = x
    if NOISE != 0:
        x_s = x + tl.load(row + CHURN) * noise
    m = tl.load(row + CONV_SAMPLE) * x_s + tl.load(row + CONV_MODEL) * guided
    if HAS_THRESH:
        m = M.process_xstart(m, tl.load(thr_ptr + b).to(CDT), False, True)
    corrected = tl.load(row + C_THIS) * x_s
    if HAS_LAST:
        corrected = corrected + tl.load(row + C_LAST) * last
    corrected = corrected + tl.load(row + C_MODEL) * m
    if HAS_H1:
        corrected = corrected + tl.load(row + C_H1) * h1
    if HAS_H2:
        corrected = corrected + tl.load(row + C_H2) * h2
    if HAS_H3:
        corrected = corrected + tl.load(row + C_H3) * h3
    x_prev = tl.load(row + P_CORR) * corrected + tl.load(row + P_M0) * m
    if HAS_H1:
        x_prev = x_prev + tl.load(row + P_H1) * h1
    if HAS_H2:
        x_prev = x_prev + tl.load(row + P_H2) * h2
    if NOISE != 0:
        x_prev = x_prev + tl.load(row + P_NOISE) * noise
    # -- then every output --
    tl.store(m_ptr + M._offsets(b, n, m_sb, m_s1, m_s2, m_s3, D2, D3, FLAT), m, mask=mask)
    if HAS_LAST:
        tl.store(lo_ptr + M._offsets(b, n, lo_sb, lo_s1, lo_s2, lo_s3, D2, D3, FLAT), corrected, mask=mask)
    tl.store(xp_ptr + M._offsets(b, n, p_sb, p_s1, p_s2, p_s3, D2, D3, FLAT), x_prev, mask=mask)


# -- launcher ----------------------------------------------------------------------------------
def _solver_update(wrap, x, model_output, model_cond, rows, row_index, guidance_scale, cfg_factor, thresh, h1, h2,
                   h3, last_sample, noise, seed, m_out):
    """x_prev (x's dtype, x's layout where dense); m_out and last_sample (when given) written in place. Noise: the
    tensor, else Philox from seed[0] (int64 [1]), else none. The compute dtype is the rows' (float32 / float64)."""
    x_prev = torch.empty_like(x)
    if not x.numel():
        return x_prev
    noise_mode = 1 if noise is not None else (0 if seed is None else 2)
    inputs = (x, model_output, *(v if v is not None else x for v in (model_cond, h1, h2, h3, last_sample, noise)))
    outputs = (x_prev, m_out) if last_sample is None else (x_prev, m_out, last_sample)

    def launch(ins, outs, p, c):
        wrap(_solver_update_kernel)[c.grid](
            *ins, outs[0], outs[1], outs[-1], rows, row_index, rows if cfg_factor is None else cfg_factor,
            rows if thresh is None else thresh, row_index if seed is None else seed,
            *_stride_args(p, len(outs) == 3, noise_mode == 2), p.n, rows.shape[0], p.sizes[1], p.sizes[2], c.n_chunks,
            float(guidance_scale), HAS_COND=model_cond is not None, HAS_CFG=cfg_factor is not None,
            HAS_THRESH=thresh is not None, HAS_H1=h1 is not None, HAS_H2=h2 is not None, HAS_H3=h3 is not None,
            HAS_LAST=last_sample is not None, NOISE=noise_mode, FLAT=p.flat, BLOCK=c.block, IDX64=c.idx64,
            CDT=tl_dtype(rows.dtype), NOISE_BLOCKS=noise_mode == 2 and philox_blocks_whole(p), num_warps=c.warps)

    run(inputs, outputs, launch, logical=noise_mode == 2)
    return x_prev


def _stride_args(p, has_last: bool, drawn: bool) -> tuple:
    """The kernel's stride arguments for plan p: the 8 inputs', x_prev's, m_out's, last_sample's written (x_prev's
    when absent: never used), then the row-major set (x's when no noise is drawn: never used); flat. Kept on the
    plan (cached by _layout per operand layout), one tuple per (has_last, drawn)."""
    cached = p.__dict__.setdefault("_solver_stride_args", {})
    args = cached.get((has_last, drawn))
    if args is None:
        sets = (*p.strides[:10], p.strides[10] if has_last else p.strides[8],
                p.strides[-1] if drawn else p.strides[0])
        args = cached[(has_last, drawn)] = tuple(s for st in sets for s in st)
    return args


def _solver_update_fake(x, *rest):
    return torch.empty_like(x)


@define("solver_update", _solver_update_fake, mutates_args=("last_sample", "m_out"))
def solver_update_op(x: torch.Tensor, model_output: torch.Tensor, model_cond: Optional[torch.Tensor],
                     rows: torch.Tensor, row_index: torch.Tensor, guidance_scale: float,
                     cfg_factor: Optional[torch.Tensor], thresh: Optional[torch.Tensor], h1: Optional[torch.Tensor],
                     h2: Optional[torch.Tensor], h3: Optional[torch.Tensor], last_sample: Optional[torch.Tensor],
                     noise: Optional[torch.Tensor], seed: Optional[torch.Tensor], m_out: torch.Tensor) -> torch.Tensor:
    """x_prev of one multistep sampler step; writes m_out and last_sample (when given) in place."""
    return _solver_update(wrap_triton, x, model_output, model_cond, rows, row_index, guidance_scale, cfg_factor,
                          thresh, h1, h2, h3, last_sample, noise, seed, m_out)


# -- backend function ---------------------------------------------------------------------------
def solver_update(x, model_output, rows, row_index, m_out, *, model_cond=None, guidance_scale=1.0, cfg_factor=None,
                  thresh=None, history=(None, None, None), last_sample=None, noise=None, draw_noise=False,
                  generator=None, seed=None):
    """x_prev [B, ...] in x's dtype; m = the converted model output written into m_out [B, ...] and, when
    last_sample is given, UniPC's corrected sample into it (both dtype S = rows' dtype). rows [R, 14] (COLUMNS),
    row_index int64 [B]; cfg_factor, thresh [B] (S); history (h1, h2, h3), each [B, ...] (S) or None. Noise: the
    tensor, else with draw_noise Philox in-kernel from seed / generator (no host sync), else none."""
    h1, h2, h3 = history
    tensors = (x, model_output, model_cond, rows, row_index, cfg_factor, thresh, h1, h2, h3, last_sample, noise, m_out)
    seed_key = None
    if draw_noise and noise is None:
        check_device(x)  # before the draw: no generator state used by a call that raises
        seed_key = seed_tensor(seed, generator, x.device)
    args = (x, model_output, model_cond, rows, row_index, float(guidance_scale), cfg_factor, thresh, h1, h2, h3,
            last_sample, noise, seed_key, m_out)
    return call(solver_update_op, _solver_update, None, args, (*tensors, seed_key))
