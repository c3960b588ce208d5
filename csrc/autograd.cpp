// autograd.cpp -- the autograd kernels of the differentiable ddpm_fast ops, in C++.
//
// Per-call overhead counts: the loss runs once per training step and q_sample on every sample batch,
// and on a GPU the fused kernel takes microseconds. torch.library's Python autograd wrapper costs
// 8 us a call at q_sample's 4 arguments and tens of microseconds at the losses' 9-11 (it rebuilds the
// schema's argument list per argument), so every differentiable op's autograd kernel is here. The
// sampler ops (p_mean_variance, p_sample_step, ddim_step) have none: ddpm_fast/native.py runs the
// reference when their inputs require grad.
//
// Each forward calls the op below autograd (the CPU / CUDA / fake kernel); each backward is one fused
// backward op:
//   q_sample, q_posterior (mean), predict_xstart: linear_backward (both inputs' coefficients)
//   prior_bpd: prior_bpd_backward;  normal_kl: normal_kl_backward;  discretized_gaussian_log_likelihood:
//   dgll_backward (the last two reduce each gradient to its input's broadcast shape)
//   vb_terms_bpd, training_losses: their forward saves the per-element unit gradients d_out / d_v (and the
//   loss the per-sample MSE weight w); the backward scales them per sample in one scale_halves pass:
//     vb_terms_bpd: s_mean = s_var = g_vb
//     KL losses:    s_mean = s_var = g_loss * (T for rescaled_kl, else 1) + g_vb
//     MSE losses:   s_mean = g_loss * w + g_mse,  s_var = (g_loss + g_vb) * (T / 1000 for rescaled_mse, else 1)
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/ATen.h>

#include "op_namespace.h"
#include "ops/forward_process.h"  // LinearOp
#include "options.h"

namespace ddpm {
namespace op {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The typed dispatcher handle of ddpm_fast::<name>, looked up once per call site.
template <class Sig> c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using LinearBackwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t);

// Gradients w.r.t. the two inputs of the linear op `kind` (q_sample, the posterior mean, predict_xstart)
std::tuple<Tensor, Tensor> linear_grads(const Tensor& g, const Tensor& t, const Tensor& table, LinearOp kind,
                                        int64_t mean_type) {
  static auto op = handle<LinearBackwardSig>(DDPM_OP("linear_backward"));
  return op.call(g, t, table, int64_t(kind), mean_type);
}

struct QSample : public torch::autograd::Function<QSample> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x0, const Tensor& t, const Tensor& noise,
                        const Tensor& table) {
    static auto op = handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>(DDPM_OP("q_sample"));
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({t, table});
    return op.call(x0, t, noise, table);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto [ga, gb] = linear_grads(grads[0], saved[0], saved[1], kLinearQSample, kEpsilon);
    return {ga, Tensor(), gb, Tensor()};
  }
};

struct QPosterior : public torch::autograd::Function<QPosterior> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x0, const Tensor& x_t, const Tensor& t,
                               const Tensor& table) {
    static auto op = handle<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                               const Tensor&)>(DDPM_OP("q_posterior"));
    at::AutoDispatchBelowADInplaceOrView below;
    auto [mean, var, logvar] = op.call(x0, x_t, t, table);
    ctx->save_for_backward({t, table});
    ctx->mark_non_differentiable({var, logvar});  // functions of t alone
    ctx->set_materialize_grads(false);
    return {mean, var, logvar};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(4);
    auto saved = ctx->get_saved_variables();
    auto [ga, gb] = linear_grads(grads[0], saved[0], saved[1], kLinearPosteriorMean, kEpsilon);
    return {ga, gb, Tensor(), Tensor()};
  }
};

struct PredictXstart : public torch::autograd::Function<PredictXstart> {
  static Tensor forward(AutogradContext* ctx, const Tensor& mo, const Tensor& x_t, const Tensor& t,
                        const Tensor& table, int64_t mean_type) {
    static auto op = handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t)>(
        DDPM_OP("predict_xstart"));
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({t, table});
    ctx->saved_data["mean_type"] = mean_type;
    return op.call(mo, x_t, t, table, mean_type);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto [ga, gb] = linear_grads(grads[0], saved[0], saved[1], kLinearPredictXstart,
                                 ctx->saved_data["mean_type"].toInt());
    return {ga, gb, Tensor(), Tensor(), Tensor()};
  }
};

using ScaleHalvesSig = Tensor(const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&);

// d loss / d model_output from the saved unit gradients; d_v holds one only for a learned variance
// (otherwise it is an empty tensor; a flag, not its numel, says so: sizes may be symbolic under compile)
Tensor scale_halves(const Tensor& d_out, const Tensor& d_v, bool learned, const Tensor& s_mean, const Tensor& s_var,
                    const Tensor& mo) {
  static auto op = handle<ScaleHalvesSig>(DDPM_OP("scale_halves"));
  std::optional<Tensor> dv = learned ? std::optional<Tensor>(d_v) : std::nullopt;
  return op.call(d_out, dv, s_mean.contiguous(), s_var.contiguous(), mo);
}

