"""The variational bound and the training losses: ONE forward and ONE backward kernel for both.

Forward (grid: chunks of a sample x samples): per element, x_t (given, or q_sample(x0, noise) in-kernel),
the model's x0 / mean / log variance, the posterior, the KL (t > 0) or the decoder NLL (t = 0; a
per-sample branch, so only those samples compute it) and the squared error on the target; each
program writes its partial sums to a [B, 2, n_chunks] buffer. A finishing kernel (one program per
sample) sums them in a fixed order and applies the weighting: deterministic, batch-independent. A sample
that fits one program (n_chunks == 1) needs neither: the forward kernel applies the weighting to its own
sums (FINISH; the same values, one launch and no buffer). Only the [B] terms the mode returns are written
(loss always; mse for mse losses unless it is the loss itself; vb for the vb, kl and hybrid losses): the
others are not allocated.
Backward: one pass recomputing what it needs from (model_output, x0, x_t or noise, t), writing the
gradient of model_output (both halves for a learned variance; under the hybrid loss the vb term sees
the mean half through a stop-gradient). Gradients flow to model_output only.
Modes: "vb" (vb_terms_bpd: x_t given), "mse", "rescaled_mse", "kl", "rescaled_kl" (training_losses).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _math as M
from . import _dispatch
from ._dispatch import PLAIN_TYPES, autograd_function, call, define, eager_mode, needs_grad, wrap_triton
from ._layout import PREPARED, LayoutError, current_device, keep_prepared, planned, run
from ..options import LOSS_TYPES, WEIGHTING_IDS, loss_terms
from ._runtime import LEARNED, MEAN_IDS, VAR_IDS, table, tl_dtype, var_offset
MODES = ("vb",) + LOSS_TYPES  # "vb": vb_terms_bpd (x_t given); a loss type: training_losses


@triton.jit
def _vb_fwd_kernel(mo_ptr, x0_ptr, xn_ptr, part_ptr, loss_ptr, mse_ptr, vb_ptr, t_ptr, table_ptr,
                   m_sb, m_s1, m_s2, m_s3, a_sb, a_s1, a_s2, a_s3, x_sb, x_s1, x_s2, x_s3,
                   N, T, D2, D3, n_chunks, var_offset, gamma, vb_scale, loss_scale,
                   MEAN: tl.constexpr, VAR: tl.constexpr, CLIP: tl.constexpr, FROM_NOISE: tl.constexpr,
                   DO_VB: tl.constexpr, DO_MSE: tl.constexpr, WEIGHTING: tl.constexpr, MSE_OUT: tl.constexpr,
                   FINISH: tl.constexpr, FLAT: tl.constexpr, BLOCK: tl.constexpr, IDX64: tl.constexpr,
                   CDT: tl.constexpr):
    """Sample b's sums of the vb term and the squared error over one chunk: to part_ptr's [B, 2, n_chunks], or with
    FINISH (n_chunks == 1: the chunk is the sample) its terms themselves (_math._finish_loss_terms)."""
    b, chunk, n, m, t = M._program_block_t(t_ptr, T, N, n_chunks, BLOCK, IDX64)
    out, x0, xn, xt = M._load_training_operands(mo_ptr, x0_ptr, xn_ptr, table_ptr, b, n, m, t, m_sb, m_s1, m_s2,
                                                m_s3, a_sb, a_s1, a_s2, a_s3, x_sb, x_s1, x_s2, x_s3, D2, D3,
                                                FROM_NOISE, FLAT, CDT)
    mse_part = tl.sum(tl.zeros([BLOCK], CDT), axis=0)
    vb_part = tl.sum(tl.zeros([BLOCK], CDT), axis=0)
    if DO_MSE:
        d = M.mean_target(x0, xt, xn, table_ptr, t, MEAN) - out
        mse_part = tl.sum(tl.where(m, d * d, 0.0), axis=0)
    if DO_VB:
        lv = M._load_model_log_variance(out, mo_ptr + var_offset, b, n, m, t, table_ptr, m_sb, m_s1, m_s2, m_s3, D2,
                                        D3, VAR, FLAT, CDT)
        mean, raw = M._model_mean(out, xt, table_ptr, t, MEAN, CLIP)
        if t > 0:
            term = M.normal_kl(M.posterior_mean(x0, xt, table_ptr, t), M._col(table_ptr, t, M.POST_LOGVAR), mean, lv)
        else:
            term = -M.discretized_gaussian_loglik(x0, mean, 0.5 * lv)
        vb_part = tl.sum(tl.where(m, term, 0.0), axis=0)
    if FINISH:
        M._finish_loss_terms(vb_part, mse_part, loss_ptr, mse_ptr, vb_ptr, b, t, table_ptr, N, gamma, vb_scale,
                             loss_scale, MEAN, VAR, WEIGHTING, DO_VB, DO_MSE, MSE_OUT)
    else:
        tl.store(part_ptr + (2 * b) * n_chunks + chunk, vb_part)
        tl.store(part_ptr + (2 * b + 1) * n_chunks + chunk, mse_part)


@triton.jit
def _vb_finish_kernel(part_ptr, loss_ptr, mse_ptr, vb_ptr, t_ptr, table_ptr, n_chunks, N, T, gamma, vb_scale,
                      loss_scale, MEAN: tl.constexpr, VAR: tl.constexpr, WEIGHTING: tl.constexpr,
                      DO_VB: tl.constexpr, DO_MSE: tl.constexpr, MSE_OUT: tl.constexpr, CBLOCK: tl.constexpr):
    """One program per sample: the fixed-order sums of its partials [B, 2, n_chunks], then
    _math._finish_loss_terms."""
    b = tl.program_id(0).to(tl.int64)
    t = M._load_t(t_ptr, b, T)
    M._finish_loss_terms(M._row_sum(part_ptr, 2 * b, n_chunks, CBLOCK),
                         M._row_sum(part_ptr, 2 * b + 1, n_chunks, CBLOCK), loss_ptr, mse_ptr, vb_ptr, b, t,
                         table_ptr, N, gamma, vb_scale, loss_scale, MEAN, VAR, WEIGHTING, DO_VB, DO_MSE, MSE_OUT)


@triton.jit
def _vb_bwd_kernel(gl_ptr, gm_ptr, gv_ptr, mo_ptr, x0_ptr, xn_ptr, gmo_ptr, t_ptr, table_ptr,
                   m_sb, m_s1, m_s2, m_s3, a_sb, a_s1, a_s2, a_s3, x_sb, x_s1, x_s2, x_s3, g_sb, g_s1, g_s2, g_s3,
                   N, T, D2, D3, n_chunks, var_offset, grad_var_offset, g_loss_stride, g_mse_stride, g_vb_stride,
                   gamma, vb_scale, loss_scale, MEAN: tl.constexpr, VAR: tl.constexpr, CLIP: tl.constexpr,
                   FROM_NOISE: tl.constexpr, DO_VB: tl.constexpr, DO_MSE: tl.constexpr, VB_MEAN_GRAD: tl.constexpr,
                   WEIGHTING: tl.constexpr, G_LOSS: tl.constexpr, G_MSE: tl.constexpr, G_VB: tl.constexpr,
                   FLAT: tl.constexpr, BLOCK: tl.constexpr, IDX64: tl.constexpr, CDT: tl.constexpr):
    """The gradient of sum_b(g_loss[b] loss[b] + g_mse[b] mse[b] + g_vb[b] vb[b]) w.r.t. the model output, both
    halves for a learned variance (the variance half at var_offset / grad_var_offset elements from the mean half,
    with its strides). A per-sample gradient absent (G_LOSS / G_MSE / G_VB false) is zero and not read; g_*_stride:
    their strides (0 for a gradient expanded from a scalar)."""
    b, chunk, n, m, t = M._program_block_t(t_ptr, T, N, n_chunks, BLOCK, IDX64)
    g_loss = 0.0
    if G_LOSS:
        g_loss = tl.load(gl_ptr + b * g_loss_stride).to(CDT)
    out, x0, xn, xt = M._load_training_operands(mo_ptr, x0_ptr, xn_ptr, table_ptr, b, n, m, t, m_sb, m_s1, m_s2,
                                                m_s3, a_sb, a_s1, a_s2, a_s3, x_sb, x_s1, x_s2, x_s3, D2, D3,
                                                FROM_NOISE, FLAT, CDT)
    g_out = tl.zeros([BLOCK], CDT)
    if DO_MSE:
        w = M.loss_weight(table_ptr, t, gamma, MEAN, VAR, WEIGHTING)
        coef = g_loss * w
        if G_MSE:
            coef += tl.load(gm_ptr + b * g_mse_stride).to(CDT)
        coef = coef * 2.0 / N
        g_out = coef * (out - M.mean_target(x0, xt, xn, table_ptr, t, MEAN))
    if DO_VB:
        G = g_loss * loss_scale
        if G_VB:
            G += tl.load(gv_ptr + b * g_vb_stride).to(CDT)
        G = G * vb_scale / N / 0.6931471805599453
        lv = M._load_model_log_variance(out, mo_ptr + var_offset, b, n, m, t, table_ptr, m_sb, m_s1, m_s2, m_s3, D2,
                                        D3, VAR, FLAT, CDT)
        mean, raw = M._model_mean(out, xt, table_ptr, t, MEAN, CLIP)
        if t > 0:
            post_logvar = M._col(table_ptr, t, M.POST_LOGVAR)
            _kl, dm, dlv = M.normal_kl_given_exps(M.posterior_mean(x0, xt, table_ptr, t), post_logvar, mean, lv,
                                                  tl.exp(post_logvar - lv), tl.exp(-lv))
        else:
            dmu, dls = M._discretized_gaussian_loglik_grads(x0, mean, 0.5 * lv)
            dm = -dmu
            dlv = -0.5 * dls
        if VB_MEAN_GRAD:
            g_mean = G * dm * M.mean_grad_coef(table_ptr, t, MEAN)
            if MEAN != 2:
                if CLIP:  # the clip passes no gradient outside [-1, 1]
                    g_mean = tl.where((raw >= -1.0) & (raw <= 1.0), g_mean, 0.0)
            g_out += g_mean
        if VAR >= 2:
            tl.store(gmo_ptr + grad_var_offset + M._offsets(b, n, g_sb, g_s1, g_s2, g_s3, D2, D3, FLAT),
                     G * dlv * M._dlogvar_dv(table_ptr, t, VAR), mask=m)
    tl.store(gmo_ptr + M._offsets(b, n, g_sb, g_s1, g_s2, g_s3, D2, D3, FLAT), g_out, mask=m)


# -- launch configuration --------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per option set (_flags)
class _Flags:
    """What the loss launches take from their options alone, made once per combination (_flags): the terms the
    mode computes, and runs of each kernel's arguments in its signature's order (the launchers pass constexprs by
    position, like the other arguments: a keyword dict per launch costs more than all its positional arguments).
    scales: (vb_scale, loss_scale): vb output = vb term * vb_scale; loss = weighted mse + vb output (hybrid) or
    vb output * loss_scale."""

    do_mse: bool
    do_vb: bool
    mse_out: bool  # an mse term that is not the loss itself (that is 1 * mse without a vb term or a weighting)
    cdt: object  # CDT: the Triton compute dtype of the table's dtype
    scales: tuple
    fwd_args: tuple  # _vb_fwd_kernel's arguments after gamma up to FINISH: the scales, MEAN, VAR, CLIP, FROM_NOISE,
    #                  DO_VB, DO_MSE, WEIGHTING, MSE_OUT
    finish_args: tuple  # _vb_finish_kernel's arguments after gamma: the scales, MEAN, VAR, WEIGHTING, DO_VB, DO_MSE,
    #                     MSE_OUT, CBLOCK
    bwd_options: tuple  # _vb_bwd_kernel's MEAN, VAR, CLIP, FROM_NOISE, DO_VB, DO_MSE, VB_MEAN_GRAD, WEIGHTING


@functools.lru_cache(maxsize=256)
def _flags(mode: str, mean_type: int, var_type: int, clip: bool, num_timesteps: int, weighting: int,
           dtype: torch.dtype) -> _Flags:
    """The _Flags of a loss mode, its options and the table's dtype; ValueError for an unknown mode or
    weighting id (not cached: raised on every such call)."""
    if mode not in MODES:
        raise ValueError(f"mode: unknown {mode!r}; expected one of {MODES}")
    if weighting not in (0, 1, 2):
        raise ValueError(f"weighting: unknown id {weighting!r}")
    do_mse = mode in ("mse", "rescaled_mse")
    do_vb = (not do_mse) or var_type in LEARNED
    from_noise = mode != "vb"
    scales = (num_timesteps / 1000.0 if mode == "rescaled_mse" else 1.0,
              float(num_timesteps) if mode == "rescaled_kl" else 1.0)
    mse_out = do_mse and (do_vb or weighting != WEIGHTING_IDS["simple"])  # (the simple weight: exactly 1)
    return _Flags(
        do_mse=do_mse,
        do_vb=do_vb,
        mse_out=mse_out,
        cdt=tl_dtype(dtype),
        scales=scales,
        fwd_args=(*scales, mean_type, var_type, clip, from_noise, do_vb, do_mse, weighting, mse_out),
        finish_args=(*scales, mean_type, var_type, weighting, do_vb, do_mse, mse_out, 64),  # CBLOCK 64
        bwd_options=(mean_type, var_type, clip, from_noise, do_vb, do_mse, not do_mse, weighting),
    )


# -- launchers (see _dispatch: wrap is wrap_triton in the library ops, direct in eager) -------------------
def _vb_losses(wrap, model_output, x0, xn, t, table_, mean_type, var_type, mode, clip, weighting, min_snr_gamma):
    """(loss, mse, vb), each [B] in the table's dtype, or None where the mode has no such term (mse without a
    learned variance: no vb; vb and kl modes: no mse) and for an mse that is the loss itself (_Flags.mse_out
    false: the caller returns the loss tensor as mse). xn is x_t for mode "vb", else the noise."""
    shape = x0.shape
    B, T = shape[0], int(table_.shape[0])  # T specialised: a schedule has one table
    f = _flags(mode, mean_type, var_type, clip, T, weighting, table_.dtype)
    loss, mse, vb = _loss_outputs(table_, B, f)
    if B == 0 or x0.numel() == 0:
        return tuple(None if o is None else o.fill_(float("nan")) for o in (loss, mse, vb))
    run((model_output, x0, xn), (), _launch_losses, shape=shape,
        args=(wrap, t, table_, B, T, var_type, f, loss, mse, vb, min_snr_gamma))
    return loss, mse, vb


def _loss_outputs(table_, B, f):
    """(loss, mse, vb) [B] in the table's dtype on its device (no kwargs to parse), None where the options (f)
    make no such term."""
    return table_.new_empty(B), table_.new_empty(B) if f.mse_out else None, table_.new_empty(B) if f.do_vb else None


def _launch_losses(ins, _, p, c, wrap, t, table_, B, T, var_type, f, loss, mse, vb, min_snr_gamma):
    """_vb_losses' launches on plan p and config c: one program per sample (n_chunks 1), the forward kernel
    writing the terms itself; else its partial sums, then the finishing kernel. loss stands in for the pointer of
    an absent term (not written) and of the partial sums where there are none (not read)."""
    mse_ptr, vb_ptr = loss if mse is None else mse, loss if vb is None else vb
    finish = c.n_chunks == 1
    part = loss if finish else table_.new_empty(2 * B * c.n_chunks)  # [B, 2, n_chunks] partial sums, flat
    key = (_vb_fwd_kernel, id(table_), f, var_type, min_snr_gamma)  # (f: one object per option set, _flags)
    tail = c.tails.get(key)
    if tail is None:
        tail = c.tails[key] = _losses_tail(p, c, table_, T, var_offset(ins[0], var_type), min_snr_gamma, f)
    wrap(_vb_fwd_kernel)[c.grid](*ins, part, loss, mse_ptr, vb_ptr, t, *tail, num_warps=c.warps)
    if not finish:
        wrap(_vb_finish_kernel)[(B,)](part, loss, mse_ptr, vb_ptr, t, table_, c.n_chunks, p.n, T, min_snr_gamma,
                                      *f.finish_args)


def _losses_tail(p, c, table_, T, var_offset_, min_snr_gamma, f) -> tuple:
    """_vb_fwd_kernel's arguments after t on plan p and config c (FINISH: c.n_chunks == 1)."""
    return (table_, *p.args, p.n, T, p.sizes[1], p.sizes[2], c.n_chunks, var_offset_, min_snr_gamma,
            *f.fwd_args, c.n_chunks == 1, p.flat, c.block, c.idx64, f.cdt)  # fwd_args' constexprs, FINISH, FLAT, ...


