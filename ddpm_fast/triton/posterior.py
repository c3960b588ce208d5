"""The posterior and elementwise helpers: q_posterior, predict_xstart, normal_kl,
discretized_gaussian_log_likelihood -- each one forward and one backward pass.

q_posterior: reads x0, x_t; writes mean, and per-sample variance / clipped log variance [B, 1, ...].
predict_xstart: reads model_output, x_t; writes x0 (unclipped).
normal_kl / discretized_gaussian_log_likelihood: broadcasting elementwise maps (broadcast operands
are read through zero strides, never materialised); their backward sums gradients of broadcast
operands down to the operand's shape with torch (an extra reduction only for broadcast operands).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _math as M
from ._dispatch import autograd_function, call, define, wrap_triton
from ._layout import run
from ._runtime import MEAN_IDS, compute_dtype, table, tl_dtype
from ..ops._checks import broadcast_shape
from ..schedule import COLUMN
from .noising import linear2_autograd


# -- kernels -----------------------------------------------------------------------------------
@triton.jit
def _q_posterior_kernel(x0_ptr, xt_ptr, mean_ptr, var_ptr, logvar_ptr, t_ptr, table_ptr,
                        a_sb, a_s1, a_s2, a_s3, x_sb, x_s1, x_s2, x_s3, o_sb, o_s1, o_s2, o_s3,
                        N, T, D2, D3, n_chunks, FLAT: tl.constexpr, BLOCK: tl.constexpr, IDX64: tl.constexpr,
                        CDT: tl.constexpr):
    b, chunk, n, m, t = M._program_block_t(t_ptr, T, N, n_chunks, BLOCK, IDX64)
    x0 = M._load(x0_ptr, b, n, m, a_sb, a_s1, a_s2, a_s3, D2, D3, FLAT, CDT)
    xt = M._load(xt_ptr, b, n, m, x_sb, x_s1, x_s2, x_s3, D2, D3, FLAT, CDT)
    tl.store(mean_ptr + M._offsets(b, n, o_sb, o_s1, o_s2, o_s3, D2, D3, FLAT), M.posterior_mean(x0, xt, table_ptr, t),
             mask=m)
    if chunk == 0:
        tl.store(var_ptr + b, M._col(table_ptr, t, M.POST_VAR))
        tl.store(logvar_ptr + b, M._col(table_ptr, t, M.POST_LOGVAR))


@triton.jit
def _predict_kernel(mo_ptr, xt_ptr, out_ptr, t_ptr, table_ptr,
                    m_sb, m_s1, m_s2, m_s3, x_sb, x_s1, x_s2, x_s3, o_sb, o_s1, o_s2, o_s3,
                    N, T, D2, D3, n_chunks, MEAN: tl.constexpr, FLAT: tl.constexpr, BLOCK: tl.constexpr,
                    IDX64: tl.constexpr, CDT: tl.constexpr):
    b, chunk, n, m, t = M._program_block_t(t_ptr, T, N, n_chunks, BLOCK, IDX64)
    out = M._load(mo_ptr, b, n, m, m_sb, m_s1, m_s2, m_s3, D2, D3, FLAT, CDT)
    xt = M._load(xt_ptr, b, n, m, x_sb, x_s1, x_s2, x_s3, D2, D3, FLAT, CDT)
    tl.store(out_ptr + M._offsets(b, n, o_sb, o_s1, o_s2, o_s3, D2, D3, FLAT),
             M.predict_xstart(out, xt, table_ptr, t, MEAN), mask=m)


@triton.jit
def _normal_kl_kernel(m1_ptr, l1_ptr, m2_ptr, l2_ptr, g_ptr, out_ptr, g2_ptr, g3_ptr, g4_ptr,
                      a_sb, a_s1, a_s2, a_s3, b_sb, b_s1, b_s2, b_s3, c_sb, c_s1, c_s2, c_s3,
                      d_sb, d_s1, d_s2, d_s3, g_sb, g_s1, g_s2, g_s3, o_sb, o_s1, o_s2, o_s3,
                      N, D2, D3, n_chunks, GRAD: tl.constexpr, FLAT: tl.constexpr, BLOCK: tl.constexpr,
                      IDX64: tl.constexpr, CDT: tl.constexpr):
    """The KL into out; with GRAD, g times its gradients in the four operands into out, g2, g3, g4 (which share
    out's layout), all at the broadcast shape (g_ptr is not read without GRAD)."""
    b, chunk, n, m = M._program_block(N, n_chunks, BLOCK, IDX64)
    m1 = M._load(m1_ptr, b, n, m, a_sb, a_s1, a_s2, a_s3, D2, D3, FLAT, CDT)
    l1 = M._load(l1_ptr, b, n, m, b_sb, b_s1, b_s2, b_s3, D2, D3, FLAT, CDT)
    m2 = M._load(m2_ptr, b, n, m, c_sb, c_s1, c_s2, c_s3, D2, D3, FLAT, CDT)
    l2 = M._load(l2_ptr, b, n, m, d_sb, d_s1, d_s2, d_s3, D2, D3, FLAT, CDT)
    o = M._offsets(b, n, o_sb, o_s1, o_s2, o_s3, D2, D3, FLAT)
    if GRAD:
        g = M._load(g_ptr, b, n, m, g_sb, g_s1, g_s2, g_s3, D2, D3, FLAT, CDT)
        d1, d2, d3, d4 = M.normal_kl_grad(m1, l1, m2, l2)
        tl.store(out_ptr + o, g * d1, mask=m)
        tl.store(g2_ptr + o, g * d2, mask=m)
        tl.store(g3_ptr + o, g * d3, mask=m)
        tl.store(g4_ptr + o, g * d4, mask=m)
    else:
        tl.store(out_ptr + o, M.normal_kl(m1, l1, m2, l2), mask=m)


@triton.jit
def _dgll_kernel(x_ptr, mu_ptr, ls_ptr, g_ptr, out_ptr, gls_ptr,
                 a_sb, a_s1, a_s2, a_s3, b_sb, b_s1, b_s2, b_s3, c_sb, c_s1, c_s2, c_s3,
                 g_sb, g_s1, g_s2, g_s3, o_sb, o_s1, o_s2, o_s3,
                 N, D2, D3, n_chunks, GRAD: tl.constexpr, FLAT: tl.constexpr, BLOCK: tl.constexpr,
                 IDX64: tl.constexpr, CDT: tl.constexpr):
    """The log-likelihood into out; with GRAD, g times its gradients in means and log_scales into out and
    gls (which share out's layout) (g_ptr is not read without GRAD)."""
    b, chunk, n, m = M._program_block(N, n_chunks, BLOCK, IDX64)
    x = M._load(x_ptr, b, n, m, a_sb, a_s1, a_s2, a_s3, D2, D3, FLAT, CDT)
    mu = M._load(mu_ptr, b, n, m, b_sb, b_s1, b_s2, b_s3, D2, D3, FLAT, CDT)
    ls = M._load(ls_ptr, b, n, m, c_sb, c_s1, c_s2, c_s3, D2, D3, FLAT, CDT)
    o = M._offsets(b, n, o_sb, o_s1, o_s2, o_s3, D2, D3, FLAT)
    if GRAD:
        g = M._load(g_ptr, b, n, m, g_sb, g_s1, g_s2, g_s3, D2, D3, FLAT, CDT)
        dmu, dls = M._discretized_gaussian_loglik_grads(x, mu, ls)
        tl.store(out_ptr + o, g * dmu, mask=m)
        tl.store(gls_ptr + o, g * dls, mask=m)
    else:
        tl.store(out_ptr + o, M.discretized_gaussian_loglik(x, mu, ls), mask=m)


def _kw(p, c):
    """The launch keyword arguments shared by the elementwise kernels: plan p, launch config c."""
    return dict(n_chunks=c.n_chunks, FLAT=p.flat, BLOCK=c.block, IDX64=c.idx64, num_warps=c.warps)


def _batched(shape):
    """Elementwise ops see a broadcast shape as [B, ...]; a 0-dim shape as [1]."""
    return tuple(shape) if len(shape) else (1,)


def _per_sample_shape(x):
    return (x.shape[0],) + (1,) * (x.ndim - 1)


def _out_dtype(*args):
    """The promoted dtype of the operands (float32 if any is not floating point)."""
    if not all(a.is_floating_point() for a in args):
        return torch.float32
    return functools.reduce(torch.promote_types, [a.dtype for a in args])


def _broadcast_shape(*shapes):
    """torch.broadcast_shapes: ddpm_fast.ops._checks' broadcast_shape for plain int sizes that broadcast (~20x
    cheaper), torch's for symbolic ones (tracing) and to raise its error for shapes that do not."""
    for shape in shapes:
        for size in shape:
            if type(size) is not int:
                return torch.broadcast_shapes(*shapes)
    out = broadcast_shape(*shapes)
    return torch.Size(out) if out is not None else torch.broadcast_shapes(*shapes)


# -- launchers (see _dispatch: wrap is wrap_triton in the library ops, direct in eager) -------------------
def _q_posterior(wrap, x0, x_t, t, table_):
    """(mean like x0, variance [B, 1, ...], clipped log variance [B, 1, ...])."""
    mean = torch.empty_like(x0)
    var = x0.new_empty(_per_sample_shape(x0))
    logvar = x0.new_empty(_per_sample_shape(x0))
    if x0.numel():
        def launch(ins, outs, p, c):
            wrap(_q_posterior_kernel)[c.grid](*ins, outs[0], var, logvar, t, table_, *p.args, p.n, table_.shape[0],
                                              p.sizes[1], p.sizes[2], CDT=tl_dtype(table_.dtype), **_kw(p, c))

        run((x0, x_t), (mean,), launch, like=0)
    return mean, var, logvar


def _predict_xstart(wrap, model_output, x_t, t, table_, mean_type):
    """x0 implied by the model output (unclipped), like x_t."""
    out = torch.empty_like(x_t)
    if out.numel():
        def launch(ins, outs, p, c):
            wrap(_predict_kernel)[c.grid](*ins, *outs, t, table_, *p.args, p.n, table_.shape[0], p.sizes[1],
                                          p.sizes[2], MEAN=mean_type, CDT=tl_dtype(table_.dtype), **_kw(p, c))

        run((model_output, x_t), (out,), launch, like=1)
    return out


def _normal_kl(wrap, mean1, logvar1, mean2, logvar2):
    """KL in nats at the broadcast shape, in the promoted dtype."""
    args = (mean1, logvar1, mean2, logvar2)
    shape = _broadcast_shape(*[a.shape for a in args])
    out = torch.empty(shape, dtype=_out_dtype(*args), device=mean1.device)
    if out.numel():
        bs = _batched(shape)

        def launch(ins, outs, p, c):  # no gradient: out stands in for the unused pointers, zeros for g's strides
            wrap(_normal_kl_kernel)[c.grid](*ins, *outs * 5, *p.args[:16], 0, 0, 0, 0, *p.args[16:], p.n, p.sizes[1],
                                            p.sizes[2], GRAD=False, CDT=tl_dtype(compute_dtype(*args)), **_kw(p, c))

        run(args, (out,), launch, shape=bs)  # broadcast operands addressed with zero strides (_layout.plan)
    return out


def _normal_kl_backward(wrap, grad, mean1, logvar1, mean2, logvar2):
    """Gradients of the four operands at the broadcast shape, in the compute dtype."""
    args = (mean1, logvar1, mean2, logvar2)
    shape = grad.shape
    cdt = compute_dtype(*args)
    outs = [torch.empty(shape, dtype=cdt, device=grad.device) for _ in args]
    if grad.numel():
        bs = _batched(shape)

        def launch(ins, o, p, c):
            # the four outputs share one layout: pass the first one's strides once
            wrap(_normal_kl_kernel)[c.grid](*ins, *o, *p.args[:24], p.n, p.sizes[1], p.sizes[2], GRAD=True,
                                            CDT=tl_dtype(cdt), **_kw(p, c))

        run((*args, grad), outs, launch, shape=bs)
    return outs


def _dgll(wrap, x, means, log_scales):
    """log-likelihood in nats, x's shape (log_scales broadcast)."""
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, means.dtype), device=x.device)
    if out.numel():
        bs = _batched(x.shape)

        def launch(ins, outs, p, c):  # no gradient: out stands in for the unused pointers, zeros for g's strides
            wrap(_dgll_kernel)[c.grid](*ins, *outs * 3, *p.args[:12], 0, 0, 0, 0, *p.args[12:], p.n, p.sizes[1],
                                       p.sizes[2], GRAD=False, CDT=tl_dtype(compute_dtype(x, means, log_scales)),
                                       **_kw(p, c))

        run((x, means, log_scales), (out,), launch, shape=bs)
    return out


