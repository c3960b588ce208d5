// ops/sampling.cpp -- the sampling family: p_mean_variance, p_sample_step (ancestral DDPM step) and ddim_step
// (schemas, host functions; bodies in sampling.h). No autograd: ddpm_fast/native.py runs the reference when
// their inputs require grad.
#include "sampling.h"

#include "host.h"

namespace ddpm {
namespace op {
namespace {

// The checks of a sampler step's inputs: x_t, model_output, t, thresh and noise (when given)
void check_sampler_inputs(const Tensor& model_output, const Tensor& x_t, const Tensor& t, const Tensor& table,
                          int64_t var_type, const c10::optional<Tensor>& thresh, const c10::optional<Tensor>& noise) {
  check_model_inputs(model_output, "x_t", x_t, var_type, t, table);
  if (thresh.has_value() && thresh->defined())
    TORCH_CHECK(thresh->dim() == 1 && thresh->size(0) == x_t.size(0) && thresh->is_contiguous() &&
                    thresh->scalar_type() == compute_type(x_t.scalar_type()) && thresh->device() == x_t.device(),
                "thresh: expected a contiguous [B] tensor in the compute dtype");
  if (noise.has_value() && noise->defined()) check_same("noise", *noise, "x_t", x_t);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> p_mean_variance(const Tensor& model_output, const Tensor& x_t,
                                                           const Tensor& t, const Tensor& table, int64_t mean_type,
                                                           int64_t var_type, bool clip,
                                                           const c10::optional<Tensor>& thresh) {
  using Body = PMeanVarElem<float>;
  check_sampler_inputs(model_output, x_t, t, table, var_type, thresh, c10::nullopt);
  const bool learned = is_learned(var_type);
  auto [mean_out, var_out] = halves(model_output, learned);
  Runner<PMeanVarElem> r(x_t);
  Tensor mean = r.new_out(Body::out_mean), pred_xstart = r.new_out(Body::out_pred_xstart);
  Tensor log_variance, variance;
  if (learned) {  // per element, the kernel's
    log_variance = r.new_out(Body::out_log_variance), variance = r.new_out(Body::out_variance);
  } else {  // per sample, a table entry
    Tensor fixed = gather_col(table, t, var_type == kFixedLarge ? kFixedLargeLogVar : kPostLogVarClipped);
    log_variance = fixed.to(x_t.scalar_type());
    variance = fixed.exp().to(x_t.scalar_type());
  }
  r.in(Body::in_mean_out, mean_out), r.in(Body::in_var_out, var_out), r.in(Body::in_x_t, x_t), r.table(table, t);
  r.set_options([&](auto& o) { set_model_options(o, mean_type, var_type, clip, thresh); });
  r.run();
  return {mean, variance, log_variance, pred_xstart};
}
DDPM_DEVICE_OP(p_mean_variance, "(Tensor model_output, Tensor x_t, Tensor t, Tensor table, int mean_type, "
                                "int var_type, bool clip, Tensor? thresh) -> (Tensor, Tensor, Tensor, Tensor)")

std::tuple<Tensor, Tensor> p_sample_step(const Tensor& model_output, const Tensor& x_t, const Tensor& t,
                                         const Tensor& table, int64_t mean_type, int64_t var_type, bool clip,
                                         const c10::optional<Tensor>& thresh, const c10::optional<Tensor>& noise,
                                         int64_t seed, const c10::optional<Tensor>& seed_key) {
  using Body = PSampleElem<float>;
  check_sampler_inputs(model_output, x_t, t, table, var_type, thresh, noise);
  auto [mean_out, var_out] = halves(model_output, is_learned(var_type));
  Runner<PSampleElem> r(x_t);
  Tensor sample = r.new_out(Body::out_sample), pred_xstart = r.new_out(Body::out_pred_xstart);
  r.in(Body::in_mean_out, mean_out), r.in(Body::in_var_out, var_out), r.in(Body::in_x_t, x_t), r.table(table, t);
  r.noise(Body::in_noise, noise, seed, seed_key);
  r.set_options([&](auto& o) { set_model_options(o, mean_type, var_type, clip, thresh); });
  r.run();
  return {sample, pred_xstart};
}
DDPM_DEVICE_OP(p_sample_step, "(Tensor model_output, Tensor x_t, Tensor t, Tensor table, int mean_type, "
                              "int var_type, bool clip, Tensor? thresh, Tensor? noise, int seed, "
                              "Tensor? seed_key=None) -> (Tensor, Tensor)")

std::tuple<Tensor, Tensor> ddim_step(const Tensor& model_output, const Tensor& x_t, const Tensor& t,
                                     const Tensor& table, int64_t mean_type, int64_t var_type, bool clip,
                                     const c10::optional<Tensor>& thresh, double eta,
                                     const c10::optional<Tensor>& noise, int64_t seed,
                                     const c10::optional<Tensor>& seed_key) {
  using Body = DdimElem<float>;
  check_sampler_inputs(model_output, x_t, t, table, var_type, thresh, noise);
  Runner<DdimElem> r(x_t);
  Tensor sample = r.new_out(Body::out_sample), pred_xstart = r.new_out(Body::out_pred_xstart);
  r.in(Body::in_mean_out, halves(model_output, is_learned(var_type)).first), r.in(Body::in_x_t, x_t);
  r.table(table, t);
  if (eta != 0.0) r.noise(Body::in_noise, noise, seed, seed_key);  // eta 0: deterministic, no noise read
  r.set_options([&](auto& o) {
    set_model_options(o, mean_type, var_type, clip, thresh);
    o.eta = static_cast<std::remove_reference_t<decltype(o.eta)>>(eta);
  });
  r.run();
  return {sample, pred_xstart};
}
DDPM_DEVICE_OP(ddim_step, "(Tensor model_output, Tensor x_t, Tensor t, Tensor table, int mean_type, int var_type, "
                          "bool clip, Tensor? thresh, float eta, Tensor? noise, int seed, Tensor? seed_key=None) "
                          "-> (Tensor, Tensor)")

}  // namespace
}  // namespace op
}  // namespace ddpm