def bwd_warps(warps: int, do_vb: bool) -> int:
    """num_warps of the backward kernel: twice the elementwise default when the vb term is live. It keeps
    about 15 values per element alive; at BLOCK 1024 and 4 warps (8 elements a thread) that is 128 registers and
    25% occupancy on sm_90, at 8 warps 63 registers and 50%, with the same 128-bit accesses."""
    return 2 * warps if do_vb else warps


def _vb_losses_backward(wrap, g_loss, g_mse, g_vb, model_output, x0, xn, t, table_, mean_type, var_type, mode, clip,
                        weighting, min_snr_gamma):
    """Gradient of sum(g_loss * loss + g_mse * mse + g_vb * vb) with respect to model_output."""
    T = int(table_.shape[0])  # T specialised: a schedule has one table
    f = _flags(mode, mean_type, var_type, clip, T, weighting, table_.dtype)
    grad = torch.empty_like(model_output)
    if grad.numel() == 0:
        return grad
    run((model_output, x0, xn), (grad,), _launch_losses_backward, shape=x0.shape, like=0,
        args=(wrap, g_loss, g_mse, g_vb, t, table_, T, var_type, f, min_snr_gamma))
    return grad


def _launch_losses_backward(ins, outs, p, c, wrap, g_loss, g_mse, g_vb, t, table_, T, var_type, f, min_snr_gamma):
    """_vb_losses_backward's launch on plan p and config c."""
    mo = ins[0]  # stands in for an absent gradient's pointer (never read: G_* false), not a None argument
    key = (_vb_bwd_kernel, id(table_), f, var_type, min_snr_gamma, _stride0(g_loss), _stride0(g_mse), _stride0(g_vb),
           g_loss is not None, g_mse is not None, g_vb is not None)
    tail = c.tails.get(key)
    if tail is None:  # the arguments after t; the constexprs by position: bwd_options, G_LOSS, G_MSE, G_VB, FLAT, ...
        tail = c.tails[key] = (table_, *p.args, p.n, T, p.sizes[1], p.sizes[2], c.n_chunks, var_offset(mo, var_type),
                               var_offset(outs[0], var_type), *key[5:8], min_snr_gamma, *f.scales, *f.bwd_options,
                               *key[8:], p.flat, c.block, c.idx64, f.cdt)
    wrap(_vb_bwd_kernel)[c.grid](mo if g_loss is None else g_loss, mo if g_mse is None else g_mse,
                                 mo if g_vb is None else g_vb, *ins, *outs, t, *tail,
                                 num_warps=bwd_warps(c.warps, f.do_vb))


