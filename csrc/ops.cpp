// ops.cpp -- TORCH_LIBRARY(ddpm_fast): schemas, and one implementation per op registered for CPU and
// CUDA. An implementation checks its arguments, plans the iteration (layout.h), allocates the outputs
// (the same way on every device) and hands a Launch to the device driver. The fake (meta) impls, which
// must take symbolic shapes under torch.compile, are Python: ddpm_fast/native.py registers them.
// Option ints index ddpm_fast.reference.{MEAN_TYPES, VAR_TYPES, LOSS_TYPES, WEIGHTINGS}.
#include <torch/library.h>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include "launch.h"
#include "op_namespace.h"

namespace ddpm {
namespace op {

using at::Tensor;

// Whether x's op takes the CUDA host path (operands copied into the plan's layout, cast temporaries,
// no host read of t, cuda/kernels.cu): CUDA tensors, or every tensor in the emulated-CUDA build.
inline bool cuda_path(const Tensor& x) {
#ifdef DDPM_CUDA_EMU
  (void)x;
  return true;
#else
  return x.is_cuda();
#endif
}

at::ScalarType compute_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// Argument checks, once, here: ddpm_fast/ops.py sends CPU tensors on the compiled path straight to these
// (no Python duplicate of them), so each raises the Python exception ops.py would (TypeError / ValueError
// through TORCH_CHECK_TYPE / TORCH_CHECK_VALUE) with a message that names the argument.
void check_t(const Tensor& t, int64_t B, const Tensor& table) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "t: expected an int64 tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == B && t.is_contiguous(), "t: expected a contiguous tensor of shape (",
                    B, ",), got shape ", t.sizes());
  TORCH_CHECK(table.dim() == 2 && table.size(1) >= kNumCols && table.is_contiguous(),
              "table: expected the schedule's packed table [T, ", int(kNumCols), "]");
  TORCH_CHECK_VALUE(t.device() == table.device(), "t: expected it on the table's device ", table.device(),
                    ", got ", t.device());
  if (!cuda_path(t)) {
    const int64_t* tp = t.data_ptr<int64_t>();
    const int64_t T = table.size(0);
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK_VALUE(tp[b] >= 0 && tp[b] < T, "t: expected timesteps in [0, ", T, "), got ", tp[b]);
  }
}

void check_input(const char* name, const Tensor& x) {
  const auto s = x.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, name,
                   ": expected a float16, bfloat16, float32 or float64 tensor, got ", s);
  TORCH_CHECK_VALUE(x.dim() >= 1, name, ": expected a batched tensor [B, ...], got a 0-dim tensor");
}