struct VbTermsBpd : public torch::autograd::Function<VbTermsBpd> {
  static variable_list forward(AutogradContext* ctx, const Tensor& mo, const Tensor& x0, const Tensor& x_t,
                               const Tensor& t, const Tensor& table, int64_t mean_type, int64_t var_type, bool clip,
                               bool need_grad) {
    static auto op = handle<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                               const Tensor&, const Tensor&, int64_t, int64_t, bool,
                                                               bool)>(DDPM_OP("vb_terms_bpd"));
    at::AutoDispatchBelowADInplaceOrView below;
    auto [vb, d_out, d_v] = op.call(mo, x0, x_t, t, table, mean_type, var_type, clip, need_grad);
    ctx->save_for_backward({d_out, d_v, mo});
    ctx->saved_data["learned"] = is_learned(var_type);
    ctx->mark_non_differentiable({d_out, d_v});
    ctx->set_materialize_grads(false);
    return {vb, d_out, d_v};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list none(9);
    if (!grads[0].defined()) return none;
    auto saved = ctx->get_saved_variables();
    Tensor s = grads[0].to(saved[0].scalar_type());
    none[0] = scale_halves(saved[0], saved[1], ctx->saved_data["learned"].toBool(), s, s, saved[2]);
    return none;
  }
};

struct TrainingLosses : public torch::autograd::Function<TrainingLosses> {
  static variable_list forward(AutogradContext* ctx, const Tensor& mo, const Tensor& x0, const Tensor& t,
                               const Tensor& noise, const Tensor& table, int64_t mean_type, int64_t var_type,
                               int64_t loss_type, int64_t weighting, double min_snr_gamma, bool need_grad) {
    static auto op = handle<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, int64_t, int64_t,
        double, bool)>(DDPM_OP("training_losses"));
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, mse, vb, w, d_out, d_v] =
        op.call(mo, x0, t, noise, table, mean_type, var_type, loss_type, weighting, min_snr_gamma, need_grad);
    ctx->save_for_backward({w, d_out, d_v, mo});
    ctx->saved_data["loss_type"] = loss_type;
    ctx->saved_data["learned"] = is_learned(var_type);
    ctx->saved_data["T"] = table.size(0);
    ctx->mark_non_differentiable({w, d_out, d_v});
    ctx->set_materialize_grads(false);  // no zero-filled [B] gradients for unused outputs
    return {loss, mse, vb, w, d_out, d_v};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list none(11);
    const Tensor &g_loss = grads[0], &g_mse = grads[1], &g_vb = grads[2];
    if (!g_loss.defined() && !g_mse.defined() && !g_vb.defined()) return none;
    auto saved = ctx->get_saved_variables();
    const Tensor &w = saved[0], &d_out = saved[1], &d_v = saved[2], &mo = saved[3];
    const int64_t loss_type = ctx->saved_data["loss_type"].toInt();
    const double T = static_cast<double>(ctx->saved_data["T"].toInt());
    // absent gradients are left out of the sums, not zero-filled (each term is an op on a [B] tensor)
    auto as_w = [&](const Tensor& g) { return g.defined() ? g.to(w.scalar_type()) : Tensor(); };
    auto plus = [](const Tensor& a, const Tensor& b) { return !a.defined() ? b : !b.defined() ? a : a + b; };
    auto times = [](const Tensor& a, double k) { return a.defined() && k != 1.0 ? a * k : a; };
    Tensor gl = as_w(g_loss), gm = as_w(g_mse), gv = as_w(g_vb), s_mean, s_var;
    if (loss_type == kKl || loss_type == kRescaledKl) {
      s_mean = plus(times(gl, loss_type == kRescaledKl ? T : 1.0), gv);
      s_var = s_mean;
    } else {
      s_mean = plus(gl.defined() ? gl * w : Tensor(), gm);
      s_var = times(plus(gl, gv), loss_type == kRescaledMse ? T / 1000.0 : 1.0);
    }
    if (!s_mean.defined()) s_mean = at::zeros_like(w);
    if (!s_var.defined()) s_var = at::zeros_like(w);
    none[0] = scale_halves(d_out, d_v, ctx->saved_data["learned"].toBool(), s_mean, s_var, mo);
    return none;
  }
};

struct PriorBpd : public torch::autograd::Function<PriorBpd> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x0, const Tensor& table) {
    static auto op = handle<Tensor(const Tensor&, const Tensor&)>(DDPM_OP("prior_bpd"));
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({x0, table});
    return op.call(x0, table);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = handle<Tensor(const Tensor&, const Tensor&, const Tensor&)>(DDPM_OP("prior_bpd_backward"));
    auto saved = ctx->get_saved_variables();
    return {op.call(grads[0], saved[0], saved[1]), Tensor()};
  }
};