def _stride0(g) -> int:
    """The stride of a per-sample gradient [B] (0 when expanded from a scalar; 0 when absent: never read)."""
    return 0 if g is None else g.stride(0)


# -- library ops and autograd -------------------------------------------------------------------
@define("vb_losses", lambda model_output, x0, xn, t, table_, *flags: tuple(
    x0.new_empty((x0.shape[0],), dtype=table_.dtype) for _ in range(3)))
def vb_losses_op(model_output: torch.Tensor, x0: torch.Tensor, xn: torch.Tensor, t: torch.Tensor,
                 table_: torch.Tensor, mean_type: int, var_type: int, mode: str, clip: bool, weighting: int,
                 min_snr_gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mse, vb), each [B] in the table's dtype (zeros for a term the mode does not compute, a copy of the
    loss for an mse that is the loss itself: an op returns the tensors of its schema, none an alias of another).
    xn is x_t for mode "vb", else the noise."""
    loss, mse, vb = _vb_losses(wrap_triton, model_output, x0, xn, t, table_, mean_type, var_type, mode, clip,
                               weighting, min_snr_gamma)
    if mse is None:
        mse = loss.clone() if mode in ("mse", "rescaled_mse") else loss.new_zeros(loss.shape)
    return loss, mse, loss.new_zeros(loss.shape) if vb is None else vb


@define("vb_losses_backward", lambda g_loss, g_mse, g_vb, model_output, *rest: torch.empty_like(model_output))
def vb_losses_backward_op(g_loss: torch.Tensor | None, g_mse: torch.Tensor | None, g_vb: torch.Tensor | None,
                          model_output: torch.Tensor,
                          x0: torch.Tensor, xn: torch.Tensor, t: torch.Tensor, table_: torch.Tensor, mean_type: int,
                          var_type: int, mode: str, clip: bool, weighting: int,
                          min_snr_gamma: float) -> torch.Tensor:
    """Gradient of sum(g_loss * loss + g_mse * mse + g_vb * vb) with respect to model_output (an absent
    per-sample gradient: zero)."""
    return _vb_losses_backward(wrap_triton, g_loss, g_mse, g_vb, model_output, x0, xn, t, table_, mean_type,
                               var_type, mode, clip, weighting, min_snr_gamma)


def _setup(ctx, inputs, output):
    mo, x0, xn, t, table_, *flags = inputs
    ctx.flags = flags
    ctx.set_materialize_grads(False)  # a term not differentiated comes as None: the kernel skips it (no zeros made)
    ctx.save_for_backward(mo, x0, xn, t, table_)


def _backward(ctx, g_loss, g_mse, g_vb):
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:  # never silently drop a gradient
        raise NotImplementedError("ddpm_fast.triton's loss kernels differentiate w.r.t. model_output only; "
                                  "ddpm_fast.vb_terms_bpd / training_losses route such calls to the reference")
    tensors = (g_loss, g_mse, g_vb, *ctx.saved_tensors)  # the gradients as given: strided, or None (zero)
    grad = call(vb_losses_backward_op, _vb_losses_backward, None, (*tensors, *ctx.flags), tensors, inner=True)
    return (grad,) + (None,) * 10


vb_losses_op.register_autograd(_backward, setup_context=_setup)
_VbLosses = autograd_function("VbLosses", _vb_losses, _setup, _backward)


# -- backend functions (vb_losses by the cheapest route: _dispatch.call) ---------------------------------------
def vb_terms_bpd(model_output, x0, x_t, t, schedule, *, mean_type, var_type, clip_denoised=False):
    """[B] bits/dim (float32, float64 for float64 inputs)."""
    args = (model_output, x0, x_t, t, table(schedule, x0.device, torch.float32), MEAN_IDS[mean_type],
            VAR_IDS[var_type], "vb", bool(clip_denoised), 0, 5.0)
    return call(vb_losses_op, _vb_losses, _VbLosses, args, args[:4], diff=args[:3])[2]


def training_losses(model_output, x0, t, noise, schedule, *, mean_type, var_type, loss_type, weighting="simple",
                    min_snr_gamma=5.0):
    """dict of [B] tensors: loss, and mse (mse losses; the loss tensor itself where they are equal: a fixed
    variance and "simple" weighting) / vb (kl losses, or a learned variance). A call ddpm_fast.ops has bound takes
    _bind_losses' bound call instead."""
    args = (model_output, x0, noise, t, table(schedule, x0.device, torch.float32), MEAN_IDS[mean_type],
            VAR_IDS[var_type], loss_type, False, WEIGHTING_IDS[weighting], float(min_snr_gamma))
    loss, mse, vb = call(vb_losses_op, _vb_losses, _VbLosses, args, args[:4], diff=args[:3])
    return loss_terms(loss_type, var_type, loss, mse, vb)


