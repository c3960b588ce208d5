// ddpm_elem.h -- per-op element bodies shared by the CPU and CUDA drivers.
//
// Each body is a struct holding one sample's scalar coefficients (built once per sample from its
// table row by make()) and an operator()<V> that maps NI input values to NO output values and NR
// reduction contributions for one element (V = float/double, or Vectorized<float/double> on CPU).
// Bodies only compose the formulas of ddpm_math.h; a nullptr/absent input is never read.
#pragma once

#include "ddpm_math.h"

namespace ddpm {

// Options and per-sample arrays an op passes to make(); pointers are on the kernel's device.
template <class S> struct Params {
  int mean_type = 0, var_type = 0, loss_type = 0, weighting = 0, kind = 0;
  bool clip = false, need_grad = false, learned = false;
  S min_snr_gamma = S(5), eta = S(0), inv_n = S(1), numel = S(1);
  S vb_scale = S(1);  // hybrid losses: T / 1000 under rescaled_mse, else 1
  S kl_scale = S(1);  // kl losses: T under rescaled_kl, else 1
  const S* thresh = nullptr;  // [B] dynamic-threshold scale s, or nullptr
  const S* s_a = nullptr;     // [B] per-sample scales (backward ops)
  const S* s_b = nullptr;
};

// x_t = q_sample(x0, eps).  in: x0, eps.  out: x_t.
template <class S> struct QSampleElem {
  static constexpr int NI = 2, NO = 1, NR = 0;
  S sa, s1a;
  static DDPM_HD QSampleElem make(const S* row, const Params<S>&, int64_t, int64_t) {
    return {row[kSqrtAbar], row[kSqrt1mAbar]};
  }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    out[0] = q_sample(in[0], in[1], V(sa), V(s1a));
  }
};

// Backward of the linear maps (kind 0: q_sample, 1: posterior mean, 2: predict_xstart).
// in: grad.  out: grad w.r.t. the first and the second input of the forward op.
template <class S> struct LinearBackwardElem {
  static constexpr int NI = 1, NO = 2, NR = 0;
  S ca, cb;
  static DDPM_HD LinearBackwardElem make(const S* row, const Params<S>& p, int64_t, int64_t) {
    if (p.kind == 0) return {row[kSqrtAbar], row[kSqrt1mAbar]};
    if (p.kind == 1) return {row[kPostC1], row[kPostC2]};
    // predict_xstart(out, x_t): d/dout and d/dx_t per mean type
    if (p.mean_type == kEpsilon) return {-row[kSqrtRecipm1Abar], row[kSqrtRecipAbar]};
    if (p.mean_type == kV) return {-row[kSqrt1mAbar], row[kSqrtAbar]};
    if (p.mean_type == kXPrev) return {S(1) / row[kPostC1], -row[kPostC2] / row[kPostC1]};
    return {S(1), S(0)};
  }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    out[0] = V(ca) * in[0];
    out[1] = V(cb) * in[0];
  }
};

// q(x_{t-1} | x_t, x0) mean.  in: x0, x_t.  out: mean.
template <class S> struct PosteriorElem {
  static constexpr int NI = 2, NO = 1, NR = 0;
  S c1, c2;
  static DDPM_HD PosteriorElem make(const S* row, const Params<S>&, int64_t, int64_t) {
    return {row[kPostC1], row[kPostC2]};
  }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    out[0] = posterior_mean(in[0], in[1], V(c1), V(c2));
  }
};

