// ops/forward_process.cpp -- the forward-process family: q_sample, velocity (no autograd kernel), q_posterior,
// predict_xstart and the shared backward linear_backward (schemas, host functions, autograd kernels; bodies in
// forward_process.h).
#include "forward_process.h"

#include "autograd_common.h"
#include "host.h"

namespace ddpm {
namespace op {
namespace {

// q_sample's x_t, or the velocity target v (QSampleElem)
Tensor noising(const Tensor& x0, const Tensor& t, const Tensor& noise, const Tensor& table, bool velocity) {
  using Body = QSampleElem<float>;
  check_inputs("x0", x0, "noise", noise, t, table);
  Runner<QSampleElem> r(x0);
  Tensor out = r.new_out(Body::out_x_t);
  r.in(Body::in_x0, x0), r.in(Body::in_noise, noise), r.table(table, t);
  r.set_options([&](auto& o) { o.velocity = velocity; });
  r.run();
  return out;
}

Tensor q_sample(const Tensor& x0, const Tensor& t, const Tensor& noise, const Tensor& table) {
  return noising(x0, t, noise, table, false);
}

Tensor velocity(const Tensor& x0, const Tensor& t, const Tensor& noise, const Tensor& table) {
  return noising(x0, t, noise, table, true);
}
DDPM_DEVICE_OP(q_sample, "(Tensor x0, Tensor t, Tensor noise, Tensor table) -> Tensor")
DDPM_DEVICE_OP(velocity, "(Tensor x0, Tensor t, Tensor noise, Tensor table) -> Tensor")

// kind: LinearOp (the forward op), mean_type: predict_xstart's
std::tuple<Tensor, Tensor> linear_backward(const Tensor& grad, const Tensor& t, const Tensor& table, int64_t kind,
                                           int64_t mean_type) {
  using Body = LinearBackwardElem<float>;
  check_t(t, grad.size(0), table);
  Runner<LinearBackwardElem> r(grad);
  Tensor grad_first = r.new_out(Body::out_grad_first), grad_second = r.new_out(Body::out_grad_second);
  r.in(Body::in_grad, grad), r.table(table, t);
  r.set_options([&](auto& o) { o.op = int(kind), o.mean_type = int(mean_type); });
  r.run();
  return {grad_first, grad_second};
}
DDPM_DEVICE_OP(linear_backward, "(Tensor grad, Tensor t, Tensor table, int kind, int mean_type) -> (Tensor, Tensor)")

std::tuple<Tensor, Tensor, Tensor> q_posterior(const Tensor& x0, const Tensor& x_t, const Tensor& t,
                                               const Tensor& table) {
  using Body = PosteriorElem<float>;
  check_inputs("x0", x0, "x_t", x_t, t, table);
  // the variance and log variance are per-sample table entries; the mean is the kernel's
  Tensor variance = gather_col(table, t, kPostVar).to(x0.scalar_type());
  Tensor log_variance = gather_col(table, t, kPostLogVarClipped).to(x0.scalar_type());
  Runner<PosteriorElem> r(x0);
  Tensor mean = r.new_out(Body::out_mean);
  r.in(Body::in_x0, x0), r.in(Body::in_x_t, x_t), r.table(table, t);
  r.run();
  return {mean, variance, log_variance};
}
DDPM_DEVICE_OP(q_posterior, "(Tensor x0, Tensor x_t, Tensor t, Tensor table) -> (Tensor, Tensor, Tensor)")

Tensor predict_xstart(const Tensor& model_output, const Tensor& x_t, const Tensor& t, const Tensor& table,
                      int64_t mean_type) {
  using Body = PredictElem<float>;
  check_model_inputs(model_output, "x_t", x_t, kFixedSmall, t, table);
  Runner<PredictElem> r(x_t);
  Tensor pred_xstart = r.new_out(Body::out_pred_xstart);
  r.in(Body::in_mean_out, model_output), r.in(Body::in_x_t, x_t), r.table(table, t);
  r.set_options([&](auto& o) { o.mean_type = int(mean_type); });
  r.run();
  return pred_xstart;
}
DDPM_DEVICE_OP(predict_xstart, "(Tensor model_output, Tensor x_t, Tensor t, Tensor table, int mean_type) -> Tensor")

// -- autograd: each backward is one linear_backward (both inputs' coefficients) ------------------------

using LinearBackwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t);

// Gradients w.r.t. the two inputs of the linear op `kind` (q_sample, the posterior mean, predict_xstart)
std::tuple<Tensor, Tensor> linear_grads(const Tensor& g, const Tensor& t, const Tensor& table, LinearOp kind,
                                        int64_t mean_type) {
  static auto op = op_handle<LinearBackwardSig>(DDPM_OP("linear_backward"));
  return op.call(g, t, table, int64_t(kind), mean_type);
}

struct QSample : public torch::autograd::Function<QSample> {
  static Tensor below_autograd(const Tensor& x0, const Tensor& t, const Tensor& noise, const Tensor& table) {
    static auto op =
        op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>(DDPM_OP("q_sample"));
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x0, t, noise, table);
  }
  static Tensor forward(AutogradContext* ctx, const Tensor& x0, const Tensor& t, const Tensor& noise,
                        const Tensor& table) {
    ctx->save_for_backward({t, table});
    return below_autograd(x0, t, noise, table);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto [ga, gb] = linear_grads(grads[0], saved[0], saved[1], kLinearQSample, kEpsilon);
    return {ga, Tensor(), gb, Tensor()};
  }
};

struct QPosterior : public torch::autograd::Function<QPosterior> {
  static std::tuple<Tensor, Tensor, Tensor> below_autograd(const Tensor& x0, const Tensor& x_t, const Tensor& t,
                                                           const Tensor& table) {
    static auto op = op_handle<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                  const Tensor&)>(DDPM_OP("q_posterior"));
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x0, x_t, t, table);
  }
  // var and logvar, functions of t alone, are no outputs of the Function: they come back through `constant`,
  // plain tensors (not marked non-differentiable: compiled autograd asserts a C++ Function marks none)
  static Tensor forward(AutogradContext* ctx, const Tensor& x0, const Tensor& x_t, const Tensor& t, const Tensor& table,
                        std::pair<Tensor, Tensor>* constant) {
    auto [mean, var, logvar] = below_autograd(x0, x_t, t, table);
    ctx->save_for_backward({t, table});
    *constant = {var, logvar};
    return mean;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto [ga, gb] = linear_grads(grads[0], saved[0], saved[1], kLinearPosteriorMean, kEpsilon);
    return {ga, gb, Tensor(), Tensor(), Tensor()};
  }
};

