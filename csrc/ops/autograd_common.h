// ops/autograd_common.h -- what the families' autograd kernels (in ops/<family>.cpp, each registered by a
// DDPM_AUTOGRAD_OP line of host.h) share.
//
// Per-call overhead counts: the loss runs once per training step and q_sample on every sample batch,
// and on a GPU the fused kernel takes microseconds. torch.library's Python autograd wrapper costs
// 8 us a call at q_sample's 4 arguments and tens of microseconds at the losses' 9-11 (it rebuilds the
// schema's argument list per argument), so every differentiable op's autograd kernel is C++: a
// torch::autograd::Function whose forward calls the op below autograd (the CPU / CUDA / fake kernel)
// and whose backward is one fused backward op of the same family. The sampler ops (p_mean_variance,
// p_sample_step, ddim_step) have none: ddpm_fast/native.py runs the reference when their inputs
// require grad.
#pragma once

#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/FuncTorchTLS.h>

#include "../op_namespace.h"

namespace ddpm {
namespace op {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The typed dispatcher handle of the op `name` ("ns::name", DDPM_OP), looked up once per call site.
template <class Sig> c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Whether an op call goes through its autograd Function (Function::apply), as every call did: grad mode is on
// and a tensor argument requires grad, or a tensor argument carries a forward-mode gradient (apply raises
// that the C++ Function has no jvp), or a functorch transform is active (apply asks the transform whether it
// supports C++ Functions, and it may raise). Otherwise the autograd kernel calls the Function's below_autograd directly, what its forward
// calls: the same outputs (none requires grad), without building and wrapping an autograd node.
template <class... Tensors> bool needs_autograd_node(const Tensors&... tensors) {
  if (at::functorch::functorchTLSAccessor()) return true;
  const bool grad_mode = at::GradMode::is_enabled();
  auto forward_grad = [](const at::Tensor& x) {
    const auto* meta = torch::autograd::impl::get_autograd_meta(x);
    return meta && meta->fw_grad_ && !meta->fw_grad_->empty();
  };
  return (... || ((grad_mode && tensors.requires_grad()) || forward_grad(tensors)));
}

}  // namespace op
}  // namespace ddpm
