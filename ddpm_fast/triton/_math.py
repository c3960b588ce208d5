"""The per-element formulas of docs/design.md as @triton.jit helpers: csrc/ddpm_math.h, function for function.

Every public (no leading underscore) @triton.jit helper here carries the name of a function of
csrc/ddpm_math.h, in that file's order (tests/test_triton_math_mirror.py checks it), and no kernel
writes a formula of its own: each formula exists once on this backend. The header's functions that
have no helper here are listed in NOT_MIRRORED with the reason. Helpers with a leading underscore are
Triton-only: addressing (program, offsets, loads, table columns), the backward partials the C++ side
writes inside its kernels (ddpm_elem.h), and compositions of the mirrored formulas.

Every helper computes in the dtype of its inputs (the launcher's compute dtype: float32, or float64
for float64 inputs). Table columns are read from the packed schedule table by t (one row per sample).
Enumerations: MEAN 0 epsilon, 1 x0, 2 x_prev, 3 v; VAR 0 fixed_small, 1 fixed_large, 2 learned,
3 learned_range; WEIGHTING 0 simple, 1 elbo, 2 min_snr.
"""
import triton
import triton.language as tl

from ..schedule import COLUMN, COLUMNS

# csrc/ddpm_math.h functions without a helper here, and why (each must still exist in the header).
NOT_MIRRORED = {
    "mulhi32": "Philox: philox_normal draws its block with tl.randint4x, triton.language.random's Philox",
    "philox_round": "Philox: inside tl.randint4x",
    "philox_to_uniform": "Philox: tl.uint_to_uniform_float",
    "philox_block": "Philox: tl.randint4x",
    "philox_pair_uniforms": "Philox: written into philox_normal (a tl.where on the block's words)",
    "philox_normals4": "Philox: tl.randn4x (in _philox_normal_rows)",
}

NCOL = tl.constexpr(len(COLUMNS))
BETAS = tl.constexpr(COLUMN["betas"])
LOG_BETAS = tl.constexpr(COLUMN["log_betas"])
ABAR = tl.constexpr(COLUMN["alphas_cumprod"])
ABAR_PREV = tl.constexpr(COLUMN["alphas_cumprod_prev"])
SQRT_ABAR = tl.constexpr(COLUMN["sqrt_alphas_cumprod"])
SQRT_1M_ABAR = tl.constexpr(COLUMN["sqrt_one_minus_alphas_cumprod"])
SQRT_ABAR_PREV = tl.constexpr(COLUMN["sqrt_alphas_cumprod_prev"])
SQRT_1M_ABAR_PREV = tl.constexpr(COLUMN["sqrt_one_minus_alphas_cumprod_prev"])
SQRT_RECIP_ABAR = tl.constexpr(COLUMN["sqrt_recip_alphas_cumprod"])
SQRT_RECIPM1_ABAR = tl.constexpr(COLUMN["sqrt_recipm1_alphas_cumprod"])
POST_VAR = tl.constexpr(COLUMN["posterior_variance"])
POST_LOGVAR = tl.constexpr(COLUMN["posterior_log_variance_clipped"])
POST_C1 = tl.constexpr(COLUMN["posterior_mean_coef1"])
POST_C2 = tl.constexpr(COLUMN["posterior_mean_coef2"])
LARGE_LOGVAR = tl.constexpr(COLUMN["fixed_large_log_variance"])
SNR = tl.constexpr(COLUMN["snr"])
LOG_1M_ABAR = tl.constexpr(COLUMN["log_one_minus_alphas_cumprod"])

# Float constants are written inline (the interpreter mishandles float constexpr globals):
# ln 2 = 0.6931471805599453, sqrt(2/pi) = 0.7978845608028654, bin half-width 1/255 = 0.00392156862745098.



