"""Forward noising: q_sample (forward and backward kernels), the v target velocity and the prior term prior_bpd.

q_sample: x_t = sqrt_abar_t x0 + sqrt_1m_abar_t noise, one pass (reads x0, noise; writes x_t); velocity:
v = sqrt_abar_t noise - sqrt_1m_abar_t x0, the same kernel (VELOCITY), no backward kernel.
Backward: one pass (reads grad; writes grad_x0, grad_noise).
prior_bpd: one pass over x0 to per-program partial sums [B, n_chunks], then a fixed-order sum.
"""
from __future__ import annotations

import functools
import math
import weakref

import torch
import triton
import triton.language as tl

from . import _math as M
from . import _dispatch
from ._dispatch import PLAIN_TYPES, autograd_function, call, define, eager_mode, needs_grad, wrap_triton
from ._layout import PREPARED, LayoutError, current_device, keep_prepared, planned, run
from ..schedule import COLUMN
from ._runtime import compute_dtype, table, tl_dtype


# -- kernels -----------------------------------------------------------------------------------
@triton.jit
def _q_sample_kernel(x0_ptr, nz_ptr, out_ptr, t_ptr, table_ptr,
                     a_sb, a_s1, a_s2, a_s3, n_sb, n_s1, n_s2, n_s3, o_sb, o_s1, o_s2, o_s3, N, T, D2, D3,
                     n_chunks, FLAT: tl.constexpr, BLOCK: tl.constexpr, IDX64: tl.constexpr, CDT: tl.constexpr,
                     VELOCITY: tl.constexpr = False):
    """x_t = q_sample(x0, noise), or with VELOCITY the v target mean_target(x0, ., noise) of mean type v."""
    b, chunk, n, m, t = M._program_block_t(t_ptr, T, N, n_chunks, BLOCK, IDX64)
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
                       FLAT: tl.constexpr, BLOCK: tl.constexpr, IDX64: tl.constexpr, CDT: tl.constexpr,
                       MEAN: tl.constexpr = -1):
    """Backward of y = coef_a(t) a + coef_b(t) b: grad_a = coef_a g, grad_b = coef_b g (one pass). The
    coefficients are the table columns CA and CB, or with MEAN >= 0 those of predict_xstart(a = model output,
    b = x_t) for that mean type."""
    b, chunk, n, m, t = M._program_block_t(t_ptr, T, N, n_chunks, BLOCK, IDX64)
    g = M._load(g_ptr, b, n, m, g_sb, g_s1, g_s2, g_s3, D2, D3, FLAT, CDT)
    if MEAN >= 0:
        coef_a = M._dxstart_dout(table_ptr, t, MEAN)
        coef_b = M._dxstart_dxt(table_ptr, t, MEAN)
    else:
        coef_a = M._col(table_ptr, t, CA)
        coef_b = M._col(table_ptr, t, CB)
    tl.store(gx_ptr + M._offsets(b, n, x_sb, x_s1, x_s2, x_s3, D2, D3, FLAT), coef_a * g, mask=m)
    tl.store(gn_ptr + M._offsets(b, n, n_sb, n_s1, n_s2, n_s3, D2, D3, FLAT), coef_b * g, mask=m)


@triton.jit
def _prior_kernel(x0_ptr, part_ptr, a_sb, a_s1, a_s2, a_s3, N, D2, D3, n_chunks, sqrt_abar, const,
                  FLAT: tl.constexpr, BLOCK: tl.constexpr, IDX64: tl.constexpr, CDT: tl.constexpr):
    """Partial sums of KL(N(sqrt_abar x0, 1 - abar) || N(0, 1)) = 0.5 (const + (sqrt_abar x0)^2), where the
    per-schedule constant const = -1 - log(1 - abar) + (1 - abar) is computed once in float64 on the host
    (it cancels catastrophically in float32 when abar_{T-1} is near 0)."""
    b, chunk, n, m = M._program_block(N, n_chunks, BLOCK, IDX64)
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
        wrap(_finish_mean_kernel)[(B,)](part, out, n_chunks, scale, 64)  # CBLOCK 64
    return out


# -- launchers (see _dispatch: wrap is wrap_triton in the library ops, direct in eager) -------------------
def _q_sample(wrap, x0, t, noise, table_, velocity=False):
    """x_t (velocity: v) [B, ...] like x0 (t: int64 [B]; table_: the packed schedule table in the compute dtype)."""
    out = torch.empty_like(x0)
    if out.numel():
        run((x0, noise), (out,), _launch_q_sample, like=0, args=(wrap, t, table_, velocity))
    return out


