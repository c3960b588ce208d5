// ops/losses.h -- the bodies of the loss family (ops/losses.cpp): vb_terms_bpd, training_losses (with and
// without a vb term), their shared backward scale_halves, prior_bpd and its backward.
#pragma once

#include "body.h"
#include "model_coefs.h"

namespace ddpm {

// The variational-bound element (KL for t > 0, decoder NLL for t = 0) given the model mean and log variance;
// returns the term in nats and its partials d/d(model mean) and d/d(model log variance).
template <class S> struct VbCoefs {
  bool t0, learned;
  S post_logvar, exp_neg_post_logvar;                  // the posterior's clipped log variance lv1, exp(-lv1)
  S fixed_logvar_model, ratio_fixed, exp_neg_fixed_logvar, inv_std_fixed;  // under a fixed model variance
  static DDPM_HD VbCoefs make(const S* row, int var_type, bool learned, int64_t t) {
    VbCoefs c;
    c.t0 = t == 0;
    c.learned = learned;
    c.post_logvar = row[kPostLogVarClipped];
    c.exp_neg_post_logvar = Prim<S>::exp(-c.post_logvar);
    S model_logvar = fixed_logvar(var_type, row);
    c.fixed_logvar_model = model_logvar;
    c.ratio_fixed = Prim<S>::exp(c.post_logvar - model_logvar);
    c.exp_neg_fixed_logvar = Prim<S>::exp(-model_logvar);
    c.inv_std_fixed = Prim<S>::exp(-(S(0.5) * model_logvar));
    return c;
  }
  template <class V>
  DDPM_HD V term(V x0, V post_mean, V model_mean, V model_logvar, V* d_model_mean, V* d_model_logvar) const {
    if (!t0) {
      if (!learned)
        return normal_kl_given_exps(post_mean, V(post_logvar), model_mean, model_logvar, V(ratio_fixed),
                                    V(exp_neg_fixed_logvar), d_model_mean, d_model_logvar);
      // one exp per element: r = exp(lv1 - lv2) exactly as the reference (its cancellation against
      // -1 + lv2 - lv1 sets the KL's accuracy); exp(-lv2) = r exp(-lv1) only scales (m1 - m2)^2
      V ratio = Prim<V>::exp(V(post_logvar) - model_logvar);
      return normal_kl_given_exps(post_mean, V(post_logvar), model_mean, model_logvar, ratio,
                                  ratio * V(exp_neg_post_logvar), d_model_mean, d_model_logvar);
    }
    V inv_std = learned ? Prim<V>::exp(V(0) - V(0.5) * model_logvar) : V(inv_std_fixed);
    V d_mean, d_log_scale;
    V log_likelihood = discretized_gaussian_loglik(x0, model_mean, inv_std, d_model_mean ? &d_mean : nullptr,
                                                   d_model_logvar ? &d_log_scale : nullptr);
    if (d_model_mean) *d_model_mean = V(0) - d_mean;
    if (d_model_logvar) *d_model_logvar = V(-0.5) * d_log_scale;
    return V(0) - log_likelihood;
  }
};

// The vb term (nats) at one element from the model's mean and variance output (VbCoefs::term; the posterior
// mean from x0 and x_t, the model log variance from var_out); its partials through the non-null pointers.
template <class S, class V>
DDPM_HD V vb_term_nats(const ModelCoefs<S>& model, const VbCoefs<S>& vb, V x0, V x_t, V model_mean, V var_out,
                       V* d_model_mean, V* d_model_logvar) {
  V model_logvar = model.logvar(var_out);
  V post_mean = posterior_mean(x0, x_t, V(model.post_c1), V(model.post_c2));
  return vb.term(x0, post_mean, model_mean, model_logvar, d_model_mean, d_model_logvar);
}

// d(log variance)/d(variance output) for learned types
template <class S> DDPM_HD S logvar_grad_coef(int var_type, const S* row) {
  return var_type == kLearnedRange ? S(0.5) * (row[kLogBetas] - row[kPostLogVarClipped]) : S(1);
}

// run(c) for a copy c of element e (ModelCoefs model, VbCoefs vb, flags learned and need_grad) whose options
// are constants, when `hybrid` holds and e is in the vb term's hot configuration (epsilon mean, learned-range
// variance, t > 0, no clipping; fix(c) sets e's own options); run(e) otherwise. A CPU loop over c then folds
// its option tests away (the hybrid loss's loop: half the instructions).
template <class E, class Fix, class Run> DDPM_HD void with_hybrid_constants(const E& e, bool hybrid, Fix fix, Run&& run) {
  if (!(hybrid && e.learned && !e.vb.t0 && !e.model.clip && e.model.mean_type == kEpsilon &&
        e.model.var_type == kLearnedRange))
    return run(e);
  E c = e;
  fix(c);
  c.learned = c.vb.learned = true;
  c.vb.t0 = c.model.clip = false;
  c.model.mean_type = kEpsilon;
  c.model.var_type = kLearnedRange;
  c.need_grad = true;
  if (e.need_grad) return run(c);
  c.need_grad = false;
  run(c);
}

// The options of a per-sample mean over a sample's N elements.
template <class S> struct MeanOptions {
  S numel = S(1), inv_numel = S(1);  // N, 1 / N
};

// vb_terms_bpd: the vb term (nats, summed) and, with need_grad, its unit gradients w.r.t. the mean and
// variance outputs (scaled per sample by scale_halves in the backward).
template <class S> struct VbElem {
  struct Options : ModelOptions<S>, MeanOptions<S> {
    bool need_grad = false;
  };
  enum In : int { in_mean_out, in_var_out, in_x0, in_x_t, kNumIn };
  enum Out : int { out_grad_mean_out, out_grad_var_out, kNumOut };
  enum Sum : int { sum_vb_nats, kNumSums };
  enum Final : int { final_vb_bpd, kNumFinals };
  static constexpr int NI = kNumIn, NO = kNumOut, NR = kNumSums, NF = kNumFinals;
  static constexpr int kMinBlocksPerSm = 3;  // CUDA: at 4 blocks/SM (64 registers) sm_90 spills / needs a stack
  ModelCoefs<S> model;
  VbCoefs<S> vb;
  bool need_grad, learned;
  S grad_mean_coef, grad_var_coef;  // d(model mean)/d(mean out) and d(log variance)/d(var out), times 1 / (N ln 2)
  static DDPM_HD VbElem make(const S* row, const Options& options, int64_t b, int64_t t) {
    VbElem e;
    e.model = ModelCoefs<S>::make(row, options, b);
    e.learned = is_learned(options.var_type);
    e.vb = VbCoefs<S>::make(row, options.var_type, e.learned, t);
    e.need_grad = options.need_grad;
    S scale = options.inv_numel / S(kLn2);
    e.grad_mean_coef = mean_grad_coef(options.mean_type, row[kSqrtRecipm1Abar], row[kSqrt1mAbar], row[kPostC1]) * scale;
    e.grad_var_coef = logvar_grad_coef(options.var_type, row) * scale;
    return e;
  }
  static DDPM_HD void finish(const S*, const Options& options, int64_t, const S* sums, S* finals) {
    finals[final_vb_bpd] = sums[sum_vb_nats] / options.numel / S(kLn2);
  }
  // vb_terms_bpd of a learned-range model with constant options for a CPU loop (with_hybrid_constants)
  template <class Run> DDPM_HD void specialized(Run&& run) const {
    with_hybrid_constants(*this, true, [](VbElem&) {}, run);
  }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V* sums) const {
    V x0 = in[in_x0], x_t = in[in_x_t];
    V pred_raw = model.pred_raw(in[in_mean_out], x_t);
    V pred_xstart = process_xstart(pred_raw, model.clip, false, V(1));
    V model_mean = model.mean(in[in_mean_out], x_t, pred_xstart);
    V var_out = learned ? in[in_var_out] : V(0);
    if (!need_grad) {
      sums[sum_vb_nats] = vb_term_nats(model, vb, x0, x_t, model_mean, var_out, (V*)nullptr, (V*)nullptr);
      return;
    }
    V d_model_mean, d_model_logvar;
    sums[sum_vb_nats] = vb_term_nats(model, vb, x0, x_t, model_mean, var_out, &d_model_mean, &d_model_logvar);
    V grad_mean(grad_mean_coef);
    if (model.clip && model.mean_type != kXPrev) {  // clamp passes the gradient inside [-1, 1]
      using P = Prim<V>;
      grad_mean = P::select(P::land(P::ge(pred_raw, V(-1)), P::le(pred_raw, V(1))), grad_mean, V(0));
    }
    out[out_grad_mean_out] = d_model_mean * grad_mean;
    if (learned) out[out_grad_var_out] = d_model_logvar * V(grad_var_coef);
  }
};
DDPM_BODY(VbElem)