# -- addressing (Triton-only) ------------------------------------------------------------------
@triton.jit
def _program_chunk(n_chunks, BLOCK: tl.constexpr, IDX64: tl.constexpr):
    """(b, chunk, n) of this program on a 1-D grid of n_chunks * B programs (_runtime.launch_config):
    sample b (int64), chunk index, and the chunk's BLOCK element indices n within the sample (int64 when
    IDX64, else int32)."""
    pid = tl.program_id(0)
    b = pid // n_chunks
    chunk = pid - b * n_chunks
    if IDX64:
        chunk = chunk.to(tl.int64)
    return b.to(tl.int64), chunk, chunk * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _program_block(N, n_chunks, BLOCK: tl.constexpr, IDX64: tl.constexpr):
    """_program_chunk's (b, chunk, n) and the mask m = n < N of the elements that exist (N per sample)."""
    b, chunk, n = _program_chunk(n_chunks, BLOCK, IDX64)
    return b, chunk, n, n < N


@triton.jit
def _program_block_t(t_ptr, T, N, n_chunks, BLOCK: tl.constexpr, IDX64: tl.constexpr):
    """_program_block's (b, chunk, n, m) and the sample's timestep t (_load_t: int, clamped into [0, T))."""
    b, chunk, n, m = _program_block(N, n_chunks, BLOCK, IDX64)
    return b, chunk, n, m, _load_t(t_ptr, b, T)


@triton.jit
def _offsets(b, n, sb, s1, s2, s3, D2, D3, FLAT: tl.constexpr):
    """int64 element offsets of sample b's logical elements n (see _layout.Plan)."""
    if FLAT:
        return b * sb + n
    else:
        i3 = n % D3
        r = n // D3
        i2 = r % D2
        i1 = r // D2
        return b * sb + i1.to(tl.int64) * s1 + i2.to(tl.int64) * s2 + i3.to(tl.int64) * s3


@triton.jit
def _load(ptr, b, n, m, sb, s1, s2, s3, D2, D3, FLAT: tl.constexpr, CDT: tl.constexpr):
    """Elements n (masked by m) of sample b of an operand with strides (sb, s1, s2, s3), in the compute dtype."""
    return tl.load(ptr + _offsets(b, n, sb, s1, s2, s3, D2, D3, FLAT), mask=m, other=0.0).to(CDT)


@triton.jit
def _load_t(t_ptr, b, T):
    """The table row index of sample b (its timestep t, or a solver's row index), clamped into [0, T) so that a bad
    index never reads out of bounds (asserted in debug)."""
    t = tl.load(t_ptr + b)
    tl.device_assert((t >= 0) & (t < T), "table row index (t or row_index) out of range [0, T)")
    return tl.minimum(tl.maximum(t, 0), T - 1)


@triton.jit
def _load_training_operands(mo_ptr, x0_ptr, xn_ptr, table_ptr, b, n, m, t, m_sb, m_s1, m_s2, m_s3,
                             a_sb, a_s1, a_s2, a_s3, x_sb, x_s1, x_s2, x_s3, D2, D3, FROM_NOISE: tl.constexpr,
                             FLAT: tl.constexpr, CDT: tl.constexpr):
    """(model output, x0, xn, x_t) of elements n of sample b: xn is the noise (FROM_NOISE, x_t = q_sample(x0, xn))
    or x_t itself."""
    out = _load(mo_ptr, b, n, m, m_sb, m_s1, m_s2, m_s3, D2, D3, FLAT, CDT)
    x0 = _load(x0_ptr, b, n, m, a_sb, a_s1, a_s2, a_s3, D2, D3, FLAT, CDT)
    xn = _load(xn_ptr, b, n, m, x_sb, x_s1, x_s2, x_s3, D2, D3, FLAT, CDT)
    if FROM_NOISE:
        xt = q_sample(x0, xn, table_ptr, t)
    else:
        xt = xn
    return out, x0, xn, xt


@triton.jit
def _load_model_log_variance(out, mv_ptr, b, n, m, t, table_ptr, v_sb, v_s1, v_s2, v_s3, D2, D3, VAR: tl.constexpr,
                             FLAT: tl.constexpr, CDT: tl.constexpr):
    """The model's log variance of elements n of sample b: from its variance output (read at mv_ptr, learned VAR
    >= 2) or fixed by the table."""
    if VAR >= 2:
        v = _load(mv_ptr, b, n, m, v_sb, v_s1, v_s2, v_s3, D2, D3, FLAT, CDT)
    else:
        v = out
    return _model_log_variance(v, table_ptr, t, VAR)