struct PredictXstart : public torch::autograd::Function<PredictXstart> {
  static Tensor below_autograd(const Tensor& mo, const Tensor& x_t, const Tensor& t, const Tensor& table,
                               int64_t mean_type) {
    static auto op = op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t)>(
        DDPM_OP("predict_xstart"));
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(mo, x_t, t, table, mean_type);
  }
  static Tensor forward(AutogradContext* ctx, const Tensor& mo, const Tensor& x_t, const Tensor& t,
                        const Tensor& table, int64_t mean_type) {
    ctx->save_for_backward({t, table});
    ctx->saved_data["mean_type"] = mean_type;
    return below_autograd(mo, x_t, t, table, mean_type);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto [ga, gb] = linear_grads(grads[0], saved[0], saved[1], kLinearPredictXstart,
                                 ctx->saved_data["mean_type"].toInt());
    return {ga, gb, Tensor(), Tensor(), Tensor()};
  }
};

Tensor q_sample_autograd(const Tensor& x0, const Tensor& t, const Tensor& noise, const Tensor& table) {
  if (!needs_autograd_node(x0, t, noise, table)) return QSample::below_autograd(x0, t, noise, table);
  return QSample::apply(x0, t, noise, table);
}
DDPM_AUTOGRAD_OP(q_sample, q_sample_autograd)

std::tuple<Tensor, Tensor, Tensor> q_posterior_autograd(const Tensor& x0, const Tensor& x_t, const Tensor& t,
                                                        const Tensor& table) {
  if (!needs_autograd_node(x0, x_t, t, table)) return QPosterior::below_autograd(x0, x_t, t, table);
  std::pair<Tensor, Tensor> constant;
  Tensor mean = QPosterior::apply(x0, x_t, t, table, &constant);
  return {mean, constant.first, constant.second};
}
DDPM_AUTOGRAD_OP(q_posterior, q_posterior_autograd)

Tensor predict_xstart_autograd(const Tensor& mo, const Tensor& x_t, const Tensor& t, const Tensor& table,
                               int64_t mean_type) {
  if (!needs_autograd_node(mo, x_t, t, table)) return PredictXstart::below_autograd(mo, x_t, t, table, mean_type);
  return PredictXstart::apply(mo, x_t, t, table, mean_type);
}
DDPM_AUTOGRAD_OP(predict_xstart, predict_xstart_autograd)

}  // namespace
}  // namespace op
}  // namespace ddpm
