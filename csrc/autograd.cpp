// autograd.cpp -- the autograd kernel of ddpm_fast::training_losses, in C++.
//
// The training loss runs once per training step, so its per-call overhead counts: torch.library's
// Python autograd wrapper costs tens of microseconds a call at the op's 11 arguments (it rebuilds the
// schema's argument list per argument), more than the fused CPU kernel at small sizes and far more
// than a GPU kernel. The other ops keep their Python autograd (ddpm_fast/native.py).
//
// Forward: the op below autograd (the CPU / CUDA / fake kernel) returns (loss, mse, vb, w, d_out, d_v),
// where d_out / d_v are the per-element unit gradients saved by the fused forward and w the per-sample
// MSE weight. Backward: per-sample scales of those gradients from the incoming [B] gradients, one
// scale_halves pass:
//   KL losses:  s_mean = s_var = g_loss * (T for rescaled_kl, else 1) + g_vb
//   MSE losses: s_mean = g_loss * w + g_mse,  s_var = (g_loss + g_vb) * (T / 1000 for rescaled_mse, else 1)
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/ATen.h>

#include "ddpm_math.h"

namespace ddpm {
namespace op {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct TrainingLosses : public torch::autograd::Function<TrainingLosses> {
  static variable_list forward(AutogradContext* ctx, const Tensor& mo, const Tensor& x0, const Tensor& t,
                               const Tensor& noise, const Tensor& table, int64_t mean_type, int64_t var_type,
                               int64_t loss_type, int64_t weighting, double min_snr_gamma, bool need_grad) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("ddpm_fast::training_losses", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
                             const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
                             int64_t, int64_t, int64_t, double, bool)>();
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, mse, vb, w, d_out, d_v] =
        op.call(mo, x0, t, noise, table, mean_type, var_type, loss_type, weighting, min_snr_gamma, need_grad);
    ctx->save_for_backward({w, d_out, d_v, mo});
    ctx->saved_data["loss_type"] = loss_type;
    ctx->saved_data["learned"] = var_type == kLearned || var_type == kLearnedRange;  // d_v holds a gradient
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
    static auto scale = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("ddpm_fast::scale_halves", "")
                            .typed<Tensor(const Tensor&, const std::optional<Tensor>&, const Tensor&,
                                          const Tensor&, const Tensor&)>();
    std::optional<Tensor> dv = ctx->saved_data["learned"].toBool() ? std::optional<Tensor>(d_v) : std::nullopt;
    none[0] = scale.call(d_out, dv, s_mean.contiguous(), s_var.contiguous(), mo);
    return none;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> training_losses_autograd(
    const Tensor& mo, const Tensor& x0, const Tensor& t, const Tensor& noise, const Tensor& table, int64_t mean_type,
    int64_t var_type, int64_t loss_type, int64_t weighting, double min_snr_gamma, bool need_grad) {
  auto r = TrainingLosses::apply(mo, x0, t, noise, table, mean_type, var_type, loss_type, weighting, min_snr_gamma,
                                 need_grad);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

}  // namespace
}  // namespace op
}  // namespace ddpm

TORCH_LIBRARY_IMPL(ddpm_fast, Autograd, m) { m.impl("training_losses", &ddpm::op::training_losses_autograd); }