// One sample's coefficients for the model's p(x_{t-1} | x_t).
template <class S> struct ModelCoefs {
  int mean_type, var_type;
  bool clip, thresh_on;
  S sra, srm1, sa, s1a, c1, c2, s, max_log, min_log, fixed_lv;
  static DDPM_HD ModelCoefs make(const S* row, const Params<S>& p, int64_t b) {
    ModelCoefs m;
    m.mean_type = p.mean_type;
    m.var_type = p.var_type;
    m.clip = p.clip;
    m.thresh_on = p.thresh != nullptr;
    m.s = p.thresh ? p.thresh[b] : S(1);
    m.sra = row[kSqrtRecipAbar];
    m.srm1 = row[kSqrtRecipm1Abar];
    m.sa = row[kSqrtAbar];
    m.s1a = row[kSqrt1mAbar];
    m.c1 = row[kPostC1];
    m.c2 = row[kPostC2];
    m.max_log = row[kLogBetas];
    m.min_log = row[kPostLogVarClipped];
    m.fixed_lv = fixed_logvar(p.var_type, row);
    return m;
  }
  template <class V> DDPM_HD V pred_raw(V out, V x_t) const {
    return predict_xstart(mean_type, out, x_t, V(sra), V(srm1), V(sa), V(s1a), V(c1), V(c2));
  }
  template <class V> DDPM_HD V pred(V out, V x_t) const {
    return process_xstart(pred_raw(out, x_t), clip, thresh_on, V(s));
  }
  template <class V> DDPM_HD V mean(V out, V x_t, V px) const {
    return mean_type == kXPrev ? out : posterior_mean(px, x_t, V(c1), V(c2));
  }
  template <class V> DDPM_HD V logvar(V v) const {
    if (var_type == kLearned) return v;
    if (var_type == kLearnedRange) return learned_range_logvar(v, V(max_log), V(min_log));
    return V(fixed_lv);
  }
};

// predict_xstart (unclipped).  in: out, x_t.  out: x0.
template <class S> struct PredictElem {
  static constexpr int NI = 2, NO = 1, NR = 0;
  ModelCoefs<S> m;
  static DDPM_HD PredictElem make(const S* row, const Params<S>& p, int64_t b, int64_t) {
    return {ModelCoefs<S>::make(row, p, b)};
  }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const { out[0] = m.pred_raw(in[0], in[1]); }
};

// p_mean_variance.  in: out, v, x_t.  out: mean, log_variance, variance (learned types), pred_xstart.
template <class S> struct PMeanVarElem {
  static constexpr int NI = 3, NO = 4, NR = 0;
  ModelCoefs<S> m;
  bool learned;
  static DDPM_HD PMeanVarElem make(const S* row, const Params<S>& p, int64_t b, int64_t) {
    return {ModelCoefs<S>::make(row, p, b), p.learned};
  }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    V px = m.pred(in[0], in[2]);
    out[0] = m.mean(in[0], in[2], px);
    if (learned) {
      V lv = m.logvar(in[1]);
      out[1] = lv;
      out[2] = Prim<V>::exp(lv);
    }
    out[3] = px;
  }
};

// Ancestral step.  in: out, v, x_t, noise.  out: sample, pred_xstart.
template <class S> struct PSampleElem {
  static constexpr int NI = 4, NO = 2, NR = 0;
  ModelCoefs<S> m;
  bool learned;
  S nonzero, fixed_std;
  static DDPM_HD PSampleElem make(const S* row, const Params<S>& p, int64_t b, int64_t t) {
    PSampleElem e{ModelCoefs<S>::make(row, p, b), p.learned, t != 0 ? S(1) : S(0), S(0)};
    e.fixed_std = Prim<S>::exp(S(0.5) * e.m.fixed_lv);
    return e;
  }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    V px = m.pred(in[0], in[2]);
    V mean = m.mean(in[0], in[2], px);
    V std = learned ? Prim<V>::exp(V(0.5) * m.logvar(in[1])) : V(fixed_std);
    out[0] = mean + V(nonzero) * std * in[3];
    out[1] = px;
  }
};

// DDIM step.  in: out, x_t, noise.  out: sample, pred_xstart.
template <class S> struct DdimElem {
  static constexpr int NI = 3, NO = 2, NR = 0;
  ModelCoefs<S> m;
  S sigma_noise, sqrt_abar, sqrt_1m_abar, sqrt_abar_prev, eps_coef;
  bool add_noise;
  static DDPM_HD DdimElem make(const S* row, const Params<S>& p, int64_t b, int64_t t) {
    DdimElem e;
    e.m = ModelCoefs<S>::make(row, p, b);
    S sigma;
    ddim_coefs(p.eta, row, &sigma, &e.sqrt_abar_prev, &e.eps_coef);
    e.sqrt_abar = row[kSqrtAbar];
    e.sqrt_1m_abar = row[kSqrt1mAbar];
    e.add_noise = p.eta != S(0);
    e.sigma_noise = (t != 0 ? S(1) : S(0)) * sigma;
    return e;
  }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    V px = m.pred(in[0], in[1]);
    V s = ddim_sample(px, in[1], V(sqrt_abar), V(sqrt_1m_abar), V(sqrt_abar_prev), V(eps_coef));
    if (add_noise) s = s + V(sigma_noise) * in[2];
    out[0] = s;
    out[1] = px;
  }
};