def _bind_losses(model_output, x0, noise, schedule, *, mean_type, var_type, loss_type, weighting="simple",
                 min_snr_gamma=5.0):
    """training_losses bound to its arguments' metadata (ddpm_fast.ops._bound: a call with these options, schedule
    and tensor dtypes, devices, shapes and layouts passed the checks and ran here): ``bound(t, model_output, x0,
    noise)`` with t checked, giving the terms, or None where the call must take training_losses itself (not plain
    eager, a gradient w.r.t. x0 or noise, a CUDA device other than the current one); None where it cannot bind."""
    prepared = _prepared_losses(model_output, x0, noise, schedule, mean_type, var_type, loss_type, weighting,
                                min_snr_gamma)
    if prepared is None:
        return None

    def bound(t, model_output, x0, noise):
        if not eager_mode() or type(t) not in PLAIN_TYPES or not current_device(x0):
            return None
        grad = needs_grad((model_output, x0, noise))
        if grad and needs_grad((x0, noise)):
            return None
        if grad:  # (model_output's)
            loss, mse, vb = _terms_by_name(prepared.f, _PreparedLossesFunction.apply(model_output, x0, noise, t,
                                                                                       prepared))
        else:
            loss, mse, vb = _run_prepared_losses(prepared, model_output, x0, noise, t)
        return loss_terms(loss_type, var_type, loss, mse, vb)

    return bound


