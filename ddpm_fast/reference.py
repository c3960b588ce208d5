"""The pure-PyTorch reference: every op of ddpm_fast, plain and readable.

This module defines what every fused kernel must compute. Inputs are upcast to float32
(float64 stays float64), coefficients are gathered from the schedule's float32 (or float64)
packed table by t, and elementwise outputs are cast back to the input dtype. Per-sample
reductions ([B] losses) are returned in the compute dtype (float32, or float64).

Arguments are assumed valid (ddpm_fast.ops checks them): t is an int64 tensor [B] on the
inputs' device with values in [0, T); option strings are known. Everything is differentiable
through ordinary autograd.
"""
from __future__ import annotations

import functools
import math

import torch

from .options import (  # noqa: F401  (re-exported: the option names of every op)
    COLUMN, KL_LOSS_TYPES, LEARNED_VAR_TYPES, LOSS_TYPES, MEAN_TYPES, VAR_TYPES, WEIGHTINGS,
)
from .schedule import NoiseSchedule

LN2 = math.log(2.0)


# -- helpers ----------------------------------------------------------------------------------
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _up(x: torch.Tensor) -> torch.Tensor:
    return x.to(compute_dtype(x.dtype))


def coef(schedule: NoiseSchedule, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Column ``name`` of the packed table at t, shaped [B, 1, ...] to broadcast against ``like``."""
    table = schedule.table(like.device, like.dtype)
    return table[t, COLUMN[name]].reshape(-1, *([1] * (like.ndim - 1)))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every non-batch dimension: [B, ...] -> [B]."""
    return per_sample(x).mean(dim=1)


def per_sample(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, N] with N the product of the non-batch sizes (1 for a [B] tensor; B may be 0)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def split_model_output(model_output: torch.Tensor, var_type: str):
    """(mean part, variance part or None): a learned variance doubles the channels (dim 1)."""
    if var_type in LEARNED_VAR_TYPES:
        c = model_output.shape[1] // 2
        return model_output[:, :c], model_output[:, c:]
    return model_output, None


# -- forward process and posterior --------------------------------------------------------------
def q_sample(x0, t, noise, schedule):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. x0, noise: [B, ...] -> [B, ...]."""
    x0c, nc = _up(x0), _up(noise)
    x_t = coef(schedule, "sqrt_alphas_cumprod", t, x0c) * x0c + coef(
        schedule, "sqrt_one_minus_alphas_cumprod", t, x0c
    ) * nc
    return x_t.to(x0.dtype)


def velocity(x0, t, noise, schedule):
    """The v-prediction target v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (the training target of mean type
    "v"; diffusers' get_velocity). x0, noise: [B, ...] -> [B, ...] in x0's dtype."""
    return _mean_target(_up(x0), None, _up(noise), t, schedule, "v").to(x0.dtype)


def _posterior(x0c, x_tc, t, schedule):
    mean = coef(schedule, "posterior_mean_coef1", t, x0c) * x0c + coef(
        schedule, "posterior_mean_coef2", t, x0c
    ) * x_tc
    var = coef(schedule, "posterior_variance", t, x0c)
    logvar = coef(schedule, "posterior_log_variance_clipped", t, x0c)
    return mean, var, logvar


def q_posterior(x0, x_t, t, schedule):
    """q(x_{t-1} | x_t, x0): (mean [B, ...], variance [B, 1, ...], clipped log variance [B, 1, ...])."""
    mean, var, logvar = _posterior(_up(x0), _up(x_t), t, schedule)
    return mean.to(x0.dtype), var.to(x0.dtype), logvar.to(x0.dtype)


# -- the model's prediction -------------------------------------------------------------------
def _predict_xstart(out, x_tc, t, schedule, mean_type):
    """x0 implied by the model's mean part ``out`` for mean_type (unclipped, compute dtype)."""
    if mean_type == "epsilon":
        return coef(schedule, "sqrt_recip_alphas_cumprod", t, x_tc) * x_tc - coef(
            schedule, "sqrt_recipm1_alphas_cumprod", t, x_tc
        ) * out
    if mean_type == "x0":
        return out
    if mean_type == "v":
        return coef(schedule, "sqrt_alphas_cumprod", t, x_tc) * x_tc - coef(
            schedule, "sqrt_one_minus_alphas_cumprod", t, x_tc
        ) * out
    if mean_type == "x_prev":
        return (out - coef(schedule, "posterior_mean_coef2", t, x_tc) * x_tc) / coef(
            schedule, "posterior_mean_coef1", t, x_tc
        )
    raise ValueError(f"mean_type: unknown {mean_type!r}")


def predict_xstart(model_output, x_t, t, schedule, *, mean_type):
    """x0 predicted from the model's mean output [B, C, ...] (no clipping), in x_t's dtype."""
    return _predict_xstart(_up(model_output), _up(x_t), t, schedule, mean_type).to(x_t.dtype)


def _process_xstart(x0, clip_denoised, dynamic_threshold, sample_max_value):
    """Dynamic thresholding (per-sample quantile of |x0|) if asked, else optional clipping to [-1, 1]."""
    if dynamic_threshold is not None:
        s = torch.quantile(per_sample(x0.abs()), dynamic_threshold, dim=1)
        s = s.clamp(min=1.0, max=sample_max_value).reshape(-1, *([1] * (x0.ndim - 1)))
        return torch.maximum(torch.minimum(x0, s), -s) / s
    if clip_denoised:
        return x0.clamp(-1.0, 1.0)
    return x0


def _model_log_variance(var_part, t, schedule, var_type, like):
    """log of the model's variance, [B, 1, ...] for fixed types or [B, C, ...] for learned ones."""
    if var_type == "fixed_small":
        return coef(schedule, "posterior_log_variance_clipped", t, like)
    if var_type == "fixed_large":
        return coef(schedule, "fixed_large_log_variance", t, like)
    if var_type == "learned":
        return var_part
    if var_type == "learned_range":
        frac = (var_part + 1.0) / 2.0
        max_log = coef(schedule, "log_betas", t, like)
        min_log = coef(schedule, "posterior_log_variance_clipped", t, like)
        return frac * max_log + (1.0 - frac) * min_log
    raise ValueError(f"var_type: unknown {var_type!r}")


def _p_mean_variance(mo, x_tc, t, schedule, mean_type, var_type, clip_denoised, dynamic_threshold=None,
                     sample_max_value=1.0):
    """p(x_{t-1} | x_t) in the compute dtype: (mean, log_variance, pred_xstart)."""
    out, var_part = split_model_output(mo, var_type)
    log_var = _model_log_variance(var_part, t, schedule, var_type, x_tc)
    pred_xstart = _process_xstart(
        _predict_xstart(out, x_tc, t, schedule, mean_type), clip_denoised, dynamic_threshold, sample_max_value
    )
    if mean_type == "x_prev":
        mean = out
    else:
        mean, _, _ = _posterior(pred_xstart, x_tc, t, schedule)
    return mean, log_var, pred_xstart


def p_mean_variance(model_output, x_t, t, schedule, *, mean_type, var_type, clip_denoised=False,
                    dynamic_threshold=None, sample_max_value=1.0):
    """The model's p(x_{t-1} | x_t): dict mean, variance, log_variance, pred_xstart (x_t's dtype)."""
    mean, log_var, pred_xstart = _p_mean_variance(
        _up(model_output), _up(x_t), t, schedule, mean_type, var_type, clip_denoised, dynamic_threshold,
        sample_max_value,
    )
    dt = x_t.dtype
    return {"mean": mean.to(dt), "variance": log_var.exp().to(dt), "log_variance": log_var.to(dt),
            "pred_xstart": pred_xstart.to(dt)}


# -- the variational bound --------------------------------------------------------------------
def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (broadcasts)."""
    args = (mean1, logvar1, mean2, logvar2)
    out_dtype = functools.reduce(torch.promote_types, [a.dtype for a in args])
    return _normal_kl(*[_up(a) for a in args]).to(out_dtype)


def _cdf_logit(y):
    """The approximate standard normal cdf 0.5 (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3))) is sigmoid(this)."""
    return 2.0 * math.sqrt(2.0 / math.pi) * (y + 0.044715 * y**3)


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    # The bin mass cdf(y+) - cdf(y-) with cdf = sigmoid(a(y)), written without cancellation:
    # sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - exp(-(a - b))), where
    # a - b = 2 sqrt(2/pi) (y+ - y-) (1 + 0.044715 (y+^2 + y+ y- + y-^2)) is factored exactly.
    inv_stdv = torch.exp(-log_scales)
    y_plus = inv_stdv * (x - means + 1.0 / 255.0)
    y_min = inv_stdv * (x - means - 1.0 / 255.0)
    cdf_plus = torch.sigmoid(_cdf_logit(y_plus))
    one_minus_cdf_min = torch.sigmoid(-_cdf_logit(y_min))
    a_minus_b = 2.0 * math.sqrt(2.0 / math.pi) * (inv_stdv * (2.0 / 255.0)) * (
        1.0 + 0.044715 * (y_plus**2 + y_plus * y_min + y_min**2))
    cdf_delta = cdf_plus * one_minus_cdf_min * -torch.expm1(-a_minus_b)
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log(one_minus_cdf_min.clamp(min=1e-12))
    log_cdf_delta = torch.log(cdf_delta.clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood of x (in [-1, 1], 256 bins) under N(means, exp(log_scales)^2), elementwise, nats."""
    out = _discretized_gaussian_log_likelihood(_up(x), _up(means), _up(log_scales))
    return out.to(torch.promote_types(x.dtype, means.dtype))