@triton.jit
def _col(table_ptr, t, C: tl.constexpr):
    """Column C of the packed table at row t (a scalar in the table's dtype)."""
    return tl.load(table_ptr + t * NCOL + C)


@triton.jit
def _row_sum(part_ptr, row, n_chunks, CBLOCK: tl.constexpr):
    """Fixed-order sum of n_chunks partial sums starting at part_ptr + row * n_chunks."""
    k = tl.arange(0, CBLOCK)
    acc = tl.load(part_ptr + row * n_chunks + k, mask=k < n_chunks, other=0.0)
    for start in range(CBLOCK, n_chunks, CBLOCK):
        acc += tl.load(part_ptr + row * n_chunks + start + k, mask=start + k < n_chunks, other=0.0)
    return tl.sum(acc, axis=0)


# -- forward process, posterior, x0 prediction (ddpm_math.h order from here on) --------------------
@triton.jit
def q_sample(x0, eps, table_ptr, t):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    return _col(table_ptr, t, SQRT_ABAR) * x0 + _col(table_ptr, t, SQRT_1M_ABAR) * eps


@triton.jit
def posterior_mean(x0, x_t, table_ptr, t):
    """post_c1 x0 + post_c2 x_t."""
    return _col(table_ptr, t, POST_C1) * x0 + _col(table_ptr, t, POST_C2) * x_t


@triton.jit
def predict_xstart(out, x_t, table_ptr, t, MEAN: tl.constexpr):
    """x0 implied by the mean output (unclipped)."""
    if MEAN == 0:
        return _col(table_ptr, t, SQRT_RECIP_ABAR) * x_t - _col(table_ptr, t, SQRT_RECIPM1_ABAR) * out
    elif MEAN == 1:
        return out
    elif MEAN == 2:
        return (out - _col(table_ptr, t, POST_C2) * x_t) / _col(table_ptr, t, POST_C1)
    else:
        return _col(table_ptr, t, SQRT_ABAR) * x_t - _col(table_ptr, t, SQRT_1M_ABAR) * out


@triton.jit
def _dxstart_dout(table_ptr, t, MEAN: tl.constexpr):
    """d predict_xstart / d out (a per-sample scalar; predict_xstart's backward)."""
    if MEAN == 0:
        return -_col(table_ptr, t, SQRT_RECIPM1_ABAR)
    elif MEAN == 1:
        return _col(table_ptr, t, POST_C1) * 0.0 + 1.0
    elif MEAN == 2:
        return 1.0 / _col(table_ptr, t, POST_C1)
    else:
        return -_col(table_ptr, t, SQRT_1M_ABAR)


@triton.jit
def _dxstart_dxt(table_ptr, t, MEAN: tl.constexpr):
    """d predict_xstart / d x_t (a per-sample scalar; predict_xstart's backward)."""
    if MEAN == 0:
        return _col(table_ptr, t, SQRT_RECIP_ABAR)
    elif MEAN == 1:
        return _col(table_ptr, t, POST_C1) * 0.0
    elif MEAN == 2:
        return -_col(table_ptr, t, POST_C2) / _col(table_ptr, t, POST_C1)
    else:
        return _col(table_ptr, t, SQRT_ABAR)


@triton.jit
def mean_grad_coef(table_ptr, t, MEAN: tl.constexpr):
    """d(model mean)/d(mean output) for the unclipped mean type, with its sign (a per-sample scalar):
    -c1 sqrt(1/abar - 1) epsilon, c1 x0, 1 x_prev, -c1 sqrt(1 - abar) v."""
    c1 = _col(table_ptr, t, POST_C1)
    if MEAN == 0:
        return -c1 * _col(table_ptr, t, SQRT_RECIPM1_ABAR)
    elif MEAN == 1:
        return c1
    elif MEAN == 2:
        return c1 * 0.0 + 1.0
    else:
        return -c1 * _col(table_ptr, t, SQRT_1M_ABAR)


