// ops/forward_process.h -- the bodies of the forward-process family (ops/forward_process.cpp): q_sample and
// velocity, q_posterior's mean, predict_xstart, and linear_backward, the backward of q_sample, the posterior
// mean and predict_xstart (linear maps).
#pragma once

#include "body.h"
#include "model_coefs.h"

namespace ddpm {

// The two linear maps of (x0, noise) at t: x_t = q_sample(x0, noise), or with options.velocity the
// v-prediction target v = sqrt(abar) noise - sqrt(1 - abar) x0 (mean_target of mean type v; the op velocity).
template <class S> struct QSampleElem {
  struct Options {
    bool velocity = false;
  };
  enum In : int { in_x0, in_noise, kNumIn };
  enum Out : int { out_x_t, kNumOut };
  static constexpr int NI = kNumIn, NO = kNumOut, NR = 0;
  S sqrt_abar, sqrt_1m_abar;
  bool velocity;
  static DDPM_HD QSampleElem make(const S* row, const Options& options, int64_t, int64_t) {
    return {row[kSqrtAbar], row[kSqrt1mAbar], options.velocity};
  }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    out[out_x_t] = velocity ? mean_target(int(kV), in[in_x0], in[in_x0], in[in_noise], V(sqrt_abar), V(sqrt_1m_abar),
                                          V(0), V(0))
                            : q_sample(in[in_x0], in[in_noise], V(sqrt_abar), V(sqrt_1m_abar));
  }
};
DDPM_BODY(QSampleElem)

// The forward op whose backward linear_backward computes (its `kind` argument).
enum LinearOp : int { kLinearQSample = 0, kLinearPosteriorMean = 1, kLinearPredictXstart = 2 };

// Backward of a linear op y = coef_first a + coef_second b: the gradients w.r.t. its two inputs
// (q_sample: x0, noise; posterior mean: x0, x_t; predict_xstart: model output, x_t).
template <class S> struct LinearBackwardElem {
  struct Options {
    int op = kLinearQSample;
    int mean_type = kEpsilon;  // of predict_xstart
  };
  enum In : int { in_grad, kNumIn };
  enum Out : int { out_grad_first, out_grad_second, kNumOut };
  static constexpr int NI = kNumIn, NO = kNumOut, NR = 0;
  S coef_first, coef_second;
  static DDPM_HD LinearBackwardElem make(const S* row, const Options& options, int64_t, int64_t) {
    if (options.op == kLinearQSample) return {row[kSqrtAbar], row[kSqrt1mAbar]};
    if (options.op == kLinearPosteriorMean) return {row[kPostC1], row[kPostC2]};
    // predict_xstart(out, x_t): d/dout and d/dx_t per mean type
    if (options.mean_type == kEpsilon) return {-row[kSqrtRecipm1Abar], row[kSqrtRecipAbar]};
    if (options.mean_type == kV) return {-row[kSqrt1mAbar], row[kSqrtAbar]};
    if (options.mean_type == kXPrev) return {S(1) / row[kPostC1], -row[kPostC2] / row[kPostC1]};
    return {S(1), S(0)};
  }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    out[out_grad_first] = V(coef_first) * in[in_grad];
    out[out_grad_second] = V(coef_second) * in[in_grad];
  }
};
DDPM_BODY(LinearBackwardElem)

// The mean of q(x_{t-1} | x_t, x0).
template <class S> struct PosteriorElem {
  struct Options {};
  enum In : int { in_x0, in_x_t, kNumIn };
  enum Out : int { out_mean, kNumOut };
  static constexpr int NI = kNumIn, NO = kNumOut, NR = 0;
  S post_c1, post_c2;
  static DDPM_HD PosteriorElem make(const S* row, const Options&, int64_t, int64_t) {
    return {row[kPostC1], row[kPostC2]};
  }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    out[out_mean] = posterior_mean(in[in_x0], in[in_x_t], V(post_c1), V(post_c2));
  }
};
DDPM_BODY(PosteriorElem)

// predict_xstart (unclipped) from the model's mean output.
template <class S> struct PredictElem {
  using Options = ModelOptions<S>;  // mean_type only
  enum In : int { in_mean_out, in_x_t, kNumIn };
  enum Out : int { out_pred_xstart, kNumOut };
  static constexpr int NI = kNumIn, NO = kNumOut, NR = 0;
  ModelCoefs<S> model;
  static DDPM_HD PredictElem make(const S* row, const Options& options, int64_t b, int64_t) {
    return {ModelCoefs<S>::make(row, options, b)};
  }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    out[out_pred_xstart] = model.pred_raw(in[in_mean_out], in[in_x_t]);
  }
};
DDPM_BODY(PredictElem)

}  // namespace ddpm
