// ddpm_math.h -- the per-element diffusion math of ddpm_fast, shared by the CPU and CUDA kernels.
//
// One inline function per formula of docs/design.md ("The math"), templated on the value type V:
// float or double (CPU scalar code, CUDA threads) or at::vec::Vectorized<float/double> (CPU SIMD).
// Elementary functions go through Prim<V>; cpu/simd_math.h specialises Prim for Vectorized. The option
// and table-column codes are options.h's. Per-sample coefficients come from one row of the schedule's packed table
// (columns in ddpm_fast.schedule.COLUMNS order). Semantics follow ddpm_fast/reference.py exactly.
// No formula is re-derived anywhere else in csrc/.
#pragma once

#include <cmath>
#include <cstdint>

#include "options.h"

// Forced inline on both sides: a per-element function left out of line inside a CPU kernel's loop is a
// call, and every vector register is caller-saved, so the whole loop would keep its values on the stack.
#if defined(__CUDACC__)
#define DDPM_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define DDPM_HD inline __attribute__((always_inline))
#else
#define DDPM_HD inline
#endif

namespace ddpm {

constexpr double kLn2 = 0.69314718055994530942;

// ---- elementary functions ------------------------------------------------------------------------
template <class V> struct Prim;

// What Prim<float> and Prim<double> share: comparisons, masks and selects on scalars, and NaN-propagating
// min / max (torch.minimum / torch.maximum / clamp semantics)
template <class T> struct ScalarPrim {
  using Mask = bool;
  static DDPM_HD Mask lt(T a, T b) { return a < b; }
  static DDPM_HD Mask gt(T a, T b) { return a > b; }
  static DDPM_HD Mask ge(T a, T b) { return a >= b; }
  static DDPM_HD Mask le(T a, T b) { return a <= b; }
  static DDPM_HD Mask land(Mask a, Mask b) { return a && b; }
  static DDPM_HD T select(Mask m, T a, T b) { return m ? a : b; }
  static DDPM_HD T min(T a, T b) { return (a != a) ? a : (a < b ? a : b); }
  static DDPM_HD T max(T a, T b) { return (a != a) ? a : (a > b ? a : b); }
};

// the libm function of each precision (expf, not exp, for float: no round trip through double)
template <> struct Prim<float> : ScalarPrim<float> {
  static DDPM_HD float exp(float x) { return ::expf(x); }
  static DDPM_HD float log(float x) { return ::logf(x); }
  static DDPM_HD float sqrt(float x) { return ::sqrtf(x); }
  // cosine / sine of an angle of u turns: on the host as triton.language computes them, cos(fl(2 pi u)) and
  // sin(fl(2 pi u)); in CUDA device code cospif / sinpif of 2 u (exact), which need no argument reduction
  // (cosf / sinf's reduction of a large argument gave every kernel that draws noise a 32-byte stack frame)
  static DDPM_HD float cos_turns(float u) {
#ifdef __CUDA_ARCH__
    return ::cospif(2.0f * u);
#else
    return ::cosf(6.283185307179586f * u);
#endif
  }
  static DDPM_HD float sin_turns(float u) {
#ifdef __CUDA_ARCH__
    return ::sinpif(2.0f * u);
#else
    return ::sinf(6.283185307179586f * u);
#endif
  }
};

template <> struct Prim<double> : ScalarPrim<double> {
  static DDPM_HD double exp(double x) { return ::exp(x); }
  static DDPM_HD double log(double x) { return ::log(x); }
  static DDPM_HD double sqrt(double x) { return ::sqrt(x); }
  static DDPM_HD double cos_turns(double u) { return ::cos(6.283185307179586 * u); }
  static DDPM_HD double sin_turns(double u) { return ::sin(6.283185307179586 * u); }
};

// ---- forward process, posterior, x0 prediction ----------------------------------------------------
// x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
template <class V> DDPM_HD V q_sample(V x0, V eps, V sqrt_abar, V sqrt_1m_abar) {
  return sqrt_abar * x0 + sqrt_1m_abar * eps;
}

// posterior mean post_c1 x0 + post_c2 x_t
template <class V> DDPM_HD V posterior_mean(V x0, V x_t, V post_c1, V post_c2) { return post_c1 * x0 + post_c2 * x_t; }

// x0 from the model's mean output (unclipped): epsilon / x0 / x_prev / v
template <class V>
DDPM_HD V predict_xstart(int mean_type, V mean_out, V x_t, V sqrt_recip_abar, V sqrt_recipm1_abar, V sqrt_abar,
                         V sqrt_1m_abar, V post_c1, V post_c2) {
  if (mean_type == kEpsilon) return sqrt_recip_abar * x_t - sqrt_recipm1_abar * mean_out;
  if (mean_type == kV) return sqrt_abar * x_t - sqrt_1m_abar * mean_out;
  if (mean_type == kXPrev) return (mean_out - post_c2 * x_t) / post_c1;
  return mean_out;  // kX0
}

// d(model mean)/d(mean output) for the (unclipped) mean type; reference._mean_grad_coef with sign
template <class S>
DDPM_HD S mean_grad_coef(int mean_type, S sqrt_recipm1_abar, S sqrt_1m_abar, S post_c1) {
  if (mean_type == kEpsilon) return -post_c1 * sqrt_recipm1_abar;
  if (mean_type == kV) return -post_c1 * sqrt_1m_abar;
  if (mean_type == kXPrev) return S(1);
  return post_c1;  // kX0
}

// the MSE target of the model's mean output
template <class V>
DDPM_HD V mean_target(int mean_type, V x0, V x_t, V eps, V sqrt_abar, V sqrt_1m_abar, V post_c1, V post_c2) {
  if (mean_type == kEpsilon) return eps;
  if (mean_type == kV) return sqrt_abar * eps - sqrt_1m_abar * x0;
  if (mean_type == kXPrev) return posterior_mean(x0, x_t, post_c1, post_c2);
  return x0;
}

// x0 post-processing: dynamic thresholding by the per-sample s (if thresholding), else clip to [-1, 1]
template <class V> DDPM_HD V process_xstart(V x0, bool clip, bool threshold, V thresh_scale) {
  using P = Prim<V>;
  if (threshold) return P::max(P::min(x0, thresh_scale), V(0) - thresh_scale) / thresh_scale;
  if (clip) return P::max(P::min(x0, V(1)), V(-1));
  return x0;
}

// ---- model variance ----------------------------------------------------------------------------------
// learned_range: frac = (v + 1) / 2, logvar = frac log(beta) + (1 - frac) post_logvar_clipped
template <class V> DDPM_HD V learned_range_logvar(V var_out, V max_logvar, V min_logvar) {
  V frac = (var_out + V(1)) / V(2);
  return frac * max_logvar + (V(1) - frac) * min_logvar;
}

// the per-sample log variance of a fixed variance type
template <class S> DDPM_HD S fixed_logvar(int var_type, const S* row) {
  return var_type == kFixedLarge ? row[kFixedLargeLogVar] : row[kPostLogVarClipped];
}

// ---- Gaussian KL -------------------------------------------------------------------------------------
// KL(N(m1, e^lv1) || N(m2, e^lv2)) = 0.5 (-1 + lv2 - lv1 + exp(lv1 - lv2) + (m1 - m2)^2 exp(-lv2))
template <class V> DDPM_HD V normal_kl(V m1, V lv1, V m2, V lv2) {
  using P = Prim<V>;
  V mean_diff = m1 - m2;
  return V(0.5) * (V(-1) + lv2 - lv1 + P::exp(lv1 - lv2) + mean_diff * mean_diff * P::exp(-lv2));
}

// The same KL given r = exp(lv1 - lv2) and exp(-lv2) precomputed by the caller: under a learned
// variance exp(-lv2) = r exp(-lv1) shares the one exp per element; under a fixed variance both are
// per-sample. Also returns the partial derivatives d/dm2 and d/dlv2 (d/dm1 = -d/dm2).
template <class V>
DDPM_HD V normal_kl_given_exps(V m1, V lv1, V m2, V lv2, V r, V exp_neg_lv2, V* d_m2, V* d_lv2) {
  V mean_diff = m1 - m2;
  V scaled_sq = mean_diff * mean_diff * exp_neg_lv2;  // (m1 - m2)^2 exp(-lv2)
  if (d_m2) *d_m2 = V(0) - mean_diff * exp_neg_lv2;
  if (d_lv2) *d_lv2 = V(0.5) * (V(1) - r - scaled_sq);
  return V(0.5) * (V(-1) + lv2 - lv1 + r + scaled_sq);
}

// all four partials of normal_kl (for its standalone backward)
template <class V>
DDPM_HD void normal_kl_grad(V m1, V lv1, V m2, V lv2, V* d_m1, V* d_lv1, V* d_m2, V* d_lv2) {
  using P = Prim<V>;
  V mean_diff = m1 - m2;
  V ratio = P::exp(lv1 - lv2);
  V exp_neg_lv2 = P::exp(-lv2);
  *d_m1 = mean_diff * exp_neg_lv2;
  *d_m2 = V(0) - mean_diff * exp_neg_lv2;
  *d_lv1 = V(0.5) * (ratio - V(1));
  *d_lv2 = V(0.5) * (V(1) - ratio - mean_diff * mean_diff * exp_neg_lv2);
}

// ---- discretized Gaussian decoder likelihood (L_0) -----------------------------------------------------
// cdf(y) ~ 0.5 (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3))) = sigmoid(cdf_logit(y)), with
// cdf_logit(y) = 2 sqrt(2/pi) (y + 0.044715 y^3): each tail comes from its own sigmoid (no 1 - cdf).
template <class V> DDPM_HD V cdf_logit(V y) { return V(1.5957691216057308) * (y + V(0.044715) * (y * y * y)); }

template <class V> DDPM_HD V sigmoid(V z) { return V(1) / (V(1) + Prim<V>::exp(V(0) - z)); }

// 1 - exp(-d) for d >= 0 without cancellation at small d (Horner series of (1 - e^-d) / d below 0.25)
template <class V> DDPM_HD V one_minus_exp_neg(V d) {
  using P = Prim<V>;
  auto small = P::lt(d, V(0.25));
  V ds = P::select(small, d, V(0));
  V p(1);
  const double inv[] = {1.0 / 12, 1.0 / 11, 1.0 / 10, 1.0 / 9, 1.0 / 8, 1.0 / 7, 1.0 / 6, 1.0 / 5, 1.0 / 4,
                        1.0 / 3, 1.0 / 2};
  for (double c : inv) p = V(1) - ds * V(c) * p;
  return P::select(small, ds * p, V(1) - P::exp(V(0) - d));
}

// log p(x) of x in [-1, 1] (256 bins, half-width 1/255, open edge bins below -0.999 / above 0.999)
// under N(mean, exp(log_scale)^2), log floored at 1e-12. inv_stdv = exp(-log_scale) is passed in
// (it is per-sample for fixed variances). Optional partials d/dmean and d/dlog_scale (d/dx = -d/dmean).
// With a = cdf_logit(y+), b = cdf_logit(y-), the bin mass is written without cancellation as
// sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - exp(-D)), D = a - b factored exactly, and its log
// is differentiated term by term (the same algebra as reference.py and triton/_math.py).
template <class V>
DDPM_HD V discretized_gaussian_loglik(V x, V mean, V inv_stdv, V* d_mean, V* d_log_scale) {
  using P = Prim<V>;
  const V k(1.5957691216057308), c(0.044715), floor(1e-12);
  V centered = x - mean;
  V yp = inv_stdv * (centered + V(1.0 / 255.0));
  V ym = inv_stdv * (centered - V(1.0 / 255.0));
  V width = inv_stdv * V(2.0 / 255.0);  // yp - ym, exactly
  V q = yp * yp + yp * ym + ym * ym;
  V a = cdf_logit(yp), b = cdf_logit(ym);
  V cdf_plus = sigmoid(a);                  // cdf(y+)
  V one_minus_cdf_min = sigmoid(V(0) - b);  // 1 - cdf(y-)
  V D = k * width * (V(1) + c * q);
  V one_m_exp = one_minus_exp_neg(D);
  V delta = cdf_plus * one_minus_cdf_min * one_m_exp;
  auto low = P::lt(x, V(-0.999));
  auto high = P::gt(x, V(0.999));
  V arg = P::select(low, cdf_plus, P::select(high, one_minus_cdf_min, delta));
  if (d_mean || d_log_scale) {
    // d log(arg) = -(m_term) inv_stdv dmean - (l_term) dlog_scale  (dy/dmean = -inv_stdv, dy/dlog_scale = -y)
    V dap = k * (V(1) + V(3) * c * yp * yp);  // da/dy+
    V dbm = k * (V(1) + V(3) * c * ym * ym);  // db/dy-
    V up = sigmoid(V(0) - a) * dap;           // d log sigmoid(a) / dy+
    V um = sigmoid(b) * dbm;                  // -d log sigmoid(-b) / dy-
    V r = P::exp(V(0) - D) / one_m_exp;       // d log(1 - exp(-D)) / dD
    V m_mid = up - um + r * (V(3) * k * c * width * (yp + ym));
    V l_mid = up * yp - um * ym + r * (k * width * (V(1) + V(3) * c * q));
    V m_term = P::select(low, up, P::select(high, V(0) - um, m_mid));
    V l_term = P::select(low, up * yp, P::select(high, V(0) - um * ym, l_mid));
    V live = P::select(P::ge(arg, floor), V(1), V(0));  // the floor passes no gradient
    if (d_mean) *d_mean = V(0) - live * inv_stdv * m_term;
    if (d_log_scale) *d_log_scale = V(0) - live * l_term;
  }
  return P::log(P::max(arg, floor));
}

// ---- loss weights and per-sample scalars ---------------------------------------------------------------
// reference.loss_weight: simple 1; elbo g^2 exp(-logvar) / (2 ln 2); min_snr by mean type
template <class S>
DDPM_HD S loss_weight(int weighting, int mean_type, int var_type, S min_snr_gamma, const S* row) {
  if (weighting == kElbo) {
    S logvar = var_type == kFixedLarge ? row[kFixedLargeLogVar] : row[kPostLogVarClipped];
    S grad_coef = mean_grad_coef(mean_type, row[kSqrtRecipm1Abar], row[kSqrt1mAbar], row[kPostC1]);
    return grad_coef * grad_coef * Prim<S>::exp(-logvar) / (S(2) * S(kLn2));
  }
  if (weighting == kMinSnr) {
    S snr = row[kSnr];
    S clipped = Prim<S>::min(snr, min_snr_gamma);
    if (mean_type == kEpsilon) return clipped / snr;
    if (mean_type == kV) return clipped / (snr + S(1));
    return clipped;  // kX0
  }
  return S(1);
}

// DDIM: sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev), and the eps weight
// sqrt(1 - abar_prev - sigma^2). With beta = 1 - abar / abar_prev (respaced schedules too) and
// r = beta / (1 - abar): sigma = eta sqrt(1 - abar_prev) sqrt(r), eps weight = sqrt(1 - abar_prev)
// sqrt(1 - eta^2 r) -- no cancellation where abar_prev is near 1 (as in reference.ddim_step).
template <class S> DDPM_HD void ddim_coefs(S eta, const S* row, S* sigma, S* sqrt_abar_prev, S* eps_coef) {
  using P = Prim<S>;
  S sqrt_1m_abar = row[kSqrt1mAbar], sqrt_1m_abar_prev = row[kSqrt1mAbarPrev];
  S beta_ratio = row[kBetas] / (sqrt_1m_abar * sqrt_1m_abar);  // r
  *sigma = eta * sqrt_1m_abar_prev * P::sqrt(beta_ratio);
  *sqrt_abar_prev = row[kSqrtAbarPrev];
  *eps_coef = sqrt_1m_abar_prev * P::sqrt(P::max(S(1) - eta * eta * beta_ratio, S(0)));
}

// DDIM update: eps re-derived from the processed x0 as (x_t - sqrt(abar) x0) / sqrt(1 - abar), the form
// that stays finite where abar = 0 (zero terminal SNR)
template <class V>
DDPM_HD V ddim_sample(V x0, V x_t, V sqrt_abar, V sqrt_1m_abar, V sqrt_abar_prev, V eps_coef) {
  V eps = (x_t - sqrt_abar * x0) / sqrt_1m_abar;
  return x0 * sqrt_abar_prev + eps_coef * eps;
}

// classifier-free guidance: the unconditional output moved towards the conditional one by `scale`
// (scale 1: the conditional output; 0: the unconditional one)
template <class V> DDPM_HD V guided_output(V uncond, V cond, V scale) { return uncond + scale * (cond - uncond); }

// ---- Philox 4x32-10 normal draws: the stream of triton.language.randn4x --------------------------------
// The N(0, 1) draw of counter g (a seeded step draws g = b * N + the element's row-major index) is lane
// g % 4 of tl.randn4x(seed, g / 4): one Philox-4x32-10 block per four draws, whose words (0, 1) and (2, 3)
// each give Box-Muller's two outputs, cosine (even g) then sine (odd g).
DDPM_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// the Philox key schedule: round r uses key (k0 + r 0x9E3779B9, k1 + r 0xBB67AE85)
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

// one Philox-4x32 round of counter (c0, c1, c2, c3) under key (k0, k1)
DDPM_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  uint32_t p0 = c0, p2 = c2;
  c0 = mulhi32(0xCD9E8D57u, p2) ^ c1 ^ k0;
  c2 = mulhi32(0xD2511F53u, p0) ^ c3 ^ k1;
  c1 = 0xCD9E8D57u * p2;
  c3 = 0xD2511F53u * p0;
}