training_losses.bind = _bind_losses  # (read by ddpm_fast.ops.training_losses)


class _PreparedLosses(NamedTuple):
    """What training_losses' launches take besides the call's tensors, prepared once (_prepared_losses): the
    forward's plan and config (p, c), table, B, T, flags f, and the vb_losses arguments of the options."""

    p: object
    c: object
    table: torch.Tensor
    B: int
    T: int
    f: _Flags
    mean_id: int
    var_id: int
    mode: str
    weighting_id: int
    gamma: float
    tail: tuple  # the forward kernel's arguments after t (_losses_tail), for the one-launch case (c.n_chunks 1)


def _prepared_losses(model_output, x0, noise, schedule, mean_type, var_type, loss_type, weighting, min_snr_gamma):
    """training_losses' _PreparedLosses on these operands, prepared once per schedule, options and layouts
    (_layout.keep_prepared); None where the call takes _vb_losses (no elements, more than three unmergeable dims,
    a CUDA device other than the current one)."""
    key = (_vb_fwd_kernel, schedule, mean_type, var_type, loss_type, weighting, min_snr_gamma, x0.device,
           model_output.shape, x0.shape, noise.shape)
    if not (model_output.is_contiguous() and x0.is_contiguous() and noise.is_contiguous()):  # (_layout.plan_key)
        key += (model_output.stride(), x0.stride(), noise.stride())
    prepared = PREPARED.get(key)
    if prepared is None:
        shape = x0.shape
        if not x0.numel():
            return None
        try:
            p, c = planned((model_output, x0, noise), shape=shape)
        except LayoutError:
            return None
        table_ = table(schedule, x0.device, torch.float32)
        T, gamma = int(table_.shape[0]), float(min_snr_gamma)
        mean_id, var_id, weighting_id = MEAN_IDS[mean_type], VAR_IDS[var_type], WEIGHTING_IDS[weighting]
        f = _flags(loss_type, mean_id, var_id, False, T, weighting_id, table_.dtype)
        tail = _losses_tail(p, c, table_, T, var_offset(model_output, var_id), gamma, f)
        prepared = keep_prepared(key, _PreparedLosses(p, c, table_, shape[0], T, f, mean_id, var_id, loss_type,
                                                      weighting_id, gamma, tail))
    return prepared if current_device(x0) else None