def _vb_terms(mo, x0c, x_tc, t, schedule, mean_type, var_type, clip_denoised):
    true_mean, _, true_logvar = _posterior(x0c, x_tc, t, schedule)
    mean, log_var, _ = _p_mean_variance(mo, x_tc, t, schedule, mean_type, var_type, clip_denoised)
    kl = mean_flat(_normal_kl(true_mean, true_logvar, mean, log_var).expand_as(x0c)) / LN2
    nll = -mean_flat(_discretized_gaussian_log_likelihood(x0c, mean, 0.5 * log_var).expand_as(x0c)) / LN2
    return torch.where(t == 0, nll, kl)


def vb_terms_bpd(model_output, x0, x_t, t, schedule, *, mean_type, var_type, clip_denoised=False):
    """The bound's term at t, per sample, in bits/dim: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for
    t > 0, the decoder NLL -log p(x0|x_1) for t = 0. Returns [B] float32 (float64 for float64)."""
    return _vb_terms(_up(model_output), _up(x0), _up(x_t), t, schedule, mean_type, var_type, clip_denoised)


def prior_bpd(x0, schedule):
    """KL(q(x_{T-1} | x0) || N(0, I)) per sample in bits/dim: [B, ...] -> [B] float32 (or float64)."""
    x0c = _up(x0)
    t = torch.full((x0.shape[0],), schedule.num_timesteps - 1, dtype=torch.int64, device=x0.device)
    mean = coef(schedule, "sqrt_alphas_cumprod", t, x0c) * x0c
    logvar = coef(schedule, "log_one_minus_alphas_cumprod", t, x0c)
    zero = torch.zeros((), dtype=x0c.dtype, device=x0.device)
    return mean_flat(_normal_kl(mean, logvar, zero, zero).expand_as(x0c)) / LN2