// a Philox output word as a uniform [0, 1) float (triton.language's uint_to_uniform_float)
DDPM_HD float philox_to_uniform(uint32_t x) {
  int32_t a = static_cast<int32_t>(x);
  a = a < 0 ? ~a : a;
  return static_cast<float>(a) * 4.6566127342e-10f;
}

// the four output words (c0, c1, c2, c3) of Philox block `block` (counter (block, 0)) under key `seed`
DDPM_HD void philox_block(uint64_t seed, uint64_t block, uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3) {
  c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int i = 0; i < 10; ++i) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// draw g's two uniforms: (u_radius, u_turns) = words (0, 1) of its block for g % 4 in {0, 1}, else (2, 3);
// returns whether draw g is its pair's sine output (odd g)
DDPM_HD bool philox_pair_uniforms(uint64_t seed, uint64_t counter, float* u_radius, float* u_turns) {
  uint32_t c0, c1, c2, c3;
  philox_block(seed, counter >> 2, c0, c1, c2, c3);
  const bool second_pair = (counter & 2) != 0;
  *u_radius = philox_to_uniform(second_pair ? c2 : c0);
  *u_turns = philox_to_uniform(second_pair ? c3 : c1);
  return (counter & 1) != 0;
}

// Box-Muller's radius sqrt(-2 log u) (u clamped to >= 1e-7, as triton.language's pair_uniform_to_normal)
template <class V> DDPM_HD V box_muller_radius(V u_radius) {
  using P = Prim<V>;
  return P::sqrt(V(-2) * P::log(P::max(u_radius, V(1.0e-7f))));
}