// The variational-bound element (KL for t > 0, decoder NLL for t = 0) given the model mean m2 and
// log variance lv2; returns the term in nats and its partials d/dm2 and d/dlv2.
template <class S> struct VbCoefs {
  bool t0, learned;
  S lv1, exp_neg_lv1, fixed_lv, r_fixed, exp_neg_fixed, inv_std_fixed;
  static DDPM_HD VbCoefs make(const S* row, int var_type, bool learned, int64_t t) {
    VbCoefs c;
    c.t0 = t == 0;
    c.learned = learned;
    c.lv1 = row[kPostLogVarClipped];
    c.exp_neg_lv1 = Prim<S>::exp(-c.lv1);
    S flv = fixed_logvar(var_type, row);
    c.fixed_lv = flv;
    c.r_fixed = Prim<S>::exp(c.lv1 - flv);
    c.exp_neg_fixed = Prim<S>::exp(-flv);
    c.inv_std_fixed = Prim<S>::exp(-(S(0.5) * flv));
    return c;
  }
  template <class V> DDPM_HD V term(V x0, V m1, V m2, V lv2, V* d_m2, V* d_lv2) const {
    if (!t0) {
      if (!learned) return normal_kl_given_exps(m1, V(lv1), m2, lv2, V(r_fixed), V(exp_neg_fixed), d_m2, d_lv2);
      // one exp per element: r = exp(lv1 - lv2) exactly as the reference (its cancellation against
      // -1 + lv2 - lv1 sets the KL's accuracy); exp(-lv2) = r exp(-lv1) only scales (m1 - m2)^2
      V r = Prim<V>::exp(V(lv1) - lv2);
      return normal_kl_given_exps(m1, V(lv1), m2, lv2, r, r * V(exp_neg_lv1), d_m2, d_lv2);
    }
    V inv = learned ? Prim<V>::exp(V(0) - V(0.5) * lv2) : V(inv_std_fixed);
    V dm, dls;
    V ll = discretized_gaussian_loglik(x0, m2, inv, d_m2 ? &dm : nullptr, d_lv2 ? &dls : nullptr);
    if (d_m2) *d_m2 = V(0) - dm;
    if (d_lv2) *d_lv2 = V(-0.5) * dls;
    return V(0) - ll;
  }
};

// d(log variance)/d(variance output) for learned types
template <class S> DDPM_HD S logvar_grad_coef(int var_type, const S* row) {
  return var_type == kLearnedRange ? S(0.5) * (row[kLogBetas] - row[kPostLogVarClipped]) : S(1);
}

// run(c) for a copy c of element e (ModelCoefs m, VbCoefs vb, flags learned and need_grad) whose options
// are constants, when `hybrid` holds and e is in the vb term's hot configuration (epsilon mean, learned-range
// variance, t > 0, no clipping; fix(c) sets e's own options); run(e) otherwise. A CPU loop over c then folds
// its option tests away (the hybrid loss's loop: half the instructions).
template <class E, class Fix, class Run> DDPM_HD void with_hybrid_constants(const E& e, bool hybrid, Fix fix, Run&& run) {
  if (!(hybrid && e.learned && !e.vb.t0 && !e.m.clip && e.m.mean_type == kEpsilon && e.m.var_type == kLearnedRange))
    return run(e);
  E c = e;
  fix(c);
  c.learned = c.vb.learned = true;
  c.vb.t0 = c.m.clip = false;
  c.m.mean_type = kEpsilon;
  c.m.var_type = kLearnedRange;
  c.need_grad = true;
  if (e.need_grad) return run(c);
  c.need_grad = false;
  run(c);
}