// training_losses: the squared error and the vb term (nats, summed) and the unit gradients w.r.t. the mean
// output (of the MSE for MSE losses, of the vb term for KL losses) and the variance output (of the vb term).
template <class S> struct TrainElem {
  struct Options : MeanOptions<S> {
    int mean_type = kEpsilon, var_type = kFixedSmall, loss_type = kMse, weighting = kSimple;
    S min_snr_gamma = S(5);
    S vb_scale = S(1);  // hybrid losses: T / 1000 under rescaled_mse, else 1
    S kl_scale = S(1);  // kl losses: T under rescaled_kl, else 1
    bool need_grad = false;
  };
  enum In : int { in_mean_out, in_var_out, in_x0, in_noise, kNumIn };
  enum Out : int { out_grad_mean_out, out_grad_var_out, kNumOut };
  enum Sum : int { sum_squared_error, sum_vb_nats, kNumSums };
  enum Final : int { final_loss, final_mse, final_vb, final_mse_weight, kNumFinals };
  static constexpr int NI = kNumIn, NO = kNumOut, NR = kNumSums, NF = kNumFinals;
  static constexpr int kMinBlocksPerSm = 3;  // CUDA: at 4 blocks/SM (64 registers) sm_90 spills / needs a stack
  ModelCoefs<S> model;
  VbCoefs<S> vb;
  bool kl_loss, need_vb, need_grad, learned;
  S grad_mse_coef, grad_mean_coef, grad_var_coef;
  static DDPM_HD TrainElem make(const S* row, const Options& options, int64_t b, int64_t t) {
    TrainElem e;
    ModelOptions<S> model_options;
    model_options.mean_type = options.mean_type;
    model_options.var_type = options.var_type;
    e.model = ModelCoefs<S>::make(row, model_options, b);
    e.learned = is_learned(options.var_type);
    e.vb = VbCoefs<S>::make(row, options.var_type, e.learned, t);
    e.kl_loss = options.loss_type == kKl || options.loss_type == kRescaledKl;
    e.need_vb = e.kl_loss || e.learned;
    e.need_grad = options.need_grad;
    S scale = options.inv_numel / S(kLn2);
    e.grad_mse_coef = S(-2) * options.inv_numel;
    e.grad_mean_coef = mean_grad_coef(options.mean_type, row[kSqrtRecipm1Abar], row[kSqrt1mAbar], row[kPostC1]) * scale;
    e.grad_var_coef = logvar_grad_coef(options.var_type, row) * scale;
    return e;
  }
  static DDPM_HD void finish(const S* row, const Options& options, int64_t, const S* sums, S* finals) {
    S mse = sums[sum_squared_error] / options.numel;
    S vb = sums[sum_vb_nats] / options.numel / S(kLn2);
    S weight = loss_weight(options.weighting, options.mean_type, options.var_type, options.min_snr_gamma, row);
    const bool learned = is_learned(options.var_type);
    if (options.loss_type == kKl || options.loss_type == kRescaledKl) {
      finals[final_loss] = vb * options.kl_scale;
      finals[final_mse] = S(0);
      finals[final_vb] = vb;
    } else {
      S loss = weight * mse;
      if (learned) {
        vb = vb * options.vb_scale;
        loss = loss + vb;
      }
      finals[final_loss] = loss;
      finals[final_mse] = mse;
      finals[final_vb] = learned ? vb : S(0);
    }
    finals[final_mse_weight] = weight;
  }
  // the MSE term: sums[sum_squared_error] = (target - out)^2, out[out_grad_mean_out] = its unit gradient
  template <class V> DDPM_HD void mse_term(const V* in, V* out, V* sums) const {
    V mean_out = in[in_mean_out], x0 = in[in_x0], noise = in[in_noise];
    V x_t = q_sample(x0, noise, V(model.sqrt_abar), V(model.sqrt_1m_abar));
    V error = mean_target(model.mean_type, x0, x_t, noise, V(model.sqrt_abar), V(model.sqrt_1m_abar),
                          V(model.post_c1), V(model.post_c2)) - mean_out;
    sums[sum_squared_error] = error * error;
    if (need_grad) out[out_grad_mean_out] = V(grad_mse_coef) * error;
  }
  // the hybrid loss (MSE + vb term) with constant options for a CPU loop (with_hybrid_constants)
  template <class Run> DDPM_HD void specialized(Run&& run) const {
    with_hybrid_constants(*this, !kl_loss, [](TrainElem& c) { c.kl_loss = false, c.need_vb = true; }, run);
  }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V* sums) const {
    sums[sum_squared_error] = V(0);
    sums[sum_vb_nats] = V(0);
    if (!kl_loss) mse_term(in, out, sums);
    if (!need_vb) return;
    V mean_out = in[in_mean_out], x0 = in[in_x0], noise = in[in_noise];
    V x_t = q_sample(x0, noise, V(model.sqrt_abar), V(model.sqrt_1m_abar));
    V model_mean = model.mean(mean_out, x_t, model.pred_raw(mean_out, x_t));
    V var_out = learned ? in[in_var_out] : V(0);
    if (!need_grad) {
      sums[sum_vb_nats] = vb_term_nats(model, vb, x0, x_t, model_mean, var_out, (V*)nullptr, (V*)nullptr);
      return;
    }
    V d_model_mean, d_model_logvar;
    // two calls with constant pointers rather than one with `kl_loss ? &d_model_mean : nullptr`: a pointer chosen
    // at run time keeps d_model_mean in memory (an 8-byte stack frame in the sm_90 kernel)
    if (kl_loss) {
      sums[sum_vb_nats] = vb_term_nats(model, vb, x0, x_t, model_mean, var_out, &d_model_mean, &d_model_logvar);
      out[out_grad_mean_out] = d_model_mean * V(grad_mean_coef);
    } else {  // hybrid losses: the vb term sees the model mean detached
      sums[sum_vb_nats] = vb_term_nats(model, vb, x0, x_t, model_mean, var_out, (V*)nullptr, &d_model_logvar);
    }
    if (learned) out[out_grad_var_out] = d_model_logvar * V(grad_var_coef);
  }
};
DDPM_BODY(TrainElem)