// the N(0, 1) draw of counter g: box_muller_radius(u_radius) times cos or sin(2 pi u_turns)
DDPM_HD float philox_normal(uint64_t seed, uint64_t counter) {
  float u_radius, u_turns;
  const bool sine = philox_pair_uniforms(seed, counter, &u_radius, &u_turns);
  using P = Prim<float>;
  return box_muller_radius(u_radius) * (sine ? P::sin_turns(u_turns) : P::cos_turns(u_turns));
}

// the four draws of Philox block `block`: z_j = philox_normal(seed, 4 block + j), one block for all four
// (references, not an array: a CUDA caller's values stay in registers)
DDPM_HD void philox_normals4(uint64_t seed, uint64_t block, float& z0, float& z1, float& z2, float& z3) {
  uint32_t c0, c1, c2, c3;
  philox_block(seed, block, c0, c1, c2, c3);
  using P = Prim<float>;
  const float radius01 = box_muller_radius(philox_to_uniform(c0)), turns01 = philox_to_uniform(c1);
  const float radius23 = box_muller_radius(philox_to_uniform(c2)), turns23 = philox_to_uniform(c3);
  z0 = radius01 * P::cos_turns(turns01);
  z1 = radius01 * P::sin_turns(turns01);
  z2 = radius23 * P::cos_turns(turns23);
  z3 = radius23 * P::sin_turns(turns23);
}

}  // namespace ddpm
