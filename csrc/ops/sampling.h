// ops/sampling.h -- the bodies of the sampling family (ops/sampling.cpp): p_mean_variance, the ancestral
// DDPM step p_sample_step and the DDIM step ddim_step.
#pragma once

#include "body.h"
#include "model_coefs.h"

namespace ddpm {

// p_mean_variance: the model's mean, log variance and variance (learned types only; fixed ones are per-sample
// and gathered by the host) and the processed x0 prediction.
template <class S> struct PMeanVarElem {
  using Options = ModelOptions<S>;
  enum In : int { in_mean_out, in_var_out, in_x_t, kNumIn };
  enum Out : int { out_mean, out_log_variance, out_variance, out_pred_xstart, kNumOut };
  static constexpr int NI = kNumIn, NO = kNumOut, NR = 0;
  static constexpr int kMinBlocksPerSm = 3;  // CUDA: at 4 blocks/SM (64 registers) sm_90 needs a stack
  ModelCoefs<S> model;
  bool learned;
  static DDPM_HD PMeanVarElem make(const S* row, const Options& options, int64_t b, int64_t) {
    return {ModelCoefs<S>::make(row, options, b), is_learned(options.var_type)};
  }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    V pred_xstart = model.pred(in[in_mean_out], in[in_x_t]);
    out[out_mean] = model.mean(in[in_mean_out], in[in_x_t], pred_xstart);
    if (learned) {
      V log_variance = model.logvar(in[in_var_out]);
      out[out_log_variance] = log_variance;
      out[out_variance] = Prim<V>::exp(log_variance);
    }
    out[out_pred_xstart] = pred_xstart;
  }
};
DDPM_BODY(PMeanVarElem)

// The ancestral step: mean + std noise (no noise at t = 0).
template <class S> struct PSampleElem {
  using Options = ModelOptions<S>;
  enum In : int { in_mean_out, in_var_out, in_x_t, in_noise, kNumIn };
  enum Out : int { out_sample, out_pred_xstart, kNumOut };
  static constexpr int NI = kNumIn, NO = kNumOut, NR = 0;
  static constexpr bool kMayDrawNoise = true;  // its noise input may be drawn in-kernel (Philox)
  ModelCoefs<S> model;
  bool learned;
  S noise_on;   // 1 for t > 0, 0 at t = 0
  S fixed_std;  // the fixed variance types' standard deviation
  static DDPM_HD PSampleElem make(const S* row, const Options& options, int64_t b, int64_t t) {
    PSampleElem e{ModelCoefs<S>::make(row, options, b), is_learned(options.var_type), t != 0 ? S(1) : S(0), S(0)};
    e.fixed_std = Prim<S>::exp(S(0.5) * e.model.fixed_log_variance);
    return e;
  }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    V pred_xstart = model.pred(in[in_mean_out], in[in_x_t]);
    V mean = model.mean(in[in_mean_out], in[in_x_t], pred_xstart);
    V std = learned ? Prim<V>::exp(V(0.5) * model.logvar(in[in_var_out])) : V(fixed_std);
    out[out_sample] = mean + V(noise_on) * std * in[in_noise];
    out[out_pred_xstart] = pred_xstart;
  }
};
DDPM_BODY(PSampleElem)

// The DDIM step with eta (noise only when eta != 0, none at t = 0).
template <class S> struct DdimElem {
  struct Options : ModelOptions<S> {
    S eta = S(0);
  };
  enum In : int { in_mean_out, in_x_t, in_noise, kNumIn };
  enum Out : int { out_sample, out_pred_xstart, kNumOut };
  static constexpr int NI = kNumIn, NO = kNumOut, NR = 0;
  static constexpr bool kMayDrawNoise = true;  // its noise input may be drawn in-kernel (Philox)
  ModelCoefs<S> model;
  S noise_scale;  // sigma (0 at t = 0)
  S sqrt_abar, sqrt_1m_abar, sqrt_abar_prev, eps_coef;
  bool add_noise;
  static DDPM_HD DdimElem make(const S* row, const Options& options, int64_t b, int64_t t) {
    DdimElem e;
    e.model = ModelCoefs<S>::make(row, options, b);
    S sigma;
    ddim_coefs(options.eta, row, &sigma, &e.sqrt_abar_prev, &e.eps_coef);
    e.sqrt_abar = row[kSqrtAbar];
    e.sqrt_1m_abar = row[kSqrt1mAbar];
    e.add_noise = options.eta != S(0);
    e.noise_scale = (t != 0 ? S(1) : S(0)) * sigma;
    return e;
  }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    V pred_xstart = model.pred(in[in_mean_out], in[in_x_t]);
    V sample = ddim_sample(pred_xstart, in[in_x_t], V(sqrt_abar), V(sqrt_1m_abar), V(sqrt_abar_prev), V(eps_coef));
    if (add_noise) sample = sample + V(noise_scale) * in[in_noise];
    out[out_sample] = sample;
    out[out_pred_xstart] = pred_xstart;
  }
};
DDPM_BODY(DdimElem)

}  // namespace ddpm