def _launch_q_sample(ins, outs, p, c, wrap, t, table_, velocity):
    """_q_sample's launch on plan p and config c."""
    key = (_q_sample_kernel, id(table_), velocity)  # (the tail holds table_: its id stays its own)
    tail = c.tails.get(key)
    if tail is None:
        tail = c.tails[key] = _q_sample_tail(p, c, table_, velocity)
    wrap(_q_sample_kernel)[c.grid](*ins, *outs, t, *tail, num_warps=c.warps)


def _q_sample_tail(p, c, table_, velocity) -> tuple:
    """_q_sample_kernel's arguments after t on plan p and config c."""
    return (table_, *p.args, p.n, table_.shape[0], p.sizes[1], p.sizes[2], c.n_chunks,  # then the constexprs
            p.flat, c.block, c.idx64, tl_dtype(table_.dtype), velocity)  # FLAT, BLOCK, IDX64, CDT, VELOCITY


def _linear2_backward(wrap, grad, t, table_, a_like, b_like, column_a, column_b, mean_type=-1):
    """(grad of a, grad of b) of y = coef_a(t) a + coef_b(t) b, laid out like a_like / b_like: the coefficients
    are the table columns column_a / column_b, or with mean_type >= 0 predict_xstart's (linear2_bwd_kernel)."""
    grad_a = torch.empty_like(a_like)
    grad_b = torch.empty_like(b_like)
    if grad.numel():
        run((grad,), (grad_a, grad_b), _launch_linear2_backward, args=(wrap, t, table_, column_a, column_b, mean_type))
    return grad_a, grad_b


def _launch_linear2_backward(ins, outs, p, c, wrap, t, table_, column_a, column_b, mean_type):
    """_linear2_backward's launch on plan p and config c (the arguments after t kept in c.tails)."""
    key = (linear2_bwd_kernel, id(table_), column_a, column_b, mean_type)
    tail = c.tails.get(key)
    if tail is None:  # the constexprs by position: CA, CB, FLAT, BLOCK, IDX64, CDT, MEAN
        tail = c.tails[key] = (table_, *p.args, p.n, table_.shape[0], p.sizes[1], p.sizes[2], c.n_chunks, column_a,
                               column_b, p.flat, c.block, c.idx64, tl_dtype(table_.dtype), mean_type)
    wrap(linear2_bwd_kernel)[c.grid](*ins, *outs, t, *tail, num_warps=c.warps)


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
                                    math.sqrt(abar_last), const, p.flat, c.block, c.idx64, tl_dtype(cdt),
                                    num_warps=c.warps)  # the constexprs by position: FLAT, BLOCK, IDX64, CDT
        result.append(finish_mean(wrap, part, 1.0 / (p.n * math.log(2.0))))

    run((x0,), (), launch)
    return result[0]


# -- library ops and autograd ---------------------------------------------------------------------
@define("q_sample", lambda x0, t, noise, table_: torch.empty_like(x0))
def q_sample_op(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, table_: torch.Tensor) -> torch.Tensor:
    return _q_sample(wrap_triton, x0, t, noise, table_)


@define("linear2_backward", lambda grad, t, table_, a_like, b_like, column_a, column_b, mean_type: (
    torch.empty_like(a_like), torch.empty_like(b_like)))
def linear2_backward_op(grad: torch.Tensor, t: torch.Tensor, table_: torch.Tensor, a_like: torch.Tensor,
                        b_like: torch.Tensor, column_a: int, column_b: int,
                        mean_type: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward of q_sample, q_posterior's mean and predict_xstart (_linear2_backward)."""
    return _linear2_backward(wrap_triton, grad, t, table_, a_like, b_like, column_a, column_b, mean_type)


def linear2_autograd(name, op, impl, a_at, b_at, t_at, column_a=0, column_b=0):
    """Register the autograd of ``op``, a map y = coef_a(t) a + coef_b(t) b of its inputs a = inputs[a_at],
    b = inputs[b_at] (t = inputs[t_at], the table inputs[3], predict_xstart's mean type inputs[4] if given; the
    coefficients as in _linear2_backward), and return the autograd.Function running ``impl`` with it."""
    def setup(ctx, inputs, output):
        if isinstance(output, tuple):  # q_posterior's variances: functions of t alone
            ctx.mark_non_differentiable(*output[1:])
        ctx.n_inputs = len(inputs)
        ctx.mean_type = inputs[4] if len(inputs) > 4 else -1
        ctx.save_for_backward(inputs[t_at], inputs[3], inputs[a_at], inputs[b_at])

    def backward(ctx, grad, *grads_of_other_outputs):
        t, table_, a, b = ctx.saved_tensors
        args = (grad, t, table_, a, b, column_a, column_b, ctx.mean_type)
        grads = [None] * ctx.n_inputs
        grads[a_at], grads[b_at] = call(linear2_backward_op, _linear2_backward, None, args, args[:5], inner=True)
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup)
    return autograd_function(name, impl, setup, backward)


_velocity = functools.partial(_q_sample, velocity=True)