// vb_terms_bpd.  in: out, v, x0, x_t.  out: d vb/d out, d vb/d v (need_grad).  red: vb term (nats).
template <class S> struct VbElem {
  static constexpr int NI = 4, NO = 2, NR = 1;
  ModelCoefs<S> m;
  VbCoefs<S> vb;
  bool need_grad, learned;
  S g_mean, g_var;  // d m2/d out and d lv2/d v, times 1 / (N ln 2)
  static DDPM_HD VbElem make(const S* row, const Params<S>& p, int64_t b, int64_t t) {
    VbElem e;
    e.m = ModelCoefs<S>::make(row, p, b);
    e.vb = VbCoefs<S>::make(row, p.var_type, p.learned, t);
    e.need_grad = p.need_grad;
    e.learned = p.learned;
    S scale = p.inv_n / S(kLn2);
    e.g_mean = mean_grad_coef(p.mean_type, row[kSqrtRecipm1Abar], row[kSqrt1mAbar], row[kPostC1]) * scale;
    e.g_var = logvar_grad_coef(p.var_type, row) * scale;
    return e;
  }
  static constexpr int NF = 1;  // [B] outputs: vb (bits/dim)
  static DDPM_HD void finish(const S*, const Params<S>& p, int64_t, const S* sums, S* outs) {
    outs[0] = sums[0] / p.numel / S(kLn2);
  }
  // vb_terms_bpd of a learned-range model with constant options for a CPU loop (with_hybrid_constants)
  template <class Run> DDPM_HD void specialized(Run&& run) const {
    with_hybrid_constants(*this, true, [](VbElem&) {}, run);
  }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V* red) const {
    V x0 = in[2], xt = in[3];
    V raw = m.pred_raw(in[0], xt);
    V px = process_xstart(raw, m.clip, false, V(1));
    V m2 = m.mean(in[0], xt, px);
    V lv2 = m.logvar(learned ? in[1] : V(0));
    V m1 = posterior_mean(x0, xt, V(m.c1), V(m.c2));
    if (!need_grad) {
      red[0] = vb.term(x0, m1, m2, lv2, (V*)nullptr, (V*)nullptr);
      return;
    }
    V dm2, dlv2;
    red[0] = vb.term(x0, m1, m2, lv2, &dm2, &dlv2);
    V gm(g_mean);
    if (m.clip && m.mean_type != kXPrev) {  // clamp passes the gradient inside [-1, 1]
      using P = Prim<V>;
      gm = P::select(P::land(P::ge(raw, V(-1)), P::le(raw, V(1))), gm, V(0));
    }
    out[0] = dm2 * gm;
    if (learned) out[1] = dlv2 * V(g_var);
  }
};