# -- training losses --------------------------------------------------------------------------
def _mean_target(x0c, x_tc, noise_c, t, schedule, mean_type):
    """What the model's mean output is trained toward for mean_type (compute dtype, x0c's shape)."""
    if mean_type == "epsilon":
        return noise_c
    if mean_type == "x0":
        return x0c
    if mean_type == "v":  # v = sqrt(abar) eps - sqrt(1 - abar) x0
        sqrt_abar = coef(schedule, "sqrt_alphas_cumprod", t, x0c)
        sqrt_1m_abar = coef(schedule, "sqrt_one_minus_alphas_cumprod", t, x0c)
        return sqrt_abar * noise_c - sqrt_1m_abar * x0c
    return _posterior(x0c, x_tc, t, schedule)[0]  # x_prev


def _mean_grad_coef(t, schedule, mean_type, like):
    """d(model mean)/d(mean output) at t: how the posterior-mean error scales the target error."""
    c1 = coef(schedule, "posterior_mean_coef1", t, like)
    if mean_type == "epsilon":
        return c1 * coef(schedule, "sqrt_recipm1_alphas_cumprod", t, like)
    if mean_type == "x0":
        return c1
    if mean_type == "v":
        return c1 * coef(schedule, "sqrt_one_minus_alphas_cumprod", t, like)
    return torch.ones_like(c1)  # x_prev


