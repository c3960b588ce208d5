// ops/elementwise.h -- the bodies of the broadcasting elementwise family (ops/elementwise.cpp): normal_kl,
// discretized_gaussian_log_likelihood and their backwards. No table, no options.
#pragma once

#include "body.h"

namespace ddpm {

// KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element.
template <class S> struct NormalKlElem {
  struct Options {};
  enum In : int { in_mean1, in_logvar1, in_mean2, in_logvar2, kNumIn };
  enum Out : int { out_kl, kNumOut };
  static constexpr int NI = kNumIn, NO = kNumOut, NR = 0;
  static DDPM_HD NormalKlElem make(const S*, const Options&, int64_t, int64_t) { return {}; }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    out[out_kl] = normal_kl(in[in_mean1], in[in_logvar1], in[in_mean2], in[in_logvar2]);
  }
};
DDPM_BODY(NormalKlElem)

// normal_kl's backward: the incoming gradient times each partial.
template <class S> struct NormalKlBackwardElem {
  struct Options {};
  enum In : int { in_grad, in_mean1, in_logvar1, in_mean2, in_logvar2, kNumIn };
  enum Out : int { out_grad_mean1, out_grad_logvar1, out_grad_mean2, out_grad_logvar2, kNumOut };
  static constexpr int NI = kNumIn, NO = kNumOut, NR = 0;
  static DDPM_HD NormalKlBackwardElem make(const S*, const Options&, int64_t, int64_t) { return {}; }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    V d_mean1, d_logvar1, d_mean2, d_logvar2;
    normal_kl_grad(in[in_mean1], in[in_logvar1], in[in_mean2], in[in_logvar2], &d_mean1, &d_logvar1, &d_mean2,
                   &d_logvar2);
    out[out_grad_mean1] = in[in_grad] * d_mean1;
    out[out_grad_logvar1] = in[in_grad] * d_logvar1;
    out[out_grad_mean2] = in[in_grad] * d_mean2;
    out[out_grad_logvar2] = in[in_grad] * d_logvar2;
  }
};
DDPM_BODY(NormalKlBackwardElem)

// The discretized Gaussian log-likelihood of x per element.
template <class S> struct DgllElem {
  struct Options {};
  enum In : int { in_x, in_means, in_log_scales, kNumIn };
  enum Out : int { out_log_prob, kNumOut };
  static constexpr int NI = kNumIn, NO = kNumOut, NR = 0;
  static DDPM_HD DgllElem make(const S*, const Options&, int64_t, int64_t) { return {}; }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    V inv_std = Prim<V>::exp(V(0) - in[in_log_scales]);
    out[out_log_prob] = discretized_gaussian_loglik(in[in_x], in[in_means], inv_std, (V*)nullptr, (V*)nullptr);
  }
};
DDPM_BODY(DgllElem)

// Its backward: the incoming gradient times each partial (d/dx = -d/dmeans).
template <class S> struct DgllBackwardElem {
  struct Options {};
  enum In : int { in_grad, in_x, in_means, in_log_scales, kNumIn };
  enum Out : int { out_grad_x, out_grad_means, out_grad_log_scales, kNumOut };
  static constexpr int NI = kNumIn, NO = kNumOut, NR = 0;
  static DDPM_HD DgllBackwardElem make(const S*, const Options&, int64_t, int64_t) { return {}; }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    V inv_std = Prim<V>::exp(V(0) - in[in_log_scales]);
    V d_means, d_log_scales;
    discretized_gaussian_loglik(in[in_x], in[in_means], inv_std, &d_means, &d_log_scales);
    out[out_grad_x] = V(0) - in[in_grad] * d_means;
    out[out_grad_means] = in[in_grad] * d_means;
    out[out_grad_log_scales] = in[in_grad] * d_log_scales;
  }
};
DDPM_BODY(DgllBackwardElem)

}  // namespace ddpm