@define("velocity", lambda x0, t, noise, table_: torch.empty_like(x0))
def velocity_op(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, table_: torch.Tensor) -> torch.Tensor:
    return _q_sample(wrap_triton, x0, t, noise, table_, True)


_QSample = linear2_autograd("QSample", q_sample_op, _q_sample, a_at=0, b_at=2, t_at=1,
                            column_a=COLUMN["sqrt_alphas_cumprod"], column_b=COLUMN["sqrt_one_minus_alphas_cumprod"])


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


_PRIOR_CONSTANTS = weakref.WeakKeyDictionary()  # schedule -> prior_constants(schedule) (a schedule is immutable)


def prior_constants(schedule) -> tuple:
    """(abar_{T-1}, -1 - log(1 - abar) + (1 - abar)) from the schedule's float64 CPU tables (no device read),
    computed once per schedule."""
    constants = _PRIOR_CONSTANTS.get(schedule)
    if constants is None:
        abar = float(schedule.alphas_cumprod.numpy()[-1])  # CPU float64 tables, read through numpy
        lv = float(schedule.log_one_minus_alphas_cumprod.numpy()[-1])
        constants = _PRIOR_CONSTANTS[schedule] = (abar, math.expm1(lv) - lv)
    return constants


# -- backend functions -------------------------------------------------------------------------
def q_sample(x0, t, noise, schedule):
    """x_t [B, ...] in x0's dtype (a call ddpm_fast.ops has bound takes _bind_q_sample's bound call instead)."""
    args = (x0, t, noise, table(schedule, x0.device, torch.float32))
    return call(q_sample_op, _q_sample, _QSample, args, args[:3], diff=(x0, noise))


def _bind_q_sample(x0, noise, schedule, velocity=False):
    """q_sample (velocity: the v target) bound to its arguments' metadata (ddpm_fast.ops._bound): ``bound(t, x0,
    noise)`` with t checked, giving its result (through q_sample's autograd node where an input requires grad), or
    None where the call must take the backend function (not plain eager, a CUDA device other than the current one,
    a gradient of the velocity, which has no kernel); None where it cannot bind."""
    prepared = _prepared_q_sample(x0, noise, schedule, velocity)
    if prepared is None:
        return None
    table_ = prepared[1][0]  # (the tail's first argument)

    def bound(t, x0, noise):
        if not eager_mode() or type(t) not in PLAIN_TYPES or not current_device(x0):
            return None
        if needs_grad((x0, noise)):
            return None if velocity else _QSample.apply(x0, t, noise, table_)
        return _run_prepared_q_sample(prepared, x0, t, noise)

    return bound


def _run_prepared_q_sample(prepared, x0, t, noise):
    """_q_sample's result, launched with a prepared launch."""
    grid, tail, warps = prepared
    out = torch.empty_like(x0)
    _dispatch.direct(_q_sample_kernel)[grid](x0, noise, out, t, *tail, num_warps=warps)
    return out


def _prepared_q_sample(x0, noise, schedule, velocity=False):
    """(grid, the arguments after t, num_warps) of _q_sample's launch on these operands (an output made by
    empty_like(x0)), prepared once per schedule, velocity flag and layouts (_layout.keep_prepared); None where the
    call takes _q_sample (no elements, more than three unmergeable dims, a CUDA device other than the current
    one)."""
    if x0.is_contiguous() and noise.is_contiguous():  # their plan is one of the shapes alone (_layout.plan_key)
        key = (_q_sample_kernel, velocity, schedule, x0.device, x0.shape, noise.shape)
    else:
        key = (_q_sample_kernel, velocity, schedule, x0.device, x0.shape, x0.stride(), noise.shape, noise.stride())
    prepared = PREPARED.get(key)
    if prepared is None:
        if not x0.numel():
            return None
        out = torch.empty_like(x0)
        try:
            p, c = planned([x0, noise, out])
        except LayoutError:
            return None
        table_ = table(schedule, x0.device, torch.float32)
        prepared = keep_prepared(key, (c.grid, _q_sample_tail(p, c, table_, velocity), c.warps))
    return prepared if current_device(x0) else None


def velocity(x0, t, noise, schedule):
    """v [B, ...] in x0's dtype (no gradient kernel: the router runs the reference for inputs that need one)."""
    args = (x0, t, noise, table(schedule, x0.device, torch.float32))
    return call(velocity_op, _velocity, None, args, args[:3])


q_sample.bind = _bind_q_sample  # (read by ddpm_fast.ops.q_sample / velocity)
velocity.bind = functools.partial(_bind_q_sample, velocity=True)


def prior_bpd(x0, schedule):
    """[B] bits/dim in float32 (float64 for float64 x0)."""
    args = (x0, *prior_constants(schedule))
    return call(prior_bpd_op, _prior_bpd, _PriorBpd, args, (x0,), diff=(x0,))