def loss_weight(t, schedule, *, mean_type, var_type, weighting, min_snr_gamma=5.0, like):
    """Per-sample weight on the MSE, [B, 1, ...].

    simple: 1. elbo: the true-ELBO weight c_t = (dmean/dout)^2 / (2 sigma_t^2 ln 2), so that
    c_t * ||target - out||^2 (mean over dims) is the KL term L_{t-1} in bits/dim up to a constant
    that is 0 when the model variance sigma_t^2 is the posterior's; sigma_t^2 is the fixed
    variance for fixed types, the (clipped) posterior variance for learned ones. min_snr: Hang et
    al. 2023, min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) for x0, min(SNR, gamma)/(SNR+1) for v.
    """
    if weighting == "simple":
        return torch.ones_like(coef(schedule, "snr", t, like))
    if weighting == "elbo":
        log_var = coef(
            schedule, "fixed_large_log_variance" if var_type == "fixed_large" else "posterior_log_variance_clipped",
            t, like,
        )
        g = _mean_grad_coef(t, schedule, mean_type, like)
        return g * g * torch.exp(-log_var) / (2.0 * LN2)
    if weighting == "min_snr":
        snr = coef(schedule, "snr", t, like)
        clipped = torch.clamp(snr, max=min_snr_gamma)
        if mean_type == "epsilon":
            return clipped / snr
        if mean_type == "x0":
            return clipped
        if mean_type == "v":
            return clipped / (snr + 1.0)
        raise ValueError("weighting: 'min_snr' is defined for mean_type 'epsilon', 'x0' or 'v', not 'x_prev'")
    raise ValueError(f"weighting: unknown {weighting!r}")


def training_losses(model_output, x0, t, noise, schedule, *, mean_type, var_type, loss_type,
                    weighting="simple", min_snr_gamma=5.0):
    """improved-diffusion's training losses, per sample [B] (float32, or float64):

    kl / rescaled_kl: "loss" = vb term (times T for rescaled_kl), plus "vb".
    mse / rescaled_mse: "mse" = mean over dims of (target - out)^2, "loss" = weight * mse (+ "vb"
    when the variance is learned: the hybrid loss, where the vb term sees the model mean through a
    stop-gradient and is scaled by T / 1000 under rescaled_mse).
    """
    mo, x0c, nc = _up(model_output), _up(x0), _up(noise)
    x_tc = coef(schedule, "sqrt_alphas_cumprod", t, x0c) * x0c + coef(
        schedule, "sqrt_one_minus_alphas_cumprod", t, x0c
    ) * nc
    T = schedule.num_timesteps
    if loss_type in KL_LOSS_TYPES:
        vb = _vb_terms(mo, x0c, x_tc, t, schedule, mean_type, var_type, False)
        return {"loss": vb * T if loss_type == "rescaled_kl" else vb, "vb": vb}
    out, var_part = split_model_output(mo, var_type)
    terms = {}
    mse = mean_flat((_mean_target(x0c, x_tc, nc, t, schedule, mean_type) - out) ** 2)
    w = loss_weight(t, schedule, mean_type=mean_type, var_type=var_type, weighting=weighting,
                    min_snr_gamma=min_snr_gamma, like=mse[:, None]).reshape(-1)
    terms["mse"] = mse
    terms["loss"] = w * mse
    if var_part is not None:
        frozen = torch.cat([out.detach(), var_part], dim=1)
        vb = _vb_terms(frozen, x0c, x_tc, t, schedule, mean_type, var_type, False)
        if loss_type == "rescaled_mse":
            vb = vb * (T / 1000.0)
        terms["vb"] = vb
        terms["loss"] = terms["loss"] + vb
    return terms