def _run_prepared_losses(prepared, model_output, x0, xn, t):
    """(loss, mse, vb) of _vb_losses (None for a term not made), launched on a prepared plan."""
    p, c, table_, B, T, f, _, var_id, _, _, gamma, tail = prepared
    loss, mse, vb = _loss_outputs(table_, B, f)
    if c.n_chunks == 1:  # _launch_losses' one launch, its arguments prepared
        _dispatch.direct(_vb_fwd_kernel)[c.grid](model_output, x0, xn, loss, loss, loss if mse is None else mse,
                                                 loss if vb is None else vb, t, *tail, num_warps=c.warps)
    else:
        _launch_losses((model_output, x0, xn), (), p, c, _dispatch.direct, t, table_, B, T, var_id, f, loss, mse, vb,
                       gamma)
    return loss, mse, vb


def _terms_by_name(f, terms):
    """(loss, mse, vb) from the made terms in that order (a tuple; None for a term f does not make)."""
    return terms[0], terms[1] if f.mse_out else None, terms[-1] if f.do_vb else None


class _PreparedLossesFunction(torch.autograd.Function):
    """training_losses' autograd node on a prepared plan (plain eager; model_output requires grad, x0 and noise do
    not): forward as _run_prepared_losses, returning only the terms made (an output per term: none is None);
    backward the kernel _backward launches, the options taken from the prepared tuple."""

    @staticmethod
    def forward(ctx, model_output, x0, xn, t, prepared):
        ctx.set_materialize_grads(False)  # a term not differentiated comes as None: the kernel skips it
        ctx.save_for_backward(model_output, x0, xn, t)
        ctx.prepared = prepared
        return tuple(term for term in _run_prepared_losses(prepared, model_output, x0, xn, t) if term is not None)

    @staticmethod
    def backward(ctx, *grads):
        prepared = ctx.prepared
        g_loss, g_mse, g_vb = _terms_by_name(prepared.f, grads)
        mo, x0, xn, t = ctx.saved_tensors
        args = (g_loss, g_mse, g_vb, mo, x0, xn, t, prepared.table, prepared.mean_id, prepared.var_id, prepared.mode,
                False, prepared.weighting_id, prepared.gamma)
        grad = call(vb_losses_backward_op, _vb_losses_backward, None, args, args[:7], inner=True)
        return grad, None, None, None, None