// training_losses without a vb term (an MSE loss, fixed variance): TrainElem's MSE term alone, so that the
// kernel's loop carries none of the vb code.
template <class S> struct TrainMseElem : TrainElem<S> {
  static constexpr int kMinBlocksPerSm = 4;  // (not TrainElem's: no vb code)
  static DDPM_HD TrainMseElem make(const S* row, const typename TrainElem<S>::Options& options, int64_t b, int64_t t) {
    return {TrainElem<S>::make(row, options, b, t)};
  }
  template <class Run> DDPM_HD void specialized(Run&& run) const { run(*this); }  // (not TrainElem's)
  template <class V> DDPM_HD void operator()(const V* in, V* out, V* sums) const {
    this->mse_term(in, out, sums);
    sums[TrainElem<S>::sum_vb_nats] = V(0);
  }
};
DDPM_BODY(TrainMseElem)

// Backward of training_losses / vb_terms_bpd: the saved unit gradients scaled per sample, the scales built
// from the per-sample gradients of the three terms (each [B]; an absent one is nullptr and reads 0):
//   scale_mean = loss_mean * g_loss * w + mse_mean * g_mse + vb_mean * g_vb    (w: the MSE weight, 1 if absent)
//   scale_var  = loss_var * g_loss + vb_var * g_vb
// (the coefficients per loss type: losses.cpp's loss_scales). All of it in the kernel, none as separate [B] ops:
// compiled autograd traces the backward with placeholder gradients only an op's fake impl accepts.
template <class S> struct ScaleElem {
  // a [B] per-sample value read with its stride (a gradient from sum() or mean() is an expanded scalar: stride 0)
  struct PerSample {
    const S* data = nullptr;
    int64_t stride = 1;
    DDPM_HD S at(int64_t b, S absent) const { return data ? data[b * stride] : absent; }
  };
  struct Options {
    PerSample g_loss, g_mse, g_vb, w;
    S loss_mean = S(0), mse_mean = S(0), vb_mean = S(0), loss_var = S(0), vb_var = S(0);
  };
  enum In : int { in_unit_grad_mean, in_unit_grad_var, kNumIn };
  enum Out : int { out_grad_mean_out, out_grad_var_out, kNumOut };
  static constexpr int NI = kNumIn, NO = kNumOut, NR = 0;
  S scale_mean, scale_var;
  static DDPM_HD ScaleElem make(const S*, const Options& o, int64_t b, int64_t) {
    const S g_loss = o.g_loss.at(b, S(0)), g_mse = o.g_mse.at(b, S(0)), g_vb = o.g_vb.at(b, S(0)), w = o.w.at(b, S(1));
    return {o.loss_mean * g_loss * w + o.mse_mean * g_mse + o.vb_mean * g_vb, o.loss_var * g_loss + o.vb_var * g_vb};
  }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    out[out_grad_mean_out] = V(scale_mean) * in[in_unit_grad_mean];
    out[out_grad_var_out] = V(scale_var) * in[in_unit_grad_var];
  }
};
DDPM_BODY(ScaleElem)