@triton.jit
def mean_target(x0, x_t, eps, table_ptr, t, MEAN: tl.constexpr):
    """The MSE target of the model's mean output (eps: the noise that made x_t)."""
    if MEAN == 0:
        return eps
    elif MEAN == 1:
        return x0
    elif MEAN == 2:
        return posterior_mean(x0, x_t, table_ptr, t)
    else:
        return _col(table_ptr, t, SQRT_ABAR) * eps - _col(table_ptr, t, SQRT_1M_ABAR) * x0


@triton.jit
def process_xstart(x0, s, CLIP: tl.constexpr, THRESHOLD: tl.constexpr):
    """x0 post-processing: dynamic thresholding at the per-sample s (THRESHOLD), else clip to [-1, 1] (CLIP)."""
    if THRESHOLD:
        return tl.maximum(tl.minimum(x0, s), -s) / s
    elif CLIP:
        return tl.minimum(tl.maximum(x0, -1.0), 1.0)
    else:
        return x0


# -- model variance --------------------------------------------------------------------------------
@triton.jit
def learned_range_logvar(v, max_log, min_log):
    """learned_range: frac = (v + 1) / 2, log variance frac max_log + (1 - frac) min_log."""
    frac = (v + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


@triton.jit
def fixed_logvar(table_ptr, t, VAR: tl.constexpr):
    """The per-sample log variance of a fixed variance type (fixed_large's, else the clipped posterior's)."""
    if VAR == 1:
        return _col(table_ptr, t, LARGE_LOGVAR)
    else:
        return _col(table_ptr, t, POST_LOGVAR)


@triton.jit
def _model_log_variance(v, table_ptr, t, VAR: tl.constexpr):
    """log model variance: a per-sample scalar for fixed types, elementwise (from v) for learned ones."""
    if VAR == 2:
        return v
    elif VAR == 3:
        return learned_range_logvar(v, _col(table_ptr, t, LOG_BETAS), _col(table_ptr, t, POST_LOGVAR))
    else:
        return fixed_logvar(table_ptr, t, VAR)


@triton.jit
def _dlogvar_dv(table_ptr, t, VAR: tl.constexpr):
    """d _model_log_variance / d v for learned types."""
    if VAR == 3:
        return 0.5 * (_col(table_ptr, t, LOG_BETAS) - _col(table_ptr, t, POST_LOGVAR))
    else:
        return _col(table_ptr, t, LOG_BETAS) * 0.0 + 1.0


@triton.jit
def _model_mean(out, x_t, table_ptr, t, MEAN: tl.constexpr, CLIP: tl.constexpr):
    """(model mean, unclipped x0): the raw output for x_prev, else the posterior mean at the (clipped) x0."""
    raw = predict_xstart(out, x_t, table_ptr, t, MEAN)
    if MEAN == 2:
        return out, raw
    else:
        return posterior_mean(process_xstart(raw, 1.0, CLIP, False), x_t, table_ptr, t), raw


# -- Gaussian KL -------------------------------------------------------------------------------
@triton.jit
def normal_kl(m1, lv1, m2, lv2):
    """KL(N(m1, e^lv1) || N(m2, e^lv2)) in nats."""
    d = m1 - m2
    return 0.5 * (-1.0 + lv2 - lv1 + tl.exp(lv1 - lv2) + d * d * tl.exp(-lv2))


@triton.jit
def normal_kl_given_exps(m1, lv1, m2, lv2, r, exp_neg_lv2):
    """(KL, dKL/dm2, dKL/dlv2) of normal_kl given r = exp(lv1 - lv2) and exp(-lv2) (dKL/dm1 = -dKL/dm2)."""
    d = m1 - m2
    q = d * d * exp_neg_lv2
    return 0.5 * (-1.0 + lv2 - lv1 + r + q), -d * exp_neg_lv2, 0.5 * (1.0 - r - q)


@triton.jit
def normal_kl_grad(m1, lv1, m2, lv2):
    """(dKL/dm1, dKL/dlv1, dKL/dm2, dKL/dlv2) of normal_kl."""
    d = m1 - m2
    e = tl.exp(-lv2)
    r = tl.exp(lv1 - lv2)
    return d * e, 0.5 * (r - 1.0), -d * e, 0.5 * (1.0 - r - d * d * e)


# -- discretized Gaussian decoder likelihood (L_0) ----------------------------------------------------
@triton.jit
def cdf_logit(y):
    """cdf(y) ~ 0.5 (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3))) = sigmoid(cdf_logit(y));
    1.5957691216057308 = 2 sqrt(2/pi)."""
    return 1.5957691216057308 * (y + 0.044715 * y * y * y)


@triton.jit
def sigmoid(z):
    """1 / (1 + exp(-z))."""
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def one_minus_exp_neg(d):
    """1 - exp(-d) for d >= 0, without cancellation for small d (a Horner series below 0.25)."""
    ds = tl.where(d < 0.25, d, 0.0)
    p = 1.0 - ds * 0.08333333333333333
    p = 1.0 - ds * 0.09090909090909091 * p
    p = 1.0 - ds * 0.1 * p
    p = 1.0 - ds * 0.1111111111111111 * p
    p = 1.0 - ds * 0.125 * p
    p = 1.0 - ds * 0.14285714285714285 * p
    p = 1.0 - ds * 0.16666666666666666 * p
    p = 1.0 - ds * 0.2 * p
    p = 1.0 - ds * 0.25 * p
    p = 1.0 - ds * 0.3333333333333333 * p
    p = 1.0 - ds * 0.5 * p
    return tl.where(d < 0.25, ds * p, 1.0 - tl.exp(-d))


@triton.jit
def _bin_cdfs(x, means, log_scales):
    """(inv_std, yp, ym, width = yp - ym, q, D, 1 - exp(-D), cdf(yp), 1 - cdf(ym), cdf(yp) - cdf(ym)) for the
    bin [x - 1/255, x + 1/255].

    cdf(y) = sigmoid(cdf_logit(y)); the bin mass is computed without cancellation as
    sigmoid(a) - sigmoid(b) = sigmoid(a) (1 - sigmoid(b)) (1 - exp(-D)), D = a - b factored exactly.
    """
    inv_std = tl.exp(-log_scales)
    c = x - means
    yp = inv_std * (c + 0.00392156862745098)
    ym = inv_std * (c - 0.00392156862745098)
    width = inv_std * 0.00784313725490196
    q = yp * yp + yp * ym + ym * ym
    sp = sigmoid(cdf_logit(yp))
    one_m_sm = sigmoid(-cdf_logit(ym))
    D = 1.5957691216057308 * width * (1.0 + 0.044715 * q)
    one_m_exp = one_minus_exp_neg(D)
    delta = sp * one_m_sm * one_m_exp
    return inv_std, yp, ym, width, q, D, one_m_exp, sp, one_m_sm, delta


@triton.jit
def discretized_gaussian_loglik(x, means, log_scales):
    """log p(x) on 256 bins of [-1, 1] under N(means, e^(2 log_scales)), floored at log(1e-12)."""
    inv_std, yp, ym, width, q, D, one_m_exp, cdf_plus, one_minus_cdf_min, delta = _bin_cdfs(x, means, log_scales)
    log_cdf_plus = tl.log(tl.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = tl.log(tl.maximum(one_minus_cdf_min, 1e-12))
    log_delta = tl.log(tl.maximum(delta, 1e-12))
    return tl.where(x < -0.999, log_cdf_plus, tl.where(x > 0.999, log_one_minus_cdf_min, log_delta))


@triton.jit
def _discretized_gaussian_loglik_grads(x, means, log_scales):
    """(d/d means, d/d log_scales) of discretized_gaussian_loglik (0 where the 1e-12 floor holds).

    log of the bin mass = log sigmoid(a) + log sigmoid(-b) + log(1 - exp(-D)), differentiated term by term
    (no difference of two large pdf / mass ratios); dy/dmeans = -inv_std, dy/dlog_scales = -y.
    """
    inv_std, yp, ym, width, q, D, one_m_exp, sp, one_m_sm, delta = _bin_cdfs(x, means, log_scales)
    up = sigmoid(-cdf_logit(yp)) * (1.5957691216057308 * (1.0 + 0.134145 * yp * yp))  # d log sigmoid(a) / dyp
    um = sigmoid(cdf_logit(ym)) * (1.5957691216057308 * (1.0 + 0.134145 * ym * ym))  # -d log sigmoid(-b) / dym
    r = tl.exp(-D) / one_m_exp  # d log(1 - exp(-D)) / dD
    m_mid = up - um + r * (3.0 * 1.5957691216057308 * 0.044715 * width * (yp + ym))
    l_mid = up * yp - um * ym + r * (1.5957691216057308 * width * (1.0 + 0.134145 * q))
    low = x < -0.999
    high = x > 0.999
    m_term = tl.where(low, up, tl.where(high, -um, m_mid))
    l_term = tl.where(low, up * yp, tl.where(high, -um * ym, l_mid))
    arg = tl.where(low, sp, tl.where(high, one_m_sm, delta))
    live = arg >= 1e-12
    d_means = tl.where(live, -inv_std * m_term, 0.0)
    d_log_scales = tl.where(live, -l_term, 0.0)
    return d_means, d_log_scales


# -- loss weights, DDIM --------------------------------------------------------------------------
@triton.jit
def loss_weight(table_ptr, t, gamma, MEAN: tl.constexpr, VAR: tl.constexpr, WEIGHTING: tl.constexpr):
    """Per-sample MSE weight (reference.loss_weight): simple 1, elbo g^2 exp(-logvar) / (2 ln 2), min_snr(gamma)."""
    snr = _col(table_ptr, t, SNR)
    if WEIGHTING == 0:
        return snr * 0.0 + 1.0
    elif WEIGHTING == 1:
        g = mean_grad_coef(table_ptr, t, MEAN)
        return g * g * tl.exp(-fixed_logvar(table_ptr, t, VAR)) / 1.3862943611198906
    else:
        clipped = tl.minimum(snr, gamma)
        if MEAN == 0:
            return clipped / snr
        elif MEAN == 1:
            return clipped
        else:
            return clipped / (snr + 1.0)


@triton.jit
def _finish_loss_terms(vb_sum, mse_sum, loss_ptr, mse_ptr, vb_ptr, b, t, table_ptr, N, gamma, vb_scale,
                       loss_scale, MEAN: tl.constexpr, VAR: tl.constexpr, WEIGHTING: tl.constexpr,
                       DO_VB: tl.constexpr, DO_MSE: tl.constexpr, MSE_OUT: tl.constexpr):
    """training_losses / vb_terms_bpd: sample b's [B] terms from its sums over its N elements of the vb term (nats)
    and the squared error: loss, mse (MSE_OUT: an mse term that is not the loss itself) and vb (DO_VB). The
    launcher allocates only those; an absent term's pointer stands in, unwritten."""
    vb = vb_sum / N / 0.6931471805599453 * vb_scale
    mse = mse_sum / N
    if DO_MSE:
        loss = loss_weight(table_ptr, t, gamma, MEAN, VAR, WEIGHTING) * mse
        if DO_VB:
            loss = loss + vb
    else:
        loss = vb * loss_scale
    tl.store(loss_ptr + b, loss)
    if MSE_OUT:
        tl.store(mse_ptr + b, mse)
    if DO_VB:
        tl.store(vb_ptr + b, vb)


@triton.jit
def ddim_coefs(eta, table_ptr, t):
    """(sigma, sqrt(abar_prev), eps weight) of a DDIM step: with r = beta / (1 - abar), sigma = eta
    sqrt(1 - abar_prev) sqrt(r) and the eps weight sqrt(1 - abar_prev) sqrt(1 - eta^2 r) (no cancellation
    where abar_prev is near 1)."""
    s1m = _col(table_ptr, t, SQRT_1M_ABAR)
    s1m_prev = _col(table_ptr, t, SQRT_1M_ABAR_PREV)
    r = _col(table_ptr, t, BETAS) / (s1m * s1m)
    sigma = eta * s1m_prev * tl.sqrt(r)
    eps_coef = s1m_prev * tl.sqrt(tl.maximum(1.0 - eta * eta * r, 0.0))
    return sigma, _col(table_ptr, t, SQRT_ABAR_PREV), eps_coef


@triton.jit
def ddim_sample(x0, x_t, sqrt_abar, sqrt_1m_abar, sqrt_abar_prev, eps_coef):
    """DDIM update without noise: eps re-derived from the processed x0 as (x_t - sqrt(abar) x0) / sqrt(1 - abar),
    the form that stays finite where abar = 0 (zero terminal SNR)."""
    eps = (x_t - sqrt_abar * x0) / sqrt_1m_abar
    return x0 * sqrt_abar_prev + eps_coef * eps


@triton.jit
def guided_output(uncond, cond, scale):
    """Classifier-free guidance: the unconditional output moved towards the conditional one by ``scale``
    (1: the conditional output; 0: the unconditional one)."""
    return uncond + scale * (cond - uncond)


@triton.jit
def box_muller_radius(u_radius):
    """Box-Muller's radius sqrt(-2 log u), u clamped to >= 1e-7 (as tl.randn4x's pair_uniform_to_normal)."""
    return tl.sqrt(-2.0 * tl.log(tl.maximum(u_radius, 1.0e-7)))


@triton.jit
def philox_normal(seed, counter):
    """float32 N(0, 1) draws for int64 counters g: lane g % 4 of tl.randn4x(seed, g // 4), the draws of the
    C++ kernels for a seed. Words (0, 1) of the Philox block give draws 0 (cosine) and 1 (sine), words (2, 3)
    draws 2 and 3."""
    c0, c1, c2, c3 = tl.randint4x(seed, counter >> 2)
    second_pair = (counter & 2) != 0
    radius = box_muller_radius(tl.uint_to_uniform_float(tl.where(second_pair, c2, c0)))
    angle = 6.283185307179586 * tl.uint_to_uniform_float(tl.where(second_pair, c3, c1))
    return radius * tl.where((counter & 1) != 0, tl.sin(angle), tl.cos(angle))


@triton.jit
def _seed(seed_ptr, seed, FROM_PTR: tl.constexpr):
    """A kernel's Philox seed: seed_ptr[0] (FROM_PTR: a device tensor, graph-safe), else the int seed."""
    if FROM_PTR:
        return tl.load(seed_ptr)
    else:
        return seed


@triton.jit
def _philox_normal_rows(seed, first_counter, BLOCK: tl.constexpr):
    """philox_normal(seed, first_counter + arange(BLOCK)) for first_counter a multiple of 4 (BLOCK one too):
    one tl.randn4x block per four draws, interleaved (bit for bit philox_normal's values)."""
    n0, n1, n2, n3 = tl.randn4x(seed, (first_counter >> 2) + tl.arange(0, BLOCK // 4))
    # join(join(n0, n2), join(n1, n3))[k, i, s] is n_(2 i + s)[k], at 4 k + 2 i + s in row-major order
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [BLOCK])


@triton.jit
def _philox_draws(seed, b, chunk, n, sb, s1, s2, s3, D2, D3, FLAT: tl.constexpr, BLOCK: tl.constexpr,
                  WHOLE_BLOCKS: tl.constexpr):
    """The in-kernel noise of elements n (chunk ``chunk``) of sample b: philox_normal at their logical counters
    (the row-major stride set sb, s1, s2, s3); WHOLE_BLOCKS (a flat plan with N % 4 == 0:
    _layout.philox_blocks_whole) by whole Philox blocks, the same values."""
    if WHOLE_BLOCKS:
        return _philox_normal_rows(seed, b * sb + chunk * BLOCK, BLOCK)
    else:
        return philox_normal(seed, _offsets(b, n, sb, s1, s2, s3, D2, D3, FLAT))
