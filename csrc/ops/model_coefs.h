// ops/model_coefs.h -- one sample's coefficients for the model's p(x_{t-1} | x_t): x0 prediction, model mean
// and log variance, shared by the bodies of predict_xstart, the sampler steps and the variational-bound losses.
#pragma once

#include "body.h"

namespace ddpm {

// The options of a body that reads a model output: its mean and variance types, x0 clipping, and dynamic
// thresholding by a per-sample scale.
template <class S> struct ModelOptions {
  int mean_type = kEpsilon, var_type = kFixedSmall;
  bool clip = false;
  const S* thresh = nullptr;  // [B] dynamic-threshold scale s, or nullptr
};

template <class S> struct ModelCoefs {
  int mean_type, var_type;
  bool clip, thresh_on;
  S sqrt_recip_abar, sqrt_recipm1_abar, sqrt_abar, sqrt_1m_abar, post_c1, post_c2;
  S thresh_scale;                       // this sample's dynamic-threshold s (1 without thresholding)
  S max_logvar, min_logvar;             // learned_range's bounds: log(beta), the clipped posterior log variance
  S fixed_log_variance;                 // the fixed variance types' log variance
  static DDPM_HD ModelCoefs make(const S* row, const ModelOptions<S>& options, int64_t b) {
    ModelCoefs m;
    m.mean_type = options.mean_type;
    m.var_type = options.var_type;
    m.clip = options.clip;
    m.thresh_on = options.thresh != nullptr;
    m.thresh_scale = options.thresh ? options.thresh[b] : S(1);
    m.sqrt_recip_abar = row[kSqrtRecipAbar];
    m.sqrt_recipm1_abar = row[kSqrtRecipm1Abar];
    m.sqrt_abar = row[kSqrtAbar];
    m.sqrt_1m_abar = row[kSqrt1mAbar];
    m.post_c1 = row[kPostC1];
    m.post_c2 = row[kPostC2];
    m.max_logvar = row[kLogBetas];
    m.min_logvar = row[kPostLogVarClipped];
    m.fixed_log_variance = fixed_logvar(options.var_type, row);
    return m;
  }
  // x0 predicted from the mean output, unclipped
  template <class V> DDPM_HD V pred_raw(V mean_out, V x_t) const {
    return predict_xstart(mean_type, mean_out, x_t, V(sqrt_recip_abar), V(sqrt_recipm1_abar), V(sqrt_abar),
                          V(sqrt_1m_abar), V(post_c1), V(post_c2));
  }
  // x0 predicted, then clipped or thresholded
  template <class V> DDPM_HD V pred(V mean_out, V x_t) const {
    return process_xstart(pred_raw(mean_out, x_t), clip, thresh_on, V(thresh_scale));
  }
  // the model mean given the processed x0 prediction
  template <class V> DDPM_HD V mean(V mean_out, V x_t, V pred_xstart) const {
    return mean_type == kXPrev ? mean_out : posterior_mean(pred_xstart, x_t, V(post_c1), V(post_c2));
  }
  // the model log variance given the variance output (ignored by the fixed types)
  template <class V> DDPM_HD V logvar(V var_out) const {
    if (var_type == kLearned) return var_out;
    if (var_type == kLearnedRange) return learned_range_logvar(var_out, V(max_logvar), V(min_logvar));
    return V(fixed_log_variance);
  }
};

}  // namespace ddpm