// training_losses.  in: out, v, x0, noise.  out: d mse/d out (mse types) or d vb/d out (kl types),
// d vb/d v.  red: squared error, vb term (nats).
template <class S> struct TrainElem {
  static constexpr int NI = 4, NO = 2, NR = 2;
  ModelCoefs<S> m;
  VbCoefs<S> vb;
  bool kl_loss, need_vb, need_grad, learned;
  S g_mse, g_mean, g_var;
  static DDPM_HD TrainElem make(const S* row, const Params<S>& p, int64_t b, int64_t t) {
    TrainElem e;
    e.m = ModelCoefs<S>::make(row, p, b);
    e.m.clip = false;
    e.m.thresh_on = false;
    e.vb = VbCoefs<S>::make(row, p.var_type, p.learned, t);
    e.kl_loss = p.loss_type == kKl || p.loss_type == kRescaledKl;
    e.learned = p.learned;
    e.need_vb = e.kl_loss || p.learned;
    e.need_grad = p.need_grad;
    S scale = p.inv_n / S(kLn2);
    e.g_mse = S(-2) * p.inv_n;
    e.g_mean = mean_grad_coef(p.mean_type, row[kSqrtRecipm1Abar], row[kSqrt1mAbar], row[kPostC1]) * scale;
    e.g_var = logvar_grad_coef(p.var_type, row) * scale;
    return e;
  }
  static constexpr int NF = 4;  // [B] outputs: loss, mse, vb, mse weight
  static DDPM_HD void finish(const S* row, const Params<S>& p, int64_t, const S* sums, S* outs) {
    S mse = sums[0] / p.numel;
    S vb = sums[1] / p.numel / S(kLn2);
    S w = loss_weight(p.weighting, p.mean_type, p.var_type, p.min_snr_gamma, row);
    bool kl = p.loss_type == kKl || p.loss_type == kRescaledKl;
    if (kl) {
      outs[0] = vb * p.kl_scale;
      outs[1] = S(0);
      outs[2] = vb;
    } else {
      S loss = w * mse;
      if (p.learned) {
        vb = vb * p.vb_scale;
        loss = loss + vb;
      }
      outs[0] = loss;
      outs[1] = mse;
      outs[2] = p.learned ? vb : S(0);
    }
    outs[3] = w;
  }
  // the MSE term: red[0] = (target - out)^2, out[0] = its saved unit gradient
  template <class V> DDPM_HD void mse_term(const V* in, V* out, V* red) const {
    V o = in[0], x0 = in[2], eps = in[3];
    V xt = q_sample(x0, eps, V(m.sa), V(m.s1a));
    V d = mean_target(m.mean_type, x0, xt, eps, V(m.sa), V(m.s1a), V(m.c1), V(m.c2)) - o;
    red[0] = d * d;
    if (need_grad) out[0] = V(g_mse) * d;
  }
  // the hybrid loss (MSE + vb term) with constant options for a CPU loop (with_hybrid_constants)
  template <class Run> DDPM_HD void specialized(Run&& run) const {
    with_hybrid_constants(*this, !kl_loss, [](TrainElem& c) { c.kl_loss = false, c.need_vb = true; }, run);
  }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V* red) const {
    red[0] = V(0);
    red[1] = V(0);
    if (!kl_loss) mse_term(in, out, red);
    if (!need_vb) return;
    V o = in[0], x0 = in[2], eps = in[3];
    V xt = q_sample(x0, eps, V(m.sa), V(m.s1a));
    V m2 = m.mean(o, xt, m.pred_raw(o, xt));
    V lv2 = m.logvar(learned ? in[1] : V(0));
    V m1 = posterior_mean(x0, xt, V(m.c1), V(m.c2));
    if (!need_grad) {
      red[1] = vb.term(x0, m1, m2, lv2, (V*)nullptr, (V*)nullptr);
      return;
    }
    V dm2, dlv2;
    red[1] = vb.term(x0, m1, m2, lv2, kl_loss ? &dm2 : (V*)nullptr, &dlv2);
    if (kl_loss) out[0] = dm2 * V(g_mean);  // hybrid (mse) losses: the vb term sees out detached
    if (learned) out[1] = dlv2 * V(g_var);
  }
};

// training_losses without a vb term (an MSE loss, fixed variance): TrainElem's MSE term alone, so that the
// kernel's loop carries none of the vb code.
template <class S> struct TrainMseElem : TrainElem<S> {
  static DDPM_HD TrainMseElem make(const S* row, const Params<S>& p, int64_t b, int64_t t) {
    return {TrainElem<S>::make(row, p, b, t)};
  }
  template <class Run> DDPM_HD void specialized(Run&& run) const { run(*this); }  // (not TrainElem's)
  template <class V> DDPM_HD void operator()(const V* in, V* out, V* red) const {
    this->mse_term(in, out, red);
    red[1] = V(0);
  }
};

// Backward of training_losses / vb_terms_bpd: scale the saved unit gradients per sample.
// in: d_out, d_v.  out: grad of the mean half, grad of the variance half.
template <class S> struct ScaleElem {
  static constexpr int NI = 2, NO = 2, NR = 0;
  S a, b;
  static DDPM_HD ScaleElem make(const S*, const Params<S>& p, int64_t i, int64_t) { return {p.s_a[i], p.s_b[i]}; }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    out[0] = V(a) * in[0];
    out[1] = V(b) * in[1];
  }
};

