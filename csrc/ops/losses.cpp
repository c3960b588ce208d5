// ops/losses.cpp -- the loss family: vb_terms_bpd, training_losses, their shared backward scale_halves,
// prior_bpd and prior_bpd_backward (schemas, host functions, autograd kernels; bodies in losses.h).
#include "losses.h"

#include <torch/csrc/dynamo/compiled_autograd.h>

#include "autograd_common.h"
#include "host.h"

namespace ddpm {
namespace op {
namespace {

// The losses' saved unit gradients w.r.t. the mean and the variance half (plan layout, compute dtype);
// an absent one is an undefined tensor (None in Python).
std::pair<Tensor, Tensor> saved_grads(const Plan& p, const Tensor& x0, at::ScalarType ct, bool need_grad,
                                      bool learned) {
  auto buf = [&](bool want) { return want ? alloc_like_plan(p, x0.sizes(), x0.options().dtype(ct)) : Tensor(); };
  return {buf(need_grad), buf(need_grad && learned)};
}

std::tuple<Tensor, Tensor, Tensor> vb_terms_bpd(const Tensor& mo, const Tensor& x0, const Tensor& x_t,
                                                const Tensor& t, const Tensor& table, int64_t mean_type,
                                                int64_t var_type, bool clip, bool need_grad) {
  using Body = VbElem<float>;
  check_model_inputs(mo, "x_t", x_t, var_type, t, table);
  check_same("x0", x0, "x_t", x_t);
  const bool learned = is_learned(var_type);
  auto [mean_out, var_out] = halves(mo, learned);
  Runner<VbElem> r(x0);
  auto [d_mean_out, d_var_out] = saved_grads(r.L.plan, x0, compute_type(x0.scalar_type()), need_grad, learned);
  auto finals = r.finals(x0);
  r.in(Body::in_mean_out, mean_out), r.in(Body::in_var_out, var_out), r.in(Body::in_x0, x0), r.in(Body::in_x_t, x_t);
  if (need_grad) r.out(Body::out_grad_mean_out, d_mean_out);
  if (need_grad && learned) r.out(Body::out_grad_var_out, d_var_out);
  r.table(table, t);
  r.set_options([&](auto& o) {
    set_model_options(o, mean_type, var_type, clip, c10::nullopt);
    set_mean_options(o, r.L.plan);
    o.need_grad = need_grad;
  });
  r.run();
  return {finals[Body::final_vb_bpd], d_mean_out, d_var_out};
}
DDPM_DEVICE_OP(vb_terms_bpd, "(Tensor model_output, Tensor x0, Tensor x_t, Tensor t, Tensor table, int mean_type, "
                             "int var_type, bool clip, bool need_grad) -> (Tensor, Tensor, Tensor)")
DDPM_DIRECT_RESULTS(vb_terms_bpd, 1)  // (vb,); d_out and d_v are its node's

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> training_losses(
    const Tensor& mo, const Tensor& x0, const Tensor& t, const Tensor& noise, const Tensor& table, int64_t mean_type,
    int64_t var_type, int64_t loss_type, int64_t weighting, double min_snr_gamma, bool need_grad) {
  using Body = TrainElem<float>;
  check_input("x0", x0);
  check_model_output(mo, "x0", x0, var_type);
  check_same("noise", noise, "x0", x0);
  check_t(t, x0.size(0), table);
  bool learned = is_learned(var_type);
  Plan p = make_plan(x0);
  auto [mean_out, var_out] = halves(mo, learned);
  auto ct = compute_type(x0.scalar_type());
  auto [d_mean_out, d_var_out] = saved_grads(p, x0, ct, need_grad, learned);
  const int64_t T = table.size(0);
  // the results these options define: loss always; mse for MSE losses where it differs from loss (a learned
  // variance or a weighting other than "simple": else loss is the mse, one tensor, as in improved-diffusion);
  // vb for KL losses and a learned variance; the MSE weight w (saved for the backward) for a weighting other
  // than "simple". The others are not made.
  const bool kl = loss_type == kKl || loss_type == kRescaledKl;
  const bool weighted = !kl && weighting != kSimple;
  const unsigned wanted = 1u << Body::final_loss | unsigned(!kl && (learned || weighted)) << Body::final_mse |
                          unsigned(learned || kl) << Body::final_vb | unsigned(weighted) << Body::final_mse_weight;
  auto run = [&]<template <class> class Elem>(Runner<Elem>& r, bool mse_only) {
    auto finals = r.finals(x0, wanted);
    r.in(Body::in_mean_out, mean_out);
    if (learned) r.in(Body::in_var_out, var_out);
    // the MSE alone (no vb term) on an eps target reads no x0, on an x0 target no noise (absent inputs read 0)
    if (!(mse_only && mean_type == kEpsilon)) r.in(Body::in_x0, x0);
    if (!(mse_only && mean_type == kX0)) r.in(Body::in_noise, noise);
    if (need_grad) r.out(Body::out_grad_mean_out, d_mean_out);
    if (need_grad && learned) r.out(Body::out_grad_var_out, d_var_out);
    r.table(table, t);
    r.set_options([&](auto& o) {
      using S = std::remove_reference_t<decltype(o.numel)>;
      set_mean_options(o, p);
      o.mean_type = int(mean_type);
      o.var_type = int(var_type);
      o.loss_type = int(loss_type);
      o.weighting = int(weighting);
      o.min_snr_gamma = static_cast<S>(min_snr_gamma);
      o.need_grad = need_grad;
      o.vb_scale = loss_type == kRescaledMse ? static_cast<S>(T / 1000.0) : S(1);
      o.kl_scale = loss_type == kRescaledKl ? static_cast<S>(T) : S(1);
    });
    r.run();
    return std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>{
        finals[Body::final_loss], finals[Body::final_mse],        finals[Body::final_vb],
        finals[Body::final_mse_weight], d_mean_out, d_var_out};
  };
  // an MSE loss with a fixed variance has no vb term: TrainMseElem's loop carries none of its code
  if (!learned && !kl) {
    Runner<TrainMseElem> r(p, x0, ct == at::kDouble);
    return run(r, true);
  }
  Runner<TrainElem> r(p, x0, ct == at::kDouble);
  return run(r, false);
}
// Results (loss, mse, vb, w, d_out, d_v): a result the options do not define is undefined (None in Python), not
// made: mse for KL losses and where it equals loss (an MSE loss with a fixed variance and "simple" weighting), vb
// for an MSE loss with a fixed variance, w for "simple" weighting and KL losses, d_out without need_grad, d_v
// without need_grad and a learned variance. need_grad: save d_out (and d_v) for a backward;
// the autograd kernel sets it when it builds a node.
DDPM_DEVICE_OP(training_losses, "(Tensor model_output, Tensor x0, Tensor t, Tensor noise, Tensor table, "
                                "int mean_type, int var_type, int loss_type, int weighting, float min_snr_gamma, "
                                "bool need_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
DDPM_DIRECT_RESULTS(training_losses, 3)  // (loss, mse, vb); w, d_out and d_v are its node's

// d loss / d model_output from the saved unit gradients d_out, d_v (d_v: a learned variance's, else absent or
// empty) and the per-sample gradients of the loss terms g_loss, g_mse, g_vb and the MSE weight w ([B] each, any
// dtype and strides, absent where none flows); the five coefficients say how the terms mix (ScaleElem).
Tensor scale_halves(const Tensor& d_out, const c10::optional<Tensor>& d_v, const Tensor& mo,
                    const c10::optional<Tensor>& g_loss, const c10::optional<Tensor>& g_mse,
                    const c10::optional<Tensor>& g_vb, const c10::optional<Tensor>& w, double loss_mean,
                    double mse_mean, double vb_mean, double loss_var, double vb_var) {
  using Body = ScaleElem<float>;
  bool learned = d_v.has_value() && d_v->defined() && d_v->numel() > 0;
  const auto ct = d_out.scalar_type();
  TORCH_CHECK(d_out.dim() >= 1, "d_out: expected the saved unit gradient [B, ...]");
  const int64_t B = d_out.size(0);
  // a term's per-sample gradient when it has a nonzero coefficient, in d_out's dtype (read with its stride)
  auto per_sample = [&](const c10::optional<Tensor>& g, const char* name, bool used) -> Tensor {
    if (!used || !g.has_value() || !g->defined()) return Tensor();
    TORCH_CHECK(g->dim() == 1 && g->size(0) == B && g->device() == d_out.device(), name, ": expected ", B,
                " per-sample values on ", d_out.device(), ", got shape ", g->sizes(), " on ", g->device());
    return g->scalar_type() == ct ? *g : g->to(ct);  // (to() returns g itself then, through the dispatcher)
  };
  const Tensor gl = per_sample(g_loss, "g_loss", loss_mean != 0 || loss_var != 0);
  const Tensor gm = per_sample(g_mse, "g_mse", mse_mean != 0);
  const Tensor gv = per_sample(g_vb, "g_vb", vb_mean != 0 || vb_var != 0);
  const Tensor weight = per_sample(w, "w", gl.defined() && loss_mean != 0);
  Tensor grad = alloc_grad_like(mo, mo.scalar_type());
  auto [grad_mean, grad_var] = halves(grad, learned);
  if (!learned && mo.dim() >= 2 && mo.size(1) == 2 * d_out.size(1) && d_out.size(1) > 0) {
    // a learned-variance model output whose variance half gets no gradient
    grad_mean = grad.narrow(1, 0, d_out.size(1));
    grad.narrow(1, d_out.size(1), d_out.size(1)).zero_();
  }
  Runner<ScaleElem> r(d_out);
  r.in(Body::in_unit_grad_mean, d_out), r.out(Body::out_grad_mean_out, grad_mean);
  if (learned) r.in(Body::in_unit_grad_var, *d_v), r.out(Body::out_grad_var_out, grad_var);
  r.set_options([&](auto& o) {
    using S = std::remove_reference_t<decltype(o.loss_mean)>;
    auto strided = [](auto& field, const Tensor& x) {
      point_to(field.data, x);
      field.stride = x.defined() ? x.stride(0) : 0;
    };
    strided(o.g_loss, gl), strided(o.g_mse, gm), strided(o.g_vb, gv), strided(o.w, weight);
    o.loss_mean = static_cast<S>(loss_mean), o.mse_mean = static_cast<S>(mse_mean);
    o.vb_mean = static_cast<S>(vb_mean), o.loss_var = static_cast<S>(loss_var), o.vb_var = static_cast<S>(vb_var);
  });
  r.run();
  return grad;
}
DDPM_DEVICE_OP(scale_halves, "(Tensor d_out, Tensor? d_v, Tensor model_output, Tensor? g_loss, Tensor? g_mse, "
                             "Tensor? g_vb, Tensor? w, float loss_mean, float mse_mean, float vb_mean, "
                             "float loss_var, float vb_var) -> Tensor")

Tensor prior_bpd(const Tensor& x0, const Tensor& table) {
  using Body = PriorElem<float>;
  TORCH_CHECK(table.dim() == 2 && table.size(1) >= kNumCols && table.is_contiguous() && table.size(0) >= 1,
              "table: expected the schedule's packed table");
  Runner<PriorElem> r(x0);
  auto finals = r.finals(x0);
  r.in(Body::in_x0, x0), r.table_at(table, table.size(0) - 1);
  r.set_options([&](auto& o) { set_mean_options(o, r.L.plan); });
  r.run();
  return finals[Body::final_prior_bpd];
}
DDPM_DEVICE_OP(prior_bpd, "(Tensor x0, Tensor table) -> Tensor")

// grad: d loss / d prior_bpd [B]
Tensor prior_bpd_backward(const Tensor& grad, const Tensor& x0, const Tensor& table) {
  using Body = PriorBackwardElem<float>;
  Tensor grad_per_sample = grad.to(compute_type(x0.scalar_type())).contiguous();
  Runner<PriorBackwardElem> r(x0);
  Tensor grad_x0 = r.new_out(Body::out_grad_x0);
  r.in(Body::in_x0, x0), r.table_at(table, table.size(0) - 1);
  r.set_options([&](auto& o) {
    set_mean_options(o, r.L.plan);
    point_to(o.grad, grad_per_sample);
  });
  r.run();
  return grad_x0;
}
DDPM_DEVICE_OP(prior_bpd_backward, "(Tensor grad, Tensor x0, Tensor table) -> Tensor")

// -- autograd ---------------------------------------------------------------------------------------------
//   prior_bpd: prior_bpd_backward
//   vb_terms_bpd, training_losses: their forward saves the per-element unit gradients d_out / d_v (and the
//   loss the per-sample MSE weight w); the backward scales them per sample in one scale_halves pass, which
//   takes the terms' gradients as they come (LossScales: how they mix).

// The five coefficients of scale_halves (their formula: losses.h's ScaleElem).
struct LossScales {
  double loss_mean, mse_mean, vb_mean, loss_var, vb_var;
};
constexpr LossScales kVbScales{0, 0, 1, 0, 1};  // vb_terms_bpd: both halves scaled by g_vb
// training_losses:  KL losses:  s_mean = s_var = g_loss * (T for rescaled_kl, else 1) + g_vb
//                   MSE losses: s_mean = g_loss * w + g_mse,  s_var = (g_loss + g_vb) * (T / 1000 for rescaled_mse)
LossScales loss_scales(int64_t loss_type, double T) {
  if (loss_type == kKl || loss_type == kRescaledKl) {
    const double k = loss_type == kRescaledKl ? T : 1.0;
    return {k, 0, 1, k, 1};
  }
  const double k = loss_type == kRescaledMse ? T / 1000.0 : 1.0;
  return {1, 1, 0, k, k};
}

using ScaleHalvesSig = Tensor(const Tensor&, const std::optional<Tensor>&, const Tensor&, const std::optional<Tensor>&,
                              const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&,
                              double, double, double, double, double);

// d loss / d model_output (the scale_halves op). d_v holds a unit gradient only for a learned variance (otherwise
// it is an empty tensor; a flag, not its numel, says so: sizes may be symbolic under compile); an undefined
// gradient or weight is passed as absent.
Tensor scale_unit_grads(const Tensor& d_out, const Tensor& d_v, bool learned, const Tensor& mo, const Tensor& g_loss,
                        const Tensor& g_mse, const Tensor& g_vb, const Tensor& w, const LossScales& k) {
  static auto op = op_handle<ScaleHalvesSig>(DDPM_OP("scale_halves"));
  auto opt = [](const Tensor& x) { return x.defined() ? std::optional<Tensor>(x) : std::nullopt; };
  std::optional<Tensor> dv = learned ? std::optional<Tensor>(d_v) : std::nullopt;
  auto call = [&] {
    return op.call(d_out, dv, mo, opt(g_loss), opt(g_mse), opt(g_vb), opt(w), k.loss_mean, k.mse_mean, k.vb_mean,
                   k.loss_var, k.vb_var);
  };
  if (!at::GradMode::is_enabled() && !at::functorch::functorchTLSAccessor()) {
    // a plain backward (no create_graph, no functorch transform): straight to the kernel, not through the boxed
    // autograd fallback of an op without an autograd kernel (~2 us a call)
    at::AutoDispatchBelowADInplaceOrView below;
    return call();
  }
  return call();
}

struct VbTermsBpd : public torch::autograd::Function<VbTermsBpd> {
  static std::tuple<Tensor, Tensor, Tensor> below_autograd(const Tensor& mo, const Tensor& x0, const Tensor& x_t,
                                                           const Tensor& t, const Tensor& table, int64_t mean_type,
                                                           int64_t var_type, bool clip, bool need_grad) {
    static auto op = op_handle<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                  const Tensor&, const Tensor&, int64_t, int64_t,
                                                                  bool, bool)>(DDPM_OP("vb_terms_bpd"));
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(mo, x0, x_t, t, table, mean_type, var_type, clip, need_grad);
  }
  // the unit gradients d_out, d_v are no outputs of the Function: saved, and handed back through `unit_grads` as
  // plain tensors (not marked non-differentiable: compiled autograd asserts a C++ Function marks none)
  static Tensor forward(AutogradContext* ctx, const Tensor& mo, const Tensor& x0, const Tensor& x_t, const Tensor& t,
                        const Tensor& table, int64_t mean_type, int64_t var_type, bool clip, bool need_grad,
                        std::pair<Tensor, Tensor>* unit_grads) {
    auto [vb, d_out, d_v] = below_autograd(mo, x0, x_t, t, table, mean_type, var_type, clip, need_grad);
    ctx->save_for_backward({d_out, d_v, mo});
    ctx->saved_data["learned"] = is_learned(var_type);
    *unit_grads = {d_out, d_v};
    return vb;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list none(10);
    auto saved = ctx->get_saved_variables();
    none[0] = scale_unit_grads(saved[0], saved[1], ctx->saved_data["learned"].toBool(), saved[2], Tensor(), Tensor(),
                               grads[0], Tensor(), kVbScales);
    return none;
  }
};

using TrainingLossesResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

TrainingLossesResult training_losses_below_autograd(const Tensor& mo, const Tensor& x0, const Tensor& t,
                                                    const Tensor& noise, const Tensor& table, int64_t mean_type,
                                                    int64_t var_type, int64_t loss_type, int64_t weighting,
                                                    double min_snr_gamma, bool need_grad) {
  static auto op = op_handle<TrainingLossesResult(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                  const Tensor&, int64_t, int64_t, int64_t, int64_t, double,
                                                  bool)>(DDPM_OP("training_losses"));
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(mo, x0, t, noise, table, mean_type, var_type, loss_type, weighting, min_snr_gamma, need_grad);
}

// training_losses' node, built by hand (autograd_common.h's new_node): the loss runs once per training step, and
// on 2x3x8x8 this node costs ~29,000 fewer instructions per forward + backward than the torch::autograd::Function
// it replaced (~283,000 a call in all; callgrind). It is the grad_fn of the three differentiable outputs (loss, mse,
// vb; those not made are undefined inputs of it); the op's w, d_out and d_v are plain tensors it saves.
struct TrainingLossesBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable w, d_out, d_v, mo;  // w unless unit_weight, d_v when learned
  int64_t loss_type = 0;
  double T = 0;
  bool learned = false, unit_weight = false;  // unit_weight: w = 1 exactly, or a KL loss (no MSE weight): w unsaved