# -- sampler steps ----------------------------------------------------------------------------
def _step_noise(noise, x_tc, generator, seed):
    """The step's N(0, I) draw: ``noise`` if given, else from torch.Generator(seed) or ``generator``."""
    if noise is not None:
        return _up(noise)
    if seed is not None:
        generator = torch.Generator(x_tc.device).manual_seed(seed)
    return torch.randn(x_tc.shape, generator=generator, device=x_tc.device, dtype=x_tc.dtype)


def _nonzero_mask(t, like):
    return (t != 0).to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def p_sample_step(model_output, x_t, t, schedule, *, mean_type, var_type, clip_denoised=True,
                  dynamic_threshold=None, sample_max_value=1.0, noise=None, generator=None, seed=None):
    """One ancestral DDPM step x_t -> x_{t-1} (no noise at t = 0): dict sample, pred_xstart."""
    x_tc = _up(x_t)
    mean, log_var, pred_xstart = _p_mean_variance(
        _up(model_output), x_tc, t, schedule, mean_type, var_type, clip_denoised, dynamic_threshold,
        sample_max_value,
    )
    z = _step_noise(noise, x_tc, generator, seed)
    sample = mean + _nonzero_mask(t, x_tc) * torch.exp(0.5 * log_var) * z
    return {"sample": sample.to(x_t.dtype), "pred_xstart": pred_xstart.to(x_t.dtype)}


def ddim_step(model_output, x_t, t, schedule, *, eta=0.0, clip_denoised=True, dynamic_threshold=None,
              sample_max_value=1.0, mean_type="epsilon", var_type="fixed_small", noise=None, generator=None, seed=None):
    """One DDIM step from t to the schedule's previous step: dict sample, pred_xstart.

    eps is re-derived from the (clipped) pred_xstart; sigma = eta sqrt((1-abar_prev)/(1-abar))
    sqrt(1 - abar/abar_prev); no noise is drawn when eta = 0 and none is added at t = 0.
    """
    x_tc = _up(x_t)
    _, _, pred_xstart = _p_mean_variance(
        _up(model_output), x_tc, t, schedule, mean_type, var_type, clip_denoised, dynamic_threshold,
        sample_max_value,
    )
    # eps implied by (x_t, pred_xstart); this form stays finite where abar_t = 0 (zero terminal SNR).
    eps = (x_tc - coef(schedule, "sqrt_alphas_cumprod", t, x_tc) * pred_xstart) / coef(
        schedule, "sqrt_one_minus_alphas_cumprod", t, x_tc
    )
    # sigma^2 = eta^2 (1 - abar_prev) beta_t / (1 - abar_t) with beta_t = 1 - abar_t / abar_prev (respaced too),
    # so sqrt(1 - abar_prev - sigma^2) = sqrt(1 - abar_prev) sqrt(1 - eta^2 ratio): no cancellation near abar = 1.
    ratio = coef(schedule, "betas", t, x_tc) / coef(schedule, "sqrt_one_minus_alphas_cumprod", t, x_tc) ** 2
    sqrt_1m_abar_prev = coef(schedule, "sqrt_one_minus_alphas_cumprod_prev", t, x_tc)
    sigma = eta * sqrt_1m_abar_prev * torch.sqrt(ratio)
    sample = pred_xstart * coef(schedule, "sqrt_alphas_cumprod_prev", t, x_tc) + sqrt_1m_abar_prev * torch.sqrt(
        (1.0 - eta**2 * ratio).clamp(min=0.0)
    ) * eps
    if eta != 0.0:
        sample = sample + _nonzero_mask(t, x_tc) * sigma * _step_noise(noise, x_tc, generator, seed)
    return {"sample": sample.to(x_t.dtype), "pred_xstart": pred_xstart.to(x_t.dtype)}


# -- the fused multistep solver update (ddpm_fast.solvers) ----------------------------------------------
def _column(coef_rows, name_index, like):
    """Column ``name_index`` of the gathered rows [B, 14] shaped [B, 1, ...] to broadcast against ``like``."""
    return coef_rows[:, name_index].reshape(-1, *([1] * (like.ndim - 1)))


