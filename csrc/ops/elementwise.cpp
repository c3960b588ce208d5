// ops/elementwise.cpp -- the broadcasting elementwise family: normal_kl, discretized_gaussian_log_likelihood
// and their backwards (schemas, host functions; bodies in elementwise.h). Inputs are broadcast (expand:
// stride-0 views, gathered by the driver) to one shape viewed as [1, ...].
#include "elementwise.h"

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

// Body over the broadcast inputs (in its input slot order); its NO outputs in out_dtype, the first allocated
// as the plan's reference
template <template <class> class Body>
std::vector<Tensor> run_bcast(const std::vector<Tensor>& ins, const Bcast& b, at::ScalarType out_dtype) {
  using Slots = Body<float>;
  std::vector<int64_t> shape = b.shape;
  Tensor ref = at::empty(shape, ins[0].options().dtype(out_dtype)).unsqueeze(0);
  Plan p = make_plan(ref);
  Runner<Body> r(p, ref, b.compute == at::kDouble);
  for (int slot = 0; slot < Slots::NI; ++slot)
    r.in(slot, as_batch1(cuda_path(ref) ? ins[slot].to(b.compute) : ins[slot], shape));
  std::vector<Tensor> outs;
  for (int slot = 0; slot < Slots::NO; ++slot) {
    outs.push_back(slot == 0 ? ref : alloc_like_plan(p, ref.sizes(), ref.options()));
    r.out(slot, outs.back());
  }
  r.run();
  for (auto& o : outs) o.squeeze_(0);
  return outs;
}

Tensor normal_kl(const Tensor& mean1, const Tensor& logvar1, const Tensor& mean2, const Tensor& logvar2) {
  Bcast b = bcast({mean1, logvar1, mean2, logvar2}, {mean1, logvar1, mean2, logvar2});
  return run_bcast<NormalKlElem>({mean1, logvar1, mean2, logvar2}, b, b.result)[NormalKlElem<float>::out_kl];
}

std::tuple<Tensor, Tensor, Tensor, Tensor> normal_kl_backward(const Tensor& grad, const Tensor& mean1,
                                                              const Tensor& logvar1, const Tensor& mean2,
                                                              const Tensor& logvar2) {
  using Body = NormalKlBackwardElem<float>;
  Bcast b = bcast({grad, mean1, logvar1, mean2, logvar2}, {mean1, logvar1, mean2, logvar2});
  auto o = run_bcast<NormalKlBackwardElem>({grad, mean1, logvar1, mean2, logvar2}, b, b.compute);
  return {o[Body::out_grad_mean1], o[Body::out_grad_logvar1], o[Body::out_grad_mean2], o[Body::out_grad_logvar2]};
}

Tensor discretized_gaussian_log_likelihood(const Tensor& x, const Tensor& means, const Tensor& log_scales) {
  Bcast b = bcast({x, means, log_scales}, {x, means});
  return run_bcast<DgllElem>({x, means, log_scales}, b, b.result)[DgllElem<float>::out_log_prob];
}

std::tuple<Tensor, Tensor, Tensor> dgll_backward(const Tensor& grad, const Tensor& x, const Tensor& means,
                                                 const Tensor& log_scales) {
  using Body = DgllBackwardElem<float>;
  Bcast b = bcast({grad, x, means, log_scales}, {x, means});
  auto o = run_bcast<DgllBackwardElem>({grad, x, means, log_scales}, b, b.compute);
  return {o[Body::out_grad_x], o[Body::out_grad_means], o[Body::out_grad_log_scales]};
}

void impls(torch::Library& m) {
  m.impl("normal_kl", &normal_kl);
  m.impl("normal_kl_backward", &normal_kl_backward);
  m.impl("discretized_gaussian_log_likelihood", &discretized_gaussian_log_likelihood);
  m.impl("dgll_backward", &dgll_backward);
}

}  // namespace
}  // namespace op
}  // namespace ddpm

DDPM_TORCH_LIBRARY_FRAGMENT(DDPM_NS, m) {
  m.def("normal_kl(Tensor mean1, Tensor logvar1, Tensor mean2, Tensor logvar2) -> Tensor");
  m.def("normal_kl_backward(Tensor grad, Tensor mean1, Tensor logvar1, Tensor mean2, Tensor logvar2) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("discretized_gaussian_log_likelihood(Tensor x, Tensor means, Tensor log_scales) -> Tensor");
  m.def("dgll_backward(Tensor grad, Tensor x, Tensor means, Tensor log_scales) -> (Tensor, Tensor, Tensor)");
}
DDPM_TORCH_LIBRARY_IMPL(DDPM_NS, CPU, m) { ddpm::op::impls(m); }
#ifdef DDPM_WITH_CUDA
TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) { ddpm::op::impls(m); }
#endif