// prior_bpd: KL(N(sqrt(abar_{T-1}) x0, 1 - abar_{T-1}) || N(0, 1)) summed (nats), then in bits/dim.
template <class S> struct PriorElem {
  using Options = MeanOptions<S>;
  enum In : int { in_x0, kNumIn };
  enum Sum : int { sum_kl_nats, kNumSums };
  enum Final : int { final_prior_bpd, kNumFinals };
  static constexpr int NI = kNumIn, NO = 0, NR = kNumSums, NF = kNumFinals;
  S sqrt_abar, log_1m_abar, one_m_abar;  // the last timestep's
  static DDPM_HD PriorElem make(const S* row, const Options&, int64_t, int64_t) {
    return {row[kSqrtAbar], row[kLog1mAbar], Prim<S>::exp(row[kLog1mAbar])};
  }
  static DDPM_HD void finish(const S*, const Options& options, int64_t, const S* sums, S* finals) {
    finals[final_prior_bpd] = sums[sum_kl_nats] / options.numel / S(kLn2);
  }
  template <class V> DDPM_HD void operator()(const V* in, V*, V* sums) const {
    sums[sum_kl_nats] = normal_kl_given_exps(V(sqrt_abar) * in[in_x0], V(log_1m_abar), V(0), V(0), V(one_m_abar),
                                             V(1), (V*)nullptr, (V*)nullptr);
  }
};
DDPM_BODY(PriorElem)

// prior_bpd backward: grad x0 = grad_b sqrt(abar)^2 x0 / (N ln 2).
template <class S> struct PriorBackwardElem {
  struct Options : MeanOptions<S> {
    const S* grad = nullptr;  // [B] gradient of prior_bpd's output
  };
  enum In : int { in_x0, kNumIn };
  enum Out : int { out_grad_x0, kNumOut };
  static constexpr int NI = kNumIn, NO = kNumOut, NR = 0;
  S sqrt_abar, scale;
  static DDPM_HD PriorBackwardElem make(const S* row, const Options& options, int64_t b, int64_t) {
    return {row[kSqrtAbar], options.grad[b] * options.inv_numel / S(kLn2)};
  }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    V mean = V(sqrt_abar) * in[in_x0], d_mean;
    // d KL / d mean1 = (m1 - m2) exp(-lv2) = mean for the standard normal
    normal_kl_given_exps(mean, V(0), V(0), V(0), V(1), V(1), &d_mean, (V*)nullptr);
    out[out_grad_x0] = V(scale) * V(sqrt_abar) * (V(0) - d_mean);
  }
};
DDPM_BODY(PriorBackwardElem)

}  // namespace ddpm
