// ops/sampling.cpp -- the sampling family: p_mean_variance, p_sample_step (ancestral DDPM step) and ddim_step
// (schemas, host functions; bodies in sampling.h). No autograd: ddpm_fast/native.py runs the reference when
// their inputs require grad.
#include "sampling.h"

#include "host.h"

namespace ddpm {
namespace op {
namespace {

void check_thresh(const c10::optional<Tensor>& thresh, const Tensor& x) {
  if (!thresh.has_value() || !thresh->defined()) return;
  TORCH_CHECK(thresh->dim() == 1 && thresh->size(0) == x.size(0) && thresh->is_contiguous() &&
                  thresh->scalar_type() == compute_type(x.scalar_type()) && thresh->device() == x.device(),
              "thresh: expected a contiguous [B] tensor in the compute dtype");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> p_mean_variance(const Tensor& mo, const Tensor& x_t, const Tensor& t,
                                                           const Tensor& table, int64_t mean_type, int64_t var_type,
                                                           bool clip, const c10::optional<Tensor>& thresh) {
  using Body = PMeanVarElem<float>;
  check_input("x_t", x_t);
  check_model_output(mo, "x_t", x_t, var_type);
  check_t(t, x_t.size(0), table);
  check_thresh(thresh, x_t);
  bool learned = is_learned(var_type);
  Plan p = make_plan(x_t);
  auto [mean_out, var_out] = halves(mo, learned);
  Tensor mean = alloc_like_plan(p, x_t.sizes(), x_t.options());
  Tensor pred_xstart = alloc_like_plan(p, x_t.sizes(), x_t.options());
  Tensor log_variance, variance;
  if (learned) {
    log_variance = alloc_like_plan(p, x_t.sizes(), x_t.options());
    variance = alloc_like_plan(p, x_t.sizes(), x_t.options());
  } else {
    Tensor fixed = gather_col(table, t, var_type == kFixedLarge ? kFixedLargeLogVar : kPostLogVarClipped);
    log_variance = fixed.to(x_t.scalar_type());
    variance = fixed.exp().to(x_t.scalar_type());
  }
  Runner<PMeanVarElem> r(p, x_t, x_t.scalar_type() == at::kDouble);
  r.in(Body::in_mean_out, mean_out), r.in(Body::in_var_out, var_out), r.in(Body::in_x_t, x_t);
  r.out(Body::out_mean, mean), r.out(Body::out_pred_xstart, pred_xstart);
  if (learned) r.out(Body::out_log_variance, log_variance), r.out(Body::out_variance, variance);
  r.table(table, t);
  r.set_options([&](auto& o) { set_model_options(o, mean_type, var_type, clip, thresh); });
  r.run();
  return {mean, variance, log_variance, pred_xstart};
}

std::tuple<Tensor, Tensor> p_sample_step(const Tensor& mo, const Tensor& x_t, const Tensor& t, const Tensor& table,
                                         int64_t mean_type, int64_t var_type, bool clip,
                                         const c10::optional<Tensor>& thresh, const c10::optional<Tensor>& noise,
                                         int64_t seed, const c10::optional<Tensor>& seed_key) {
  using Body = PSampleElem<float>;
  check_input("x_t", x_t);
  check_model_output(mo, "x_t", x_t, var_type);
  check_t(t, x_t.size(0), table);
  check_thresh(thresh, x_t);
  bool learned = is_learned(var_type);
  Tensor given_noise = noise.has_value() ? *noise : Tensor();
  if (given_noise.defined()) check_same("noise", given_noise, "x_t", x_t);
  Plan p = make_plan(x_t);
  auto [mean_out, var_out] = halves(mo, learned);
  Tensor sample = alloc_like_plan(p, x_t.sizes(), x_t.options());
  Tensor pred_xstart = alloc_like_plan(p, x_t.sizes(), x_t.options());
  Runner<PSampleElem> r(p, x_t, x_t.scalar_type() == at::kDouble);
  r.in(Body::in_mean_out, mean_out), r.in(Body::in_var_out, var_out), r.in(Body::in_x_t, x_t);
  r.out(Body::out_sample, sample), r.out(Body::out_pred_xstart, pred_xstart), r.table(table, t);
  if (given_noise.defined()) r.in(Body::in_noise, given_noise);
  else r.philox_noise(Body::in_noise, seed, seed_key);
  r.set_options([&](auto& o) { set_model_options(o, mean_type, var_type, clip, thresh); });
  r.run();
  return {sample, pred_xstart};
}

std::tuple<Tensor, Tensor> ddim_step(const Tensor& mo, const Tensor& x_t, const Tensor& t, const Tensor& table,
                                     int64_t mean_type, int64_t var_type, bool clip,
                                     const c10::optional<Tensor>& thresh, double eta,
                                     const c10::optional<Tensor>& noise, int64_t seed,
                                     const c10::optional<Tensor>& seed_key) {
  using Body = DdimElem<float>;
  check_input("x_t", x_t);
  check_model_output(mo, "x_t", x_t, var_type);
  check_t(t, x_t.size(0), table);
  check_thresh(thresh, x_t);
  Tensor given_noise = noise.has_value() ? *noise : Tensor();
  if (given_noise.defined()) check_same("noise", given_noise, "x_t", x_t);
  Plan p = make_plan(x_t);
  Tensor mean_out = halves(mo, is_learned(var_type)).first;
  Tensor sample = alloc_like_plan(p, x_t.sizes(), x_t.options());
  Tensor pred_xstart = alloc_like_plan(p, x_t.sizes(), x_t.options());
  Runner<DdimElem> r(p, x_t, x_t.scalar_type() == at::kDouble);
  r.in(Body::in_mean_out, mean_out), r.in(Body::in_x_t, x_t);
  r.out(Body::out_sample, sample), r.out(Body::out_pred_xstart, pred_xstart), r.table(table, t);
  if (eta != 0.0) {  // eta 0: deterministic, no noise read
    if (given_noise.defined()) r.in(Body::in_noise, given_noise);
    else r.philox_noise(Body::in_noise, seed, seed_key);
  }
  r.set_options([&](auto& o) {
    set_model_options(o, mean_type, var_type, clip, thresh);
    o.eta = static_cast<std::remove_reference_t<decltype(o.eta)>>(eta);
  });
  r.run();
  return {sample, pred_xstart};
}

void impls(torch::Library& m) {
  m.impl("p_mean_variance", &p_mean_variance);
  m.impl("p_sample_step", &p_sample_step);
  m.impl("ddim_step", &ddim_step);
}

}  // namespace
}  // namespace op
}  // namespace ddpm

DDPM_TORCH_LIBRARY_FRAGMENT(DDPM_NS, m) {
  m.def("p_mean_variance(Tensor model_output, Tensor x_t, Tensor t, Tensor table, int mean_type, int var_type, "
        "bool clip, Tensor? thresh) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("p_sample_step(Tensor model_output, Tensor x_t, Tensor t, Tensor table, int mean_type, int var_type, "
        "bool clip, Tensor? thresh, Tensor? noise, int seed, Tensor? seed_key=None) -> (Tensor, Tensor)");
  m.def("ddim_step(Tensor model_output, Tensor x_t, Tensor t, Tensor table, int mean_type, int var_type, "
        "bool clip, Tensor? thresh, float eta, Tensor? noise, int seed, Tensor? seed_key=None) -> (Tensor, Tensor)");
}
DDPM_TORCH_LIBRARY_IMPL(DDPM_NS, CPU, m) { ddpm::op::impls(m); }
#ifdef DDPM_WITH_CUDA
TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) { ddpm::op::impls(m); }
#endif