// grads[k] summed to inputs[k]'s (broadcast) shape in its dtype, for the inputs that need a gradient
variable_list reduce_to_inputs(AutogradContext* ctx, const std::vector<Tensor>& grads, const variable_list& inputs) {
  variable_list out(inputs.size());
  for (size_t k = 0; k < inputs.size(); ++k)
    if (ctx->needs_input_grad(k)) out[k] = grads[k].sum_to_size(inputs[k].sizes()).to(inputs[k].scalar_type());
  return out;
}

struct NormalKl : public torch::autograd::Function<NormalKl> {
  static Tensor forward(AutogradContext* ctx, const Tensor& m1, const Tensor& lv1, const Tensor& m2,
                        const Tensor& lv2) {
    static auto op =
        handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>(DDPM_OP("normal_kl"));
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({m1, lv1, m2, lv2});
    return op.call(m1, lv1, m2, lv2);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = handle<std::tuple<Tensor, Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&)>(DDPM_OP("normal_kl_backward"));
    auto in = ctx->get_saved_variables();
    auto [a, b, c, d] = op.call(grads[0], in[0], in[1], in[2], in[3]);
    return reduce_to_inputs(ctx, {a, b, c, d}, in);
  }
};

struct Dgll : public torch::autograd::Function<Dgll> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& means, const Tensor& log_scales) {
    static auto op = handle<Tensor(const Tensor&, const Tensor&, const Tensor&)>(
        DDPM_OP("discretized_gaussian_log_likelihood"));
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({x, means, log_scales});
    return op.call(x, means, log_scales);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = handle<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                               const Tensor&)>(DDPM_OP("dgll_backward"));
    auto in = ctx->get_saved_variables();
    auto [a, b, c] = op.call(grads[0], in[0], in[1], in[2]);
    return reduce_to_inputs(ctx, {a, b, c}, in);
  }
};

Tensor q_sample_autograd(const Tensor& x0, const Tensor& t, const Tensor& noise, const Tensor& table) {
  return QSample::apply(x0, t, noise, table);
}

std::tuple<Tensor, Tensor, Tensor> q_posterior_autograd(const Tensor& x0, const Tensor& x_t, const Tensor& t,
                                                        const Tensor& table) {
  auto r = QPosterior::apply(x0, x_t, t, table);
  return {r[0], r[1], r[2]};
}

Tensor predict_xstart_autograd(const Tensor& mo, const Tensor& x_t, const Tensor& t, const Tensor& table,
                               int64_t mean_type) {
  return PredictXstart::apply(mo, x_t, t, table, mean_type);
}

std::tuple<Tensor, Tensor, Tensor> vb_terms_bpd_autograd(const Tensor& mo, const Tensor& x0, const Tensor& x_t,
                                                         const Tensor& t, const Tensor& table, int64_t mean_type,
                                                         int64_t var_type, bool clip, bool need_grad) {
  auto r = VbTermsBpd::apply(mo, x0, x_t, t, table, mean_type, var_type, clip, need_grad);
  return {r[0], r[1], r[2]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> training_losses_autograd(
    const Tensor& mo, const Tensor& x0, const Tensor& t, const Tensor& noise, const Tensor& table, int64_t mean_type,
    int64_t var_type, int64_t loss_type, int64_t weighting, double min_snr_gamma, bool need_grad) {
  auto r = TrainingLosses::apply(mo, x0, t, noise, table, mean_type, var_type, loss_type, weighting, min_snr_gamma,
                                 need_grad);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

Tensor prior_bpd_autograd(const Tensor& x0, const Tensor& table) { return PriorBpd::apply(x0, table); }

Tensor normal_kl_autograd(const Tensor& m1, const Tensor& lv1, const Tensor& m2, const Tensor& lv2) {
  return NormalKl::apply(m1, lv1, m2, lv2);
}

Tensor dgll_autograd(const Tensor& x, const Tensor& means, const Tensor& log_scales) {
  return Dgll::apply(x, means, log_scales);
}

}  // namespace
}  // namespace op
}  // namespace ddpm

DDPM_TORCH_LIBRARY_IMPL(DDPM_NS, Autograd, m) {
  m.impl("q_sample", &ddpm::op::q_sample_autograd);
  m.impl("q_posterior", &ddpm::op::q_posterior_autograd);
  m.impl("predict_xstart", &ddpm::op::predict_xstart_autograd);
  m.impl("vb_terms_bpd", &ddpm::op::vb_terms_bpd_autograd);
  m.impl("training_losses", &ddpm::op::training_losses_autograd);
  m.impl("prior_bpd", &ddpm::op::prior_bpd_autograd);
  m.impl("normal_kl", &ddpm::op::normal_kl_autograd);
  m.impl("discretized_gaussian_log_likelihood", &ddpm::op::dgll_autograd);
}