  std::string name() const override { return "ddpm_fast::TrainingLossesBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    w.reset_data(), d_out.reset_data(), d_v.reset_data(), mo.reset_data();
  }
  // compiled autograd (torch._dynamo's): the node's state, then apply traced on its proxies, as torch's generated
  // nodes do. The traced gradients are placeholders of no real shape: apply passes them to scale_halves (whose
  // fake impl reads only d_out's and model_output's metadata) and does no arithmetic of its own on them.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(w, false), args.collect(d_out, false), args.collect(d_v, false), args.collect(mo, false);
    args.collect(loss_type), args.collect(T), args.collect(learned), args.collect(unit_weight);
  }
  variable_list apply_with_saved(const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    saved.before(w), saved.before(d_out), saved.before(d_v), saved.before(mo);
    variable_list result = apply(variable_list(grads));
    saved.after(w), saved.after(d_out), saved.after(d_v), saved.after(mo);
    return result;
  }
  // grads: d / d (loss, mse, vb), undefined where none flows; returns d / d model_output, the node's one input
  // (the op is differentiable in model_output alone: its other inputs get no edge)
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list out(1);
    const Tensor &g_loss = grads[0], &g_mse = grads[1], &g_vb = grads[2];
    if (!should_compute_output(0) || (!g_loss.defined() && !g_mse.defined() && !g_vb.defined())) return out;
    out[0] = scale_unit_grads(d_out.unpack(), learned ? d_v.unpack() : Tensor(), learned, mo.unpack(), g_loss, g_mse,
                              g_vb, unit_weight ? Tensor() : w.unpack(), loss_scales(loss_type, T));
    return out;
  }
};