// prior_bpd: KL(N(sqrt(abar_{T-1}) x0, 1 - abar_{T-1}) || N(0, 1)).  in: x0.  red: KL (nats).
template <class S> struct PriorElem {
  static constexpr int NI = 1, NO = 0, NR = 1;
  S sa, lv1, exp_lv1;
  static DDPM_HD PriorElem make(const S* row, const Params<S>&, int64_t, int64_t) {
    return {row[kSqrtAbar], row[kLog1mAbar], Prim<S>::exp(row[kLog1mAbar])};
  }
  static constexpr int NF = 1;  // [B] outputs: prior term (bits/dim)
  static DDPM_HD void finish(const S*, const Params<S>& p, int64_t, const S* sums, S* outs) {
    outs[0] = sums[0] / p.numel / S(kLn2);
  }
  template <class V> DDPM_HD void operator()(const V* in, V*, V* red) const {
    red[0] = normal_kl_given_exps(V(sa) * in[0], V(lv1), V(0), V(0), V(exp_lv1), V(1), (V*)nullptr, (V*)nullptr);
  }
};

// prior_bpd backward.  in: x0.  out: grad x0 = g_b sqrt(abar)^2 x0 / (N ln 2).
template <class S> struct PriorBackwardElem {
  static constexpr int NI = 1, NO = 1, NR = 0;
  S sa, scale;
  static DDPM_HD PriorBackwardElem make(const S* row, const Params<S>& p, int64_t b, int64_t) {
    return {row[kSqrtAbar], p.s_a[b] * p.inv_n / S(kLn2)};
  }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    V mean = V(sa) * in[0], dm;
    // d KL / d mean1 = (m1 - m2) exp(-lv2) = mean for the standard normal
    normal_kl_given_exps(mean, V(0), V(0), V(0), V(1), V(1), &dm, (V*)nullptr);
    out[0] = V(scale) * V(sa) * (V(0) - dm);
  }
};

// Elementwise normal_kl.  in: m1, lv1, m2, lv2.  out: kl.
template <class S> struct NormalKlElem {
  static constexpr int NI = 4, NO = 1, NR = 0;
  static DDPM_HD NormalKlElem make(const S*, const Params<S>&, int64_t, int64_t) { return {}; }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    out[0] = normal_kl(in[0], in[1], in[2], in[3]);
  }
};

// normal_kl backward.  in: grad, m1, lv1, m2, lv2.  out: the four input gradients.
template <class S> struct NormalKlBackwardElem {
  static constexpr int NI = 5, NO = 4, NR = 0;
  static DDPM_HD NormalKlBackwardElem make(const S*, const Params<S>&, int64_t, int64_t) { return {}; }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    V a, b, c, d;
    normal_kl_grad(in[1], in[2], in[3], in[4], &a, &b, &c, &d);
    out[0] = in[0] * a;
    out[1] = in[0] * b;
    out[2] = in[0] * c;
    out[3] = in[0] * d;
  }
};

// Elementwise discretized Gaussian log-likelihood.  in: x, means, log_scales.  out: log p.
template <class S> struct DgllElem {
  static constexpr int NI = 3, NO = 1, NR = 0;
  static DDPM_HD DgllElem make(const S*, const Params<S>&, int64_t, int64_t) { return {}; }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    V inv = Prim<V>::exp(V(0) - in[2]);
    out[0] = discretized_gaussian_loglik(in[0], in[1], inv, (V*)nullptr, (V*)nullptr);
  }
};

// Its backward.  in: grad, x, means, log_scales.  out: grads of x, means, log_scales.
template <class S> struct DgllBackwardElem {
  static constexpr int NI = 4, NO = 3, NR = 0;
  static DDPM_HD DgllBackwardElem make(const S*, const Params<S>&, int64_t, int64_t) { return {}; }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    V inv = Prim<V>::exp(V(0) - in[3]);
    V dm, dls;
    discretized_gaussian_loglik(in[1], in[2], inv, &dm, &dls);
    out[0] = V(0) - in[0] * dm;
    out[1] = in[0] * dm;
    out[2] = in[0] * dls;
  }
};

}  // namespace ddpm
