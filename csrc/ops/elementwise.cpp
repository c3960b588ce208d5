// ops/elementwise.cpp -- the broadcasting elementwise family: normal_kl, discretized_gaussian_log_likelihood
// and their backwards (schemas, host functions, autograd kernels; bodies in elementwise.h). Inputs are
// broadcast to one shape viewed as [1, ...], stride 0 along broadcast dims (strides computed on the CPU path,
// expand views on the CUDA path), gathered by the driver.
#include "elementwise.h"

#include <c10/util/strides.h>

#include "autograd_common.h"
#include "host.h"

namespace ddpm {
namespace op {
namespace {

struct Bcast {
  std::vector<int64_t> shape;
  at::ScalarType compute, result;
};

// the broadcast shape of xs, the compute dtype (float64 if any input is), the promoted dtype of for_result
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

// x broadcast to `shape` and viewed as [1, ...shape], as an operand of plan p: its strides computed (0 along the
// broadcast dims), no view made (each expand / unsqueeze is a dispatcher call, ~1 us a tensor)
Operand broadcast_operand(const Plan& p, const Tensor& x, const std::vector<int64_t>& shape) {
  std::array<int64_t, kMaxDims + 1> strides{};  // of the view [1, ...shape] (dim 0: the one sample)
  const int64_t lead = static_cast<int64_t>(shape.size()) - x.dim();
  for (int64_t d = 0; d < static_cast<int64_t>(shape.size()); ++d) {
    const int64_t xd = d - lead;
    strides[d + 1] = xd >= 0 && x.size(xd) != 1 ? x.stride(xd) : 0;
  }
  return strided_operand(p, x, at::IntArrayRef(strides.data(), shape.size() + 1), true);
}

// Body over the broadcast inputs (in its input slot order); its NO outputs in out_dtype, the first allocated
// as the plan's reference
template <template <class> class Body>
std::vector<Tensor> run_bcast(const std::vector<Tensor>& ins, const Bcast& b, at::ScalarType out_dtype) {
  using Slots = Body<float>;
  const auto& shape = b.shape;
  std::vector<int64_t> sizes1 = shape;  // [1, ...shape]
  sizes1.insert(sizes1.begin(), 1);
  Tensor ref = new_tensor(sizes1, c10::contiguous_strides(sizes1), ins[0].options().dtype(out_dtype));
  Plan p = make_plan(ref);
  Runner<Body> r(p, ref, b.compute == at::kDouble);
  const bool cuda = cuda_path(ref);
  for (int slot = 0; slot < Slots::NI; ++slot) {
    if (cuda) {  // operands the plan cannot address directly are copied into its layout (host.h operand)
      r.in(slot, as_batch1(ins[slot].to(b.compute), shape));
    } else {
      r.L.in[slot] = broadcast_operand(p, ins[slot], shape);
      r.keep.push_back(ins[slot]);
    }
  }
  std::vector<Tensor> outs;
  for (int slot = 0; slot < Slots::NO; ++slot) {
    outs.push_back(slot == 0 ? ref : alloc_like_plan(p, ref.sizes(), ref.options()));
    r.out(slot, outs.back());
  }
  r.run();
  // drop the leading 1: outputs are new tensors with no views yet, so their metadata is set in place
  for (auto& o : outs) {
    std::vector<int64_t> strides(o.strides().begin() + 1, o.strides().end());
    o.unsafeGetTensorImpl()->set_sizes_and_strides(shape, strides);
  }
  return outs;
}

Tensor normal_kl(const Tensor& mean1, const Tensor& logvar1, const Tensor& mean2, const Tensor& logvar2) {
  Bcast b = bcast({mean1, logvar1, mean2, logvar2}, {mean1, logvar1, mean2, logvar2});
  return run_bcast<NormalKlElem>({mean1, logvar1, mean2, logvar2}, b, b.result)[NormalKlElem<float>::out_kl];
}
DDPM_DEVICE_OP(normal_kl, "(Tensor mean1, Tensor logvar1, Tensor mean2, Tensor logvar2) -> Tensor")

std::tuple<Tensor, Tensor, Tensor, Tensor> normal_kl_backward(const Tensor& grad, const Tensor& mean1,
                                                              const Tensor& logvar1, const Tensor& mean2,
                                                              const Tensor& logvar2) {
  using Body = NormalKlBackwardElem<float>;
  Bcast b = bcast({grad, mean1, logvar1, mean2, logvar2}, {mean1, logvar1, mean2, logvar2});
  auto o = run_bcast<NormalKlBackwardElem>({grad, mean1, logvar1, mean2, logvar2}, b, b.compute);
  return {o[Body::out_grad_mean1], o[Body::out_grad_logvar1], o[Body::out_grad_mean2], o[Body::out_grad_logvar2]};
}
DDPM_DEVICE_OP(normal_kl_backward, "(Tensor grad, Tensor mean1, Tensor logvar1, Tensor mean2, Tensor logvar2) "
                                   "-> (Tensor, Tensor, Tensor, Tensor)")

Tensor discretized_gaussian_log_likelihood(const Tensor& x, const Tensor& means, const Tensor& log_scales) {
  Bcast b = bcast({x, means, log_scales}, {x, means});
  return run_bcast<DgllElem>({x, means, log_scales}, b, b.result)[DgllElem<float>::out_log_prob];
}
DDPM_DEVICE_OP(discretized_gaussian_log_likelihood, "(Tensor x, Tensor means, Tensor log_scales) -> Tensor")

std::tuple<Tensor, Tensor, Tensor> dgll_backward(const Tensor& grad, const Tensor& x, const Tensor& means,
                                                 const Tensor& log_scales) {
  using Body = DgllBackwardElem<float>;
  Bcast b = bcast({grad, x, means, log_scales}, {x, means});
  auto o = run_bcast<DgllBackwardElem>({grad, x, means, log_scales}, b, b.compute);
  return {o[Body::out_grad_x], o[Body::out_grad_means], o[Body::out_grad_log_scales]};
}
DDPM_DEVICE_OP(dgll_backward, "(Tensor grad, Tensor x, Tensor means, Tensor log_scales) -> (Tensor, Tensor, Tensor)")

// -- autograd: normal_kl_backward, dgll_backward (each gradient reduced to its input's broadcast shape) ---

// grads[k] summed to inputs[k]'s (broadcast) shape in its dtype, for the inputs that need a gradient
variable_list reduce_to_inputs(AutogradContext* ctx, const std::vector<Tensor>& grads, const variable_list& inputs) {
  variable_list out(inputs.size());
  for (size_t k = 0; k < inputs.size(); ++k)
    if (ctx->needs_input_grad(k)) out[k] = grads[k].sum_to_size(inputs[k].sizes()).to(inputs[k].scalar_type());
  return out;
}

struct NormalKl : public torch::autograd::Function<NormalKl> {
  static Tensor below_autograd(const Tensor& m1, const Tensor& lv1, const Tensor& m2, const Tensor& lv2) {
    static auto op =
        op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>(DDPM_OP("normal_kl"));
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(m1, lv1, m2, lv2);
  }
  static Tensor forward(AutogradContext* ctx, const Tensor& m1, const Tensor& lv1, const Tensor& m2,
                        const Tensor& lv2) {
    ctx->save_for_backward({m1, lv1, m2, lv2});
    return below_autograd(m1, lv1, m2, lv2);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<std::tuple<Tensor, Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&)>(DDPM_OP("normal_kl_backward"));
    auto in = ctx->get_saved_variables();
    auto [a, b, c, d] = op.call(grads[0], in[0], in[1], in[2], in[3]);
    return reduce_to_inputs(ctx, {a, b, c, d}, in);
  }
};

struct Dgll : public torch::autograd::Function<Dgll> {
  static Tensor below_autograd(const Tensor& x, const Tensor& means, const Tensor& log_scales) {
    static auto op = op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&)>(
        DDPM_OP("discretized_gaussian_log_likelihood"));
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, means, log_scales);
  }
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& means, const Tensor& log_scales) {
    ctx->save_for_backward({x, means, log_scales});
    return below_autograd(x, means, log_scales);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                  const Tensor&)>(DDPM_OP("dgll_backward"));
    auto in = ctx->get_saved_variables();
    auto [a, b, c] = op.call(grads[0], in[0], in[1], in[2]);
    return reduce_to_inputs(ctx, {a, b, c}, in);
  }
};

Tensor normal_kl_autograd(const Tensor& m1, const Tensor& lv1, const Tensor& m2, const Tensor& lv2) {
  if (!needs_autograd_node(m1, lv1, m2, lv2)) return NormalKl::below_autograd(m1, lv1, m2, lv2);
  return NormalKl::apply(m1, lv1, m2, lv2);
}
DDPM_AUTOGRAD_OP(normal_kl, normal_kl_autograd)

Tensor dgll_autograd(const Tensor& x, const Tensor& means, const Tensor& log_scales) {
  if (!needs_autograd_node(x, means, log_scales)) return Dgll::below_autograd(x, means, log_scales);
  return Dgll::apply(x, means, log_scales);
}
DDPM_AUTOGRAD_OP(discretized_gaussian_log_likelihood, dgll_autograd)

}  // namespace
}  // namespace op
}  // namespace ddpm