TrainingLossesResult training_losses_autograd(const Tensor& mo, const Tensor& x0, const Tensor& t, const Tensor& noise,
                                              const Tensor& table, int64_t mean_type, int64_t var_type,
                                              int64_t loss_type, int64_t weighting, double min_snr_gamma,
                                              bool need_grad) {
  const bool with_node = builds_node(mo, x0, t, noise, table);
  auto result = training_losses_below_autograd(mo, x0, t, noise, table, mean_type, var_type, loss_type, weighting,
                                               min_snr_gamma, need_grad || with_node);
  if (!with_node) return result;
  auto& [loss, mse, vb, w, d_out, d_v] = result;
  auto node = new_node<TrainingLossesBackward>(mo);
  node->loss_type = loss_type;
  node->T = static_cast<double>(table.size(0));
  node->learned = is_learned(var_type);
  const bool kl = loss_type == kKl || loss_type == kRescaledKl;
  node->unit_weight = weighting == kSimple || kl;
  if (!node->unit_weight) node->w = torch::autograd::SavedVariable(w, false);
  node->d_out = torch::autograd::SavedVariable(d_out, false);
  if (node->learned) node->d_v = torch::autograd::SavedVariable(d_v, false);
  node->mo = torch::autograd::SavedVariable(mo, false);
  attach(node, {loss, mse, vb});  // an output not made (undefined) gets no gradient
  return result;
}
DDPM_AUTOGRAD_OP(training_losses, training_losses_autograd)