// x is checked against ref (itself already checked): same shape, device and dtype; the message names both
void check_same(const char* name, const Tensor& x, const char* ref_name, const Tensor& ref) {
  TORCH_CHECK_VALUE(x.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), " (that of ", ref_name,
                    "), got ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == ref.device(), name, ": expected device ", ref.device(), " (like ", ref_name,
                    "), got ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " (that of ",
                   ref_name, "), got ", x.scalar_type());
}

// The driver's view of x; on CUDA a non-direct input is first copied into the plan's layout. The Operand
// holds a raw pointer, so the tensor it points into is kept alive in `keep` until the launch has run: x
// may be a temporary (run_bcast's cast of a broadcast fp16 / bf16 input to the compute dtype).
Operand operand(const Plan& p, const Tensor& x, std::vector<Tensor>& keep) {
  Operand o;
  if (!x.defined()) return o;
  Tensor y = x;
  if (cuda_path(x) && !is_direct(p, x)) {
    y = alloc_like_plan(p, x.sizes(), x.options());
    y.copy_(x);
  }
  keep.push_back(y);
  o.dtype = y.scalar_type();
  o.direct = is_direct(p, y);
  o.batch_stride = y.size(0) == 1 ? p.N : y.stride(0);
  for (int k = 0; k < p.nd; ++k) o.stride[k] = y.stride(p.dim[k]);
  o.base = static_cast<char*>(y.data_ptr());
  return o;
}

struct Runner {
  Launch L;
  std::vector<Tensor> keep;
  std::vector<std::pair<Tensor, Tensor>> copy_back;  // (tmp, target) for CUDA outputs not direct
  Tensor device_ref;

  Runner(Body body, const Plan& plan, const Tensor& ref, bool dbl) : device_ref(ref) {
    L.body = body;
    L.plan = plan;
    L.dbl = dbl;
  }
  void in(const Tensor& x) { L.in.push_back(operand(L.plan, x, keep)); }
  void out(const Tensor& x) {
    if (x.defined() && cuda_path(x) && !is_direct(L.plan, x)) {
      Tensor tmp = alloc_like_plan(L.plan, x.sizes(), x.options());
      copy_back.emplace_back(tmp, x);
      L.out.push_back(operand(L.plan, tmp, keep));
      return;
    }
    L.out.push_back(operand(L.plan, x, keep));
  }
  void table(const Tensor& table, const Tensor& t) {
    L.table = table.data_ptr();
    L.ncols = table.size(1);
    L.nrows = table.size(0);
    L.t = t.defined() ? t.data_ptr<int64_t>() : nullptr;
  }
  template <class Fn> void params(Fn fn) {
    fn(L.pf);
    fn(L.pd);
  }
  void run() {
    if (L.plan.B == 0 || L.plan.N == 0) return;
    c10::DeviceGuard guard(device_ref.device());
#ifdef DDPM_CUDA_EMU
    launch_cuda(L);  // emulated on the CPU: CPU tensors take the CUDA host path
    for (auto& [tmp, target] : copy_back) target.copy_(tmp);
#else
    if (device_ref.is_cpu()) {
      launch_cpu(L);
    } else if (device_ref.is_cuda()) {
#ifdef DDPM_WITH_CUDA
      launch_cuda(L);
      for (auto& [tmp, target] : copy_back) target.copy_(tmp);
#else
      TORCH_CHECK(false, "ddpm_fast._C was built without CUDA kernels");
#endif
    } else {
      TORCH_CHECK(false, "ddpm_fast._C: unsupported device ", device_ref.device());
    }
#endif
  }
};

Tensor gather_col(const Tensor& table, const Tensor& t, int64_t col) {
  return table.select(1, col).index_select(0, t);
}

Tensor empty0(const Tensor& like, at::ScalarType dtype) { return at::empty({0}, like.options().dtype(dtype)); }

std::pair<Tensor, Tensor> halves(const Tensor& mo, bool learned) {
  if (!learned) return {mo, Tensor()};
  int64_t c = mo.size(1) / 2;
  return {mo.narrow(1, 0, c), mo.narrow(1, c, c)};
}

// model_output against x (x_t or x0, named x_name, checked first): its shape, or doubled channels for a
// learned variance
void check_model_output(const Tensor& mo, const char* x_name, const Tensor& x, int64_t var_type) {
  TORCH_CHECK_TYPE(mo.scalar_type() == x.scalar_type(), "model_output: expected dtype ", x.scalar_type(),
                   " (that of ", x_name, "), got ", mo.scalar_type());
  TORCH_CHECK_VALUE(mo.device() == x.device(), "model_output: expected device ", x.device(), " (like ", x_name,
                    "), got ", mo.device());
  if (is_learned(var_type)) {
    bool ok = x.dim() >= 2 && mo.dim() == x.dim() && mo.size(1) == 2 * x.size(1);
    for (int64_t d = 0; ok && d < x.dim(); ++d) ok = d == 1 || mo.size(d) == x.size(d);
    TORCH_CHECK_VALUE(ok, "model_output: a learned variance needs ", x_name, "'s shape ", x.sizes(),
                      " with doubled channels (mean and variance halves), got ", mo.sizes());
  } else {
    TORCH_CHECK_VALUE(mo.sizes() == x.sizes(), "model_output: expected shape ", x.sizes(), " (that of ", x_name,
                      "), got ", mo.sizes());
  }
}

// ---- ops ---------------------------------------------------------------------------------------------
Tensor q_sample(const Tensor& x0, const Tensor& t, const Tensor& noise, const Tensor& table) {
  check_input("x0", x0);
  check_same("noise", noise, "x0", x0);
  check_t(t, x0.size(0), table);
  Plan p = make_plan(x0);
  Tensor out = alloc_like_plan(p, x0.sizes(), x0.options());
  Runner r(Body::QSample, p, x0, x0.scalar_type() == at::kDouble);
  r.in(x0), r.in(noise), r.out(out), r.table(table, t);
  r.run();
  return out;
}

std::tuple<Tensor, Tensor> linear_backward(const Tensor& grad, const Tensor& t, const Tensor& table, int64_t kind,
                                           int64_t mean_type) {
  check_t(t, grad.size(0), table);
  Plan p = make_plan(grad);
  Tensor ga = alloc_like_plan(p, grad.sizes(), grad.options());
  Tensor gb = alloc_like_plan(p, grad.sizes(), grad.options());
  Runner r(Body::LinearBackward, p, grad, grad.scalar_type() == at::kDouble);
  r.in(grad), r.out(ga), r.out(gb), r.table(table, t);
  r.params([&](auto& q) { q.kind = int(kind), q.mean_type = int(mean_type); });
  r.run();
  return {ga, gb};
}

std::tuple<Tensor, Tensor, Tensor> q_posterior(const Tensor& x0, const Tensor& x_t, const Tensor& t,
                                               const Tensor& table) {
  check_input("x0", x0);
  check_same("x_t", x_t, "x0", x0);
  check_t(t, x0.size(0), table);
  Plan p = make_plan(x0);
  Tensor mean = alloc_like_plan(p, x0.sizes(), x0.options());
  Runner r(Body::Posterior, p, x0, x0.scalar_type() == at::kDouble);
  r.in(x0), r.in(x_t), r.out(mean), r.table(table, t);
  r.run();
  return {mean, gather_col(table, t, kPostVar).to(x0.scalar_type()),
          gather_col(table, t, kPostLogVarClipped).to(x0.scalar_type())};
}

Tensor predict_xstart(const Tensor& mo, const Tensor& x_t, const Tensor& t, const Tensor& table, int64_t mean_type) {
  check_input("x_t", x_t);
  check_model_output(mo, "x_t", x_t, kFixedSmall);
  check_t(t, x_t.size(0), table);
  Plan p = make_plan(x_t);
  Tensor out = alloc_like_plan(p, x_t.sizes(), x_t.options());
  Runner r(Body::Predict, p, x_t, x_t.scalar_type() == at::kDouble);
  r.in(mo), r.in(x_t), r.out(out), r.table(table, t);
  r.params([&](auto& q) { q.mean_type = int(mean_type); });
  r.run();
  return out;
}

template <class P> void model_params(P& q, int64_t mean_type, int64_t var_type, bool clip,
                                     const c10::optional<Tensor>& thresh) {
  using S = std::remove_pointer_t<decltype(q.thresh)>;
  q.mean_type = int(mean_type);
  q.var_type = int(var_type);
  q.clip = clip;
  q.learned = is_learned(var_type);
  q.thresh = nullptr;
  if (thresh.has_value() && thresh->defined() &&
      thresh->scalar_type() == c10::CppTypeToScalarType<std::remove_const_t<S>>::value)
    q.thresh = thresh->data_ptr<std::remove_const_t<S>>();
}

void check_thresh(const c10::optional<Tensor>& thresh, const Tensor& x) {
  if (!thresh.has_value() || !thresh->defined()) return;
  TORCH_CHECK(thresh->dim() == 1 && thresh->size(0) == x.size(0) && thresh->is_contiguous() &&
                  thresh->scalar_type() == compute_type(x.scalar_type()) && thresh->device() == x.device(),
              "thresh: expected a contiguous [B] tensor in the compute dtype");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> p_mean_variance(const Tensor& mo, const Tensor& x_t, const Tensor& t,
                                                           const Tensor& table, int64_t mean_type, int64_t var_type,
                                                           bool clip, const c10::optional<Tensor>& thresh) {
  check_input("x_t", x_t);
  check_model_output(mo, "x_t", x_t, var_type);
  check_t(t, x_t.size(0), table);
  check_thresh(thresh, x_t);
  bool learned = is_learned(var_type);
  Plan p = make_plan(x_t);
  auto [out, v] = halves(mo, learned);
  Tensor mean = alloc_like_plan(p, x_t.sizes(), x_t.options());
  Tensor pred = alloc_like_plan(p, x_t.sizes(), x_t.options());
  Tensor lv, var;
  if (learned) {
    lv = alloc_like_plan(p, x_t.sizes(), x_t.options());
    var = alloc_like_plan(p, x_t.sizes(), x_t.options());
  } else {
    Tensor flv = gather_col(table, t, var_type == kFixedLarge ? kFixedLargeLogVar : kPostLogVarClipped);
    lv = flv.to(x_t.scalar_type());
    var = flv.exp().to(x_t.scalar_type());
  }
  Runner r(Body::PMeanVar, p, x_t, x_t.scalar_type() == at::kDouble);
  r.in(out), r.in(v), r.in(x_t);
  r.out(mean), r.out(learned ? lv : Tensor()), r.out(learned ? var : Tensor()), r.out(pred);
  r.table(table, t);
  r.params([&](auto& q) { model_params(q, mean_type, var_type, clip, thresh); });
  r.run();
  return {mean, var, lv, pred};
}

std::tuple<Tensor, Tensor> p_sample_step(const Tensor& mo, const Tensor& x_t, const Tensor& t, const Tensor& table,
                                         int64_t mean_type, int64_t var_type, bool clip,
                                         const c10::optional<Tensor>& thresh, const c10::optional<Tensor>& noise,
                                         int64_t seed) {
  check_input("x_t", x_t);
  check_model_output(mo, "x_t", x_t, var_type);
  check_t(t, x_t.size(0), table);
  check_thresh(thresh, x_t);
  bool learned = is_learned(var_type);
  Tensor nz = noise.has_value() ? *noise : Tensor();
  if (nz.defined()) check_same("noise", nz, "x_t", x_t);
  Plan p = make_plan(x_t);
  auto [out, v] = halves(mo, learned);
  Tensor sample = alloc_like_plan(p, x_t.sizes(), x_t.options());
  Tensor pred = alloc_like_plan(p, x_t.sizes(), x_t.options());
  Runner r(Body::PSample, p, x_t, x_t.scalar_type() == at::kDouble);
  r.in(out), r.in(v), r.in(x_t), r.in(nz), r.out(sample), r.out(pred), r.table(table, t);
  if (!nz.defined()) {
    r.L.noise_input = 3;
    r.L.seed = static_cast<uint64_t>(seed);
  }
  r.params([&](auto& q) { model_params(q, mean_type, var_type, clip, thresh); });
  r.run();
  return {sample, pred};
}

std::tuple<Tensor, Tensor> ddim_step(const Tensor& mo, const Tensor& x_t, const Tensor& t, const Tensor& table,
                                     int64_t mean_type, int64_t var_type, bool clip,
                                     const c10::optional<Tensor>& thresh, double eta,
                                     const c10::optional<Tensor>& noise, int64_t seed) {
  check_input("x_t", x_t);
  check_model_output(mo, "x_t", x_t, var_type);
  check_t(t, x_t.size(0), table);
  check_thresh(thresh, x_t);
  Tensor nz = noise.has_value() ? *noise : Tensor();
  if (nz.defined()) check_same("noise", nz, "x_t", x_t);
  Plan p = make_plan(x_t);
  Tensor out = halves(mo, is_learned(var_type)).first;
  Tensor sample = alloc_like_plan(p, x_t.sizes(), x_t.options());
  Tensor pred = alloc_like_plan(p, x_t.sizes(), x_t.options());
  Runner r(Body::Ddim, p, x_t, x_t.scalar_type() == at::kDouble);
  r.in(out), r.in(x_t), r.in(eta != 0.0 ? nz : Tensor()), r.out(sample), r.out(pred), r.table(table, t);
  if (eta != 0.0 && !nz.defined()) {
    r.L.noise_input = 2;
    r.L.seed = static_cast<uint64_t>(seed);
  }
  r.params([&](auto& q) {
    model_params(q, mean_type, var_type, clip, thresh);
    q.eta = static_cast<std::remove_reference_t<decltype(q.eta)>>(eta);
  });
  r.run();
  return {sample, pred};
}

// NF per-sample results [B] in the compute dtype, registered as the launch's finals
std::vector<Tensor> finals(Runner& r, int nf, const Tensor& x) {
  std::vector<Tensor> f;
  for (int k = 0; k < nf; ++k) {
    auto opts = x.options().dtype(compute_type(x.scalar_type()));
    // a mean over zero elements is NaN (the kernels do not run when a sample has no elements)
    f.push_back(x.numel() == 0 ? at::full({x.size(0)}, std::nan(""), opts) : at::empty({x.size(0)}, opts));
    r.L.finals[k] = f.back().data_ptr();
  }
  return f;
}

// The losses' saved unit gradients w.r.t. the mean and the variance half (plan layout, compute dtype);
// an absent one is an empty [0] tensor.
std::pair<Tensor, Tensor> saved_grads(const Plan& p, const Tensor& x0, at::ScalarType ct, bool need_grad,
                                      bool learned) {
  auto buf = [&](bool want) {
    return want ? alloc_like_plan(p, x0.sizes(), x0.options().dtype(ct)) : empty0(x0, ct);
  };
  return {buf(need_grad), buf(need_grad && learned)};
}

template <class P> void reduce_params(P& q, const Plan& p) {
  using S = std::remove_reference_t<decltype(q.numel)>;
  q.numel = static_cast<S>(p.N);
  q.inv_n = S(1) / static_cast<S>(p.N);
}

std::tuple<Tensor, Tensor, Tensor> vb_terms_bpd(const Tensor& mo, const Tensor& x0, const Tensor& x_t,
                                                const Tensor& t, const Tensor& table, int64_t mean_type,
                                                int64_t var_type, bool clip, bool need_grad) {
  check_input("x_t", x_t);
  check_model_output(mo, "x_t", x_t, var_type);
  check_same("x0", x0, "x_t", x_t);
  check_t(t, x_t.size(0), table);
  bool learned = is_learned(var_type);
  Plan p = make_plan(x0);
  auto [out, v] = halves(mo, learned);
  auto ct = compute_type(x0.scalar_type());
  auto [d_out, d_v] = saved_grads(p, x0, ct, need_grad, learned);
  Runner r(Body::Vb, p, x0, ct == at::kDouble);
  auto fin = finals(r, 1, x0);
  r.in(out), r.in(v), r.in(x0), r.in(x_t);
  r.out(need_grad ? d_out : Tensor()), r.out(need_grad && learned ? d_v : Tensor());
  r.table(table, t);
  r.params([&](auto& q) {
    model_params(q, mean_type, var_type, clip, c10::nullopt);
    reduce_params(q, p);
    q.need_grad = need_grad;
  });
  r.run();
  return {fin[0], d_out, d_v};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> training_losses(
    const Tensor& mo, const Tensor& x0, const Tensor& t, const Tensor& noise, const Tensor& table, int64_t mean_type,
    int64_t var_type, int64_t loss_type, int64_t weighting, double min_snr_gamma, bool need_grad) {
  check_input("x0", x0);
  check_model_output(mo, "x0", x0, var_type);
  check_same("noise", noise, "x0", x0);
  check_t(t, x0.size(0), table);
  bool learned = is_learned(var_type);
  Plan p = make_plan(x0);
  auto [out, v] = halves(mo, learned);
  auto ct = compute_type(x0.scalar_type());
  auto [d_out, d_v] = saved_grads(p, x0, ct, need_grad, learned);
  // the MSE alone (no vb term) on an eps target reads no x0, on an x0 target no noise (absent inputs read as 0)
  const bool mse_only = !learned && loss_type != kKl && loss_type != kRescaledKl;
  Runner r(mse_only ? Body::TrainMse : Body::Train, p, x0, ct == at::kDouble);
  auto fin = finals(r, 4, x0);
  r.in(out), r.in(learned ? v : Tensor());
  r.in(mse_only && mean_type == kEpsilon ? Tensor() : x0), r.in(mse_only && mean_type == kX0 ? Tensor() : noise);
  r.out(need_grad ? d_out : Tensor()), r.out(need_grad && learned ? d_v : Tensor());
  r.table(table, t);
  const int64_t T = table.size(0);
  r.params([&](auto& q) {
    using S = std::remove_reference_t<decltype(q.numel)>;
    model_params(q, mean_type, var_type, false, c10::nullopt);
    reduce_params(q, p);
    q.loss_type = int(loss_type);
    q.weighting = int(weighting);
    q.min_snr_gamma = static_cast<S>(min_snr_gamma);
    q.need_grad = need_grad;
    q.vb_scale = loss_type == kRescaledMse ? static_cast<S>(T / 1000.0) : S(1);
    q.kl_scale = loss_type == kRescaledKl ? static_cast<S>(T) : S(1);
  });
  r.run();
  return {fin[0], fin[1], fin[2], fin[3], d_out, d_v};
}

Tensor scale_halves(const Tensor& d_out, const c10::optional<Tensor>& d_v, const Tensor& s_mean,
                    const Tensor& s_var, const Tensor& mo) {
  bool learned = d_v.has_value() && d_v->defined() && d_v->numel() > 0;
  auto ct = d_out.scalar_type();
  TORCH_CHECK(s_mean.scalar_type() == ct && s_var.scalar_type() == ct && s_mean.is_contiguous() &&
                  s_var.is_contiguous() && s_mean.numel() == d_out.size(0) && s_var.numel() == d_out.size(0),
              "s_mean, s_var: expected contiguous [B] tensors of the saved gradient's dtype");
  Plan p = make_plan(d_out);
  Tensor grad = alloc_grad_like(mo, mo.scalar_type());
  auto [g0, g1] = halves(grad, learned);
  if (!learned && mo.dim() >= 2 && mo.size(1) == 2 * d_out.size(1) && d_out.size(1) > 0) {
    // a learned-variance model output whose variance half gets no gradient
    g0 = grad.narrow(1, 0, d_out.size(1));
    grad.narrow(1, d_out.size(1), d_out.size(1)).zero_();
  }
  Runner r(Body::Scale, p, d_out, ct == at::kDouble);
  r.in(d_out), r.in(learned ? *d_v : Tensor()), r.out(g0), r.out(learned ? g1 : Tensor());
  if (ct == at::kDouble) {
    r.L.pd.s_a = s_mean.data_ptr<double>(), r.L.pd.s_b = s_var.data_ptr<double>();
  } else {
    r.L.pf.s_a = s_mean.data_ptr<float>(), r.L.pf.s_b = s_var.data_ptr<float>();
  }
  r.run();
  return grad;
}

Tensor prior_bpd(const Tensor& x0, const Tensor& table) {
  TORCH_CHECK(table.dim() == 2 && table.size(1) >= kNumCols && table.is_contiguous() && table.size(0) >= 1,
              "table: expected the schedule's packed table");
  Plan p = make_plan(x0);
  Runner r(Body::Prior, p, x0, x0.scalar_type() == at::kDouble);
  auto fin = finals(r, 1, x0);
  r.in(x0), r.table(table, Tensor());
  r.L.fixed_t = table.size(0) - 1;
  r.params([&](auto& q) { reduce_params(q, p); });
  r.run();
  return fin[0];
}

Tensor prior_bpd_backward(const Tensor& grad, const Tensor& x0, const Tensor& table) {
  Plan p = make_plan(x0);
  auto ct = compute_type(x0.scalar_type());
  Tensor g = grad.to(ct).contiguous();
  Tensor out = alloc_like_plan(p, x0.sizes(), x0.options());
  Runner r(Body::PriorBackward, p, x0, ct == at::kDouble);
  r.in(x0), r.out(out), r.table(table, Tensor());
  r.L.fixed_t = table.size(0) - 1;
  r.params([&](auto& q) { reduce_params(q, p); });
  if (ct == at::kDouble) r.L.pd.s_a = g.data_ptr<double>();
  else r.L.pf.s_a = g.data_ptr<float>();
  r.run();
  return out;
}

// ---- broadcasting elementwise ops ---------------------------------------------------------------------
// Inputs are broadcast (expand: stride-0 views, gathered by the driver) to one shape viewed as [1, ...].
struct Bcast {
  std::vector<int64_t> shape;
  at::ScalarType compute, result;
};

Bcast bcast(at::TensorList xs, at::TensorList for_result) {
  Bcast b;
  b.shape = xs[0].sizes().vec();
  for (const auto& x : xs) b.shape = at::infer_size(b.shape, x.sizes());
  bool any_double = false;
  for (const auto& x : xs) any_double |= x.scalar_type() == at::kDouble;
  b.compute = any_double ? at::kDouble : at::kFloat;
  b.result = for_result[0].scalar_type();
  for (const auto& x : for_result) b.result = at::promote_types(b.result, x.scalar_type());
  return b;
}

Tensor as_batch1(const Tensor& x, const std::vector<int64_t>& shape) { return x.expand(shape).unsqueeze(0); }

Tensor run_bcast(Body body, std::vector<Tensor> ins, int nout, const Bcast& b, at::ScalarType out_dtype,
                 std::vector<Tensor>* outs_all) {
  std::vector<int64_t> shape = b.shape;
  Tensor ref = at::empty(shape, ins[0].options().dtype(out_dtype)).unsqueeze(0);
  Plan p = make_plan(ref);
  Runner r(body, p, ref, b.compute == at::kDouble);
  for (auto& x : ins) r.in(as_batch1(cuda_path(ref) ? x.to(b.compute) : x, shape));
  std::vector<Tensor> outs;
  for (int k = 0; k < nout; ++k) {
    outs.push_back(k == 0 ? ref : alloc_like_plan(p, ref.sizes(), ref.options()));
    r.out(outs.back());
  }
  r.run();
  for (auto& o : outs) o.squeeze_(0);
  if (outs_all) *outs_all = outs;
  return outs[0];
}

Tensor normal_kl(const Tensor& m1, const Tensor& lv1, const Tensor& m2, const Tensor& lv2) {
  Bcast b = bcast({m1, lv1, m2, lv2}, {m1, lv1, m2, lv2});
  return run_bcast(Body::NormalKl, {m1, lv1, m2, lv2}, 1, b, b.result, nullptr);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> normal_kl_backward(const Tensor& grad, const Tensor& m1, const Tensor& lv1,
                                                              const Tensor& m2, const Tensor& lv2) {
  Bcast b = bcast({grad, m1, lv1, m2, lv2}, {m1, lv1, m2, lv2});
  std::vector<Tensor> o;
  run_bcast(Body::NormalKlBackward, {grad, m1, lv1, m2, lv2}, 4, b, b.compute, &o);
  return {o[0], o[1], o[2], o[3]};
}

Tensor discretized_gaussian_log_likelihood(const Tensor& x, const Tensor& means, const Tensor& log_scales) {
  Bcast b = bcast({x, means, log_scales}, {x, means});
  return run_bcast(Body::Dgll, {x, means, log_scales}, 1, b, b.result, nullptr);
}

std::tuple<Tensor, Tensor, Tensor> dgll_backward(const Tensor& grad, const Tensor& x, const Tensor& means,
                                                 const Tensor& log_scales) {
  Bcast b = bcast({grad, x, means, log_scales}, {x, means});
  std::vector<Tensor> o;
  run_bcast(Body::DgllBackward, {grad, x, means, log_scales}, 3, b, b.compute, &o);
  return {o[0], o[1], o[2]};
}

}  // namespace op
}  // namespace ddpm

DDPM_TORCH_LIBRARY(DDPM_NS, m) {
  m.def("q_sample(Tensor x0, Tensor t, Tensor noise, Tensor table) -> Tensor");
  m.def("linear_backward(Tensor grad, Tensor t, Tensor table, int kind, int mean_type) -> (Tensor, Tensor)");
  m.def("q_posterior(Tensor x0, Tensor x_t, Tensor t, Tensor table) -> (Tensor, Tensor, Tensor)");
  m.def("predict_xstart(Tensor model_output, Tensor x_t, Tensor t, Tensor table, int mean_type) -> Tensor");
  m.def("p_mean_variance(Tensor model_output, Tensor x_t, Tensor t, Tensor table, int mean_type, int var_type, "
        "bool clip, Tensor? thresh) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("p_sample_step(Tensor model_output, Tensor x_t, Tensor t, Tensor table, int mean_type, int var_type, "
        "bool clip, Tensor? thresh, Tensor? noise, int seed) -> (Tensor, Tensor)");
  m.def("ddim_step(Tensor model_output, Tensor x_t, Tensor t, Tensor table, int mean_type, int var_type, "
        "bool clip, Tensor? thresh, float eta, Tensor? noise, int seed) -> (Tensor, Tensor)");
  m.def("vb_terms_bpd(Tensor model_output, Tensor x0, Tensor x_t, Tensor t, Tensor table, int mean_type, "
        "int var_type, bool clip, bool need_grad) -> (Tensor, Tensor, Tensor)");
  m.def("training_losses(Tensor model_output, Tensor x0, Tensor t, Tensor noise, Tensor table, int mean_type, "
        "int var_type, int loss_type, int weighting, float min_snr_gamma, bool need_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("scale_halves(Tensor d_out, Tensor? d_v, Tensor s_mean, Tensor s_var, Tensor model_output) -> Tensor");
  m.def("prior_bpd(Tensor x0, Tensor table) -> Tensor");
  m.def("prior_bpd_backward(Tensor grad, Tensor x0, Tensor table) -> Tensor");
  m.def("normal_kl(Tensor mean1, Tensor logvar1, Tensor mean2, Tensor logvar2) -> Tensor");
  m.def("normal_kl_backward(Tensor grad, Tensor mean1, Tensor logvar1, Tensor mean2, Tensor logvar2) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("discretized_gaussian_log_likelihood(Tensor x, Tensor means, Tensor log_scales) -> Tensor");
  m.def("dgll_backward(Tensor grad, Tensor x, Tensor means, Tensor log_scales) -> (Tensor, Tensor, Tensor)");
}

#define DDPM_IMPL_ALL(m)                                                                          \
  m.impl("q_sample", &ddpm::op::q_sample);                                                            \
  m.impl("linear_backward", &ddpm::op::linear_backward);                                              \
  m.impl("q_posterior", &ddpm::op::q_posterior);                                                      \
  m.impl("predict_xstart", &ddpm::op::predict_xstart);                                                \
  m.impl("p_mean_variance", &ddpm::op::p_mean_variance);                                              \
  m.impl("p_sample_step", &ddpm::op::p_sample_step);                                                  \
  m.impl("ddim_step", &ddpm::op::ddim_step);                                                          \
  m.impl("vb_terms_bpd", &ddpm::op::vb_terms_bpd);                                                    \
  m.impl("training_losses", &ddpm::op::training_losses);                                              \
  m.impl("scale_halves", &ddpm::op::scale_halves);                                                    \
  m.impl("prior_bpd", &ddpm::op::prior_bpd);                                                          \
  m.impl("prior_bpd_backward", &ddpm::op::prior_bpd_backward);                                        \
  m.impl("normal_kl", &ddpm::op::normal_kl);                                                          \
  m.impl("normal_kl_backward", &ddpm::op::normal_kl_backward);                                        \
  m.impl("discretized_gaussian_log_likelihood", &ddpm::op::discretized_gaussian_log_likelihood);      \
  m.impl("dgll_backward", &ddpm::op::dgll_backward);

DDPM_TORCH_LIBRARY_IMPL(DDPM_NS, CPU, m) { DDPM_IMPL_ALL(m) }
#ifdef DDPM_WITH_CUDA
TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) { DDPM_IMPL_ALL(m) }
#endif