def _dgll_backward(wrap, grad, x, means, log_scales):
    """(grad of means, grad of log_scales) at x's shape, in the compute dtype."""
    cdt = compute_dtype(x, means, log_scales)
    gmu = torch.empty(x.shape, dtype=cdt, device=x.device)
    gls = torch.empty(x.shape, dtype=cdt, device=x.device)
    if x.numel():
        bs = _batched(x.shape)

        def launch(ins, o, p, c):  # the two outputs share one layout: the first one's strides once
            wrap(_dgll_kernel)[c.grid](*ins, *o, *p.args[:20], p.n, p.sizes[1], p.sizes[2], GRAD=True,
                                       CDT=tl_dtype(cdt), **_kw(p, c))

        run((x, means, log_scales, grad), (gmu, gls), launch, shape=bs)
    return gmu, gls


# -- library ops and autograd -------------------------------------------------------------------
def _reduce_to(g, like):
    return g.sum_to_size(like.shape).to(like.dtype) if g.shape != like.shape else g.to(like.dtype)


@define("q_posterior", lambda x0, x_t, t, table_: (torch.empty_like(x0), x0.new_empty(_per_sample_shape(x0)),
                                                       x0.new_empty(_per_sample_shape(x0))))
def q_posterior_op(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                   table_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _q_posterior(wrap_triton, x0, x_t, t, table_)


_QPosterior = linear2_autograd("QPosterior", q_posterior_op, _q_posterior, a_at=0, b_at=1, t_at=2,
                               column_a=COLUMN["posterior_mean_coef1"], column_b=COLUMN["posterior_mean_coef2"])


@define("predict_xstart", lambda model_output, x_t, t, table_, mean_type: torch.empty_like(x_t))
def predict_xstart_op(model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, table_: torch.Tensor,
                      mean_type: int) -> torch.Tensor:
    return _predict_xstart(wrap_triton, model_output, x_t, t, table_, mean_type)


_PredictXstart = linear2_autograd("PredictXstart", predict_xstart_op, _predict_xstart, a_at=0, b_at=1, t_at=2)


def _normal_kl_fake(mean1, logvar1, mean2, logvar2):
    args = (mean1, logvar1, mean2, logvar2)
    return mean1.new_empty(torch.broadcast_shapes(*[a.shape for a in args]), dtype=_out_dtype(*args))


@define("normal_kl", _normal_kl_fake)
def normal_kl_op(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
                 logvar2: torch.Tensor) -> torch.Tensor:
    return _normal_kl(wrap_triton, mean1, logvar1, mean2, logvar2)


@define("normal_kl_backward", lambda grad, mean1, logvar1, mean2, logvar2: [
    grad.new_empty(grad.shape, dtype=compute_dtype(mean1, logvar1, mean2, logvar2)) for _ in range(4)])
def normal_kl_backward_op(grad: torch.Tensor, mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
                          logvar2: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of the four operands at the broadcast shape, in the compute dtype."""
    return _normal_kl_backward(wrap_triton, grad, mean1, logvar1, mean2, logvar2)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _kl_bwd(ctx, grad):
    args = (grad, *ctx.saved_tensors)
    grads = call(normal_kl_backward_op, _normal_kl_backward, None, args, args, inner=True)
    return tuple(_reduce_to(g, a) if need else None for g, a, need in zip(grads, args[1:], ctx.needs_input_grad))


normal_kl_op.register_autograd(_kl_bwd, setup_context=_save_inputs)
_NormalKl = autograd_function("NormalKl", _normal_kl, _save_inputs, _kl_bwd)


@define("discretized_gaussian_log_likelihood", lambda x, means, log_scales: x.new_empty(
    x.shape, dtype=torch.promote_types(x.dtype, means.dtype)))
def dgll_op(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    return _dgll(wrap_triton, x, means, log_scales)


def _dgll_backward_fake(grad, x, means, log_scales):
    cdt = compute_dtype(x, means, log_scales)
    return x.new_empty(x.shape, dtype=cdt), x.new_empty(x.shape, dtype=cdt)


@define("discretized_gaussian_log_likelihood_backward", _dgll_backward_fake)
def dgll_backward_op(grad: torch.Tensor, x: torch.Tensor, means: torch.Tensor,
                     log_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad of means, grad of log_scales) at x's shape, in the compute dtype."""
    return _dgll_backward(wrap_triton, grad, x, means, log_scales)


def _dgll_bwd(ctx, grad):
    x, means, log_scales = ctx.saved_tensors
    args = (grad, x, means, log_scales)
    gmu, gls = call(dgll_backward_op, _dgll_backward, None, args, args, inner=True)
    gx = (-gmu).to(x.dtype) if ctx.needs_input_grad[0] else None  # centred = x - means (piecewise in x)
    return gx, _reduce_to(gmu, means), _reduce_to(gls, log_scales)


dgll_op.register_autograd(_dgll_bwd, setup_context=_save_inputs)
_Dgll = autograd_function("Dgll", _dgll, _save_inputs, _dgll_bwd)


# -- backend functions -------------------------------------------------------------------------
def q_posterior(x0, x_t, t, schedule):
    """(mean [B, ...], variance [B, 1, ...], log_variance [B, 1, ...]) in x0's dtype."""
    args = (x0, x_t, t, table(schedule, x0.device, torch.float32))
    return call(q_posterior_op, _q_posterior, _QPosterior, args, args[:3], diff=(x0, x_t))


def predict_xstart(model_output, x_t, t, schedule, *, mean_type):
    """x0 from the model's mean output, unclipped, in x_t's dtype."""
    args = (model_output, x_t, t, table(schedule, x_t.device, torch.float32), MEAN_IDS[mean_type])
    return call(predict_xstart_op, _predict_xstart, _PredictXstart, args, args[:3], diff=(model_output, x_t))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL in nats at the broadcast shape."""
    args = (mean1, logvar1, mean2, logvar2)
    return call(normal_kl_op, _normal_kl, _NormalKl, args, args, diff=args)


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Elementwise log-likelihood in nats, x's shape."""
    args = (x, means, log_scales)
    return call(dgll_op, _dgll, _Dgll, args, args, diff=args)