struct PriorBpd : public torch::autograd::Function<PriorBpd> {
  static Tensor below_autograd(const Tensor& x0, const Tensor& table) {
    static auto op = op_handle<Tensor(const Tensor&, const Tensor&)>(DDPM_OP("prior_bpd"));
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x0, table);
  }
  static Tensor forward(AutogradContext* ctx, const Tensor& x0, const Tensor& table) {
    ctx->save_for_backward({x0, table});
    return below_autograd(x0, table);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op =
        op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&)>(DDPM_OP("prior_bpd_backward"));
    auto saved = ctx->get_saved_variables();
    return {op.call(grads[0], saved[0], saved[1]), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> vb_terms_bpd_autograd(const Tensor& mo, const Tensor& x0, const Tensor& x_t,
                                                         const Tensor& t, const Tensor& table, int64_t mean_type,
                                                         int64_t var_type, bool clip, bool need_grad) {
  if (!needs_autograd_node(mo, x0, x_t, t, table))
    return VbTermsBpd::below_autograd(mo, x0, x_t, t, table, mean_type, var_type, clip, need_grad);
  std::pair<Tensor, Tensor> unit_grads;
  // the node's backward needs the saved unit gradients, whatever the caller's need_grad
  Tensor vb = VbTermsBpd::apply(mo, x0, x_t, t, table, mean_type, var_type, clip, true, &unit_grads);
  return {vb, unit_grads.first, unit_grads.second};
}
DDPM_AUTOGRAD_OP(vb_terms_bpd, vb_terms_bpd_autograd)

Tensor prior_bpd_autograd(const Tensor& x0, const Tensor& table) {
  if (!needs_autograd_node(x0, table)) return PriorBpd::below_autograd(x0, table);
  return PriorBpd::apply(x0, table);
}
DDPM_AUTOGRAD_OP(prior_bpd, prior_bpd_autograd)

}  // namespace
}  // namespace op
}  // namespace ddpm