def solver_update(x, model_output, rows, row_index, m_out, *, model_cond=None, guidance_scale=1.0, cfg_factor=None,
                  thresh=None, history=(None, None, None), last_sample=None, noise=None, draw_noise=False,
                  generator=None, seed=None):
    """One step of a multistep sampler (DPM-Solver++, Euler, Euler ancestral, UniPC: ddpm_fast.solvers.steps)
    as one linear combination with per-sample coefficients; the formula every backend's solver_update computes.

    Args (S = float32, float64 when x is float64):
        x: the sample [B, ...], float16 / bfloat16 / float32 / float64.
        model_output: the model's output [B, ...] (x's dtype or S); the unconditional half u with model_cond.
        rows: the coefficient rows [R, 14] of dtype S (columns ddpm_fast.solvers.tables.FUSED_COLUMNS).
        row_index: int64 [B], each sample's row, in [0, R).
        m_out: [B, ...] of dtype S: receives the converted model output m (written in place).
        model_cond: None, or the conditional half c [B, ...]: g = u + guidance_scale (c - u).
        guidance_scale: the classifier-free guidance scale (used with model_cond).
        cfg_factor: None, or [B] of dtype S: g = g * cfg_factor[b] (guidance_rescale's per-sample factor).
        thresh: None, or [B] of dtype S: m = clamp(m, -thresh[b], thresh[b]) / thresh[b] (dynamic thresholding).
        history: (h1, h2, h3), the converted outputs of steps i-1, i-2, i-3, [B, ...] of dtype S or None (0).
        last_sample: None (0), or UniPC's [B, ...] of dtype S: read, then overwritten with the corrected sample.
        noise: None, or the standard normal [B, ...] (x's dtype or S).
        draw_noise: with noise None, draw it as p_sample_step does (from seed, else generator); else no noise.

    With x_s = x + churn noise, m = conv_sample x_s + conv_model g,
    corrected = c_this x_s + c_last last + c_model m + c_h1 h1 + c_h2 h2 + c_h3 h3 and
    x_prev = p_corr corrected + p_m0 m + p_h1 h1 + p_h2 h2 + p_noise noise; absent terms are left out.
    Every input is read before m_out / last_sample are written (m_out may be the memory of a history entry).

    Returns:
        x_prev [B, ...] in x's dtype.
    """
    S = compute_dtype(x.dtype)
    coef_rows = rows[row_index].to(S)
    (churn, conv_sample, conv_model, c_this, c_last, c_model, c_h1, c_h2, c_h3, p_corr, p_m0, p_h1, p_h2,
     p_noise) = (_column(coef_rows, k, x) for k in range(coef_rows.shape[1]))
    guided = model_output.to(S)
    if model_cond is not None:
        guided = guided + guidance_scale * (model_cond.to(S) - guided)
    if cfg_factor is not None:
        guided = guided * cfg_factor.to(S).reshape(-1, *([1] * (x.ndim - 1)))
    x_s = x.to(S)
    z = _step_noise(noise, x_s, generator, seed) if (noise is not None or draw_noise) else None
    if z is not None:
        x_s = x_s + churn * z
    m = conv_sample * x_s + conv_model * guided
    if thresh is not None:
        s = thresh.to(S).reshape(-1, *([1] * (x.ndim - 1)))
        m = torch.maximum(torch.minimum(m, s), -s) / s
    h1, h2, h3 = (None if h is None else h.to(S) for h in history)
    corrected = c_this * x_s
    for c, term in ((c_last, last_sample), (c_model, m), (c_h1, h1), (c_h2, h2), (c_h3, h3)):
        if term is not None:
            corrected = corrected + c * term.to(S)
    x_prev = p_corr * corrected
    for c, term in ((p_m0, m), (p_h1, h1), (p_h2, h2), (p_noise, z)):
        if term is not None:
            x_prev = x_prev + c * term
    m_out.copy_(m)
    if last_sample is not None:
        last_sample.copy_(corrected)
    return x_prev.to(x.dtype)
