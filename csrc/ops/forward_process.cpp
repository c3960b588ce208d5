// ops/forward_process.cpp -- the forward-process family: q_sample, q_posterior, predict_xstart and their
// shared backward linear_backward (schemas, host functions; bodies in forward_process.h).
#include "forward_process.h"

#include "host.h"

namespace ddpm {
namespace op {
namespace {

Tensor q_sample(const Tensor& x0, const Tensor& t, const Tensor& noise, const Tensor& table) {
  using Body = QSampleElem<float>;
  check_input("x0", x0);
  check_same("noise", noise, "x0", x0);
  check_t(t, x0.size(0), table);
  Plan p = make_plan(x0);
  Tensor x_t = alloc_like_plan(p, x0.sizes(), x0.options());
  Runner<QSampleElem> r(p, x0, x0.scalar_type() == at::kDouble);
  r.in(Body::in_x0, x0), r.in(Body::in_noise, noise), r.out(Body::out_x_t, x_t), r.table(table, t);
  r.run();
  return x_t;
}

// kind: LinearOp (the forward op), mean_type: predict_xstart's
std::tuple<Tensor, Tensor> linear_backward(const Tensor& grad, const Tensor& t, const Tensor& table, int64_t kind,
                                           int64_t mean_type) {
  using Body = LinearBackwardElem<float>;
  check_t(t, grad.size(0), table);
  Plan p = make_plan(grad);
  Tensor grad_first = alloc_like_plan(p, grad.sizes(), grad.options());
  Tensor grad_second = alloc_like_plan(p, grad.sizes(), grad.options());
  Runner<LinearBackwardElem> r(p, grad, grad.scalar_type() == at::kDouble);
  r.in(Body::in_grad, grad), r.out(Body::out_grad_first, grad_first), r.out(Body::out_grad_second, grad_second);
  r.table(table, t);
  r.set_options([&](auto& o) { o.op = int(kind), o.mean_type = int(mean_type); });
  r.run();
  return {grad_first, grad_second};
}

std::tuple<Tensor, Tensor, Tensor> q_posterior(const Tensor& x0, const Tensor& x_t, const Tensor& t,
                                               const Tensor& table) {
  using Body = PosteriorElem<float>;
  check_input("x0", x0);
  check_same("x_t", x_t, "x0", x0);
  check_t(t, x0.size(0), table);
  Plan p = make_plan(x0);
  Tensor mean = alloc_like_plan(p, x0.sizes(), x0.options());
  Runner<PosteriorElem> r(p, x0, x0.scalar_type() == at::kDouble);
  r.in(Body::in_x0, x0), r.in(Body::in_x_t, x_t), r.out(Body::out_mean, mean), r.table(table, t);
  r.run();
  return {mean, gather_col(table, t, kPostVar).to(x0.scalar_type()),
          gather_col(table, t, kPostLogVarClipped).to(x0.scalar_type())};
}

Tensor predict_xstart(const Tensor& mo, const Tensor& x_t, const Tensor& t, const Tensor& table, int64_t mean_type) {
  using Body = PredictElem<float>;
  check_input("x_t", x_t);
  check_model_output(mo, "x_t", x_t, kFixedSmall);
  check_t(t, x_t.size(0), table);
  Plan p = make_plan(x_t);
  Tensor pred_xstart = alloc_like_plan(p, x_t.sizes(), x_t.options());
  Runner<PredictElem> r(p, x_t, x_t.scalar_type() == at::kDouble);
  r.in(Body::in_mean_out, mo), r.in(Body::in_x_t, x_t), r.out(Body::out_pred_xstart, pred_xstart), r.table(table, t);
  r.set_options([&](auto& o) { o.mean_type = int(mean_type); });
  r.run();
  return pred_xstart;
}

void impls(torch::Library& m) {
  m.impl("q_sample", &q_sample);
  m.impl("linear_backward", &linear_backward);
  m.impl("q_posterior", &q_posterior);
  m.impl("predict_xstart", &predict_xstart);
}

}  // namespace
}  // namespace op
}  // namespace ddpm

DDPM_TORCH_LIBRARY_FRAGMENT(DDPM_NS, m) {
  m.def("q_sample(Tensor x0, Tensor t, Tensor noise, Tensor table) -> Tensor");
  m.def("linear_backward(Tensor grad, Tensor t, Tensor table, int kind, int mean_type) -> (Tensor, Tensor)");
  m.def("q_posterior(Tensor x0, Tensor x_t, Tensor t, Tensor table) -> (Tensor, Tensor, Tensor)");
  m.def("predict_xstart(Tensor model_output, Tensor x_t, Tensor t, Tensor table, int mean_type) -> Tensor");
}
DDPM_TORCH_LIBRARY_IMPL(DDPM_NS, CPU, m) { ddpm::op::impls(m); }
#ifdef DDPM_WITH_CUDA
TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) { ddpm::op::impls(m); }
#endif
