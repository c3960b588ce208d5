// ops/autograd_common.h -- what the families' autograd kernels (in ops/<family>.cpp, each registered by a
// DDPM_AUTOGRAD_OP line of host.h) share.
//
// Per-call overhead counts: the loss runs once per training step and q_sample on every sample batch,
// and on a GPU the fused kernel takes microseconds. torch.library's Python autograd wrapper costs
// 8 us a call at q_sample's 4 arguments and tens of microseconds at the losses' 9-11 (it rebuilds the
// schema's argument list per argument), so every differentiable op's autograd kernel is C++: its forward
// calls the op below autograd (the CPU / CUDA / fake kernel) and its backward is one fused backward op of
// the same family. training_losses, run with a gradient on every training step, builds its node by hand
// (builds_node / new_node / attach below); the others are a torch::autograd::Function, whose bookkeeping
// costs more per call but is simpler to write. The sampler ops (p_mean_variance, p_sample_step, ddim_step)
// have none: ddpm_fast/native.py runs the reference when their inputs require grad.
#pragma once

#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/FuncTorchTLS.h>

#include "../op_namespace.h"

namespace ddpm {
namespace op {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Whether an op call goes through its autograd Function (Function::apply), as every call did: grad mode is on
// and a tensor argument requires grad, or a tensor argument carries a forward-mode gradient (apply raises
// that the C++ Function has no jvp), or a functorch transform is active (apply asks the transform whether it
// supports C++ Functions, and it may raise). Otherwise the autograd kernel calls the Function's below_autograd directly, what its forward
// calls: the same outputs (none requires grad), without building and wrapping an autograd node.
// Whether x carries a forward-mode (jvp) gradient.
inline bool has_forward_grad(const at::Tensor& x) {
  const auto* meta = torch::autograd::impl::get_autograd_meta(x);
  return meta && meta->fw_grad_ && !meta->fw_grad_->empty();
}

template <class... Tensors> bool needs_autograd_node(const Tensors&... tensors) {
  if (at::functorch::functorchTLSAccessor()) return true;
  const bool grad_mode = at::GradMode::is_enabled();
  return (... || ((grad_mode && tensors.requires_grad()) || has_forward_grad(tensors)));
}

// A hand-built autograd node, the way torch's generated autograd kernels build theirs, for the ops called once per
// training step, where torch::autograd::Function's bookkeeping (a VariableInfo per input and output, the
// saved_data map, _wrap_outputs, the node's teardown) costs more than the rest of the call on tiny inputs.
//
// builds_node(inputs...): whether the call builds one (grad mode is on and an input requires grad). It raises where
// Function::apply raises: under a functorch transform, and for an input with a forward-mode gradient (no jvp).
// new_node<N>(inputs...): node N (a torch::autograd::Node whose apply returns one gradient per input, in order)
// with its next edges to the inputs; attach(node, outputs) then makes it the grad_fn of each output (its apply's
// grads[k] is output k's gradient, undefined where none flows).
template <class... Tensors> bool builds_node(const Tensors&... tensors) {
  if (const auto& functorch = at::functorch::functorchTLSAccessor()) functorch->checkSupportsCppAutogradFunction();
  TORCH_CHECK(!(... || has_forward_grad(tensors)), "ddpm_fast: forward-mode AD (jvp) is not implemented for this op");
  return at::GradMode::is_enabled() && (... || tensors.requires_grad());
}

template <class N, class... Tensors> c10::intrusive_ptr<N> new_node(const Tensors&... inputs) {
  auto node = c10::make_intrusive<N>();
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  return node;
}

inline void attach(const c10::intrusive_ptr<torch::autograd::Node>& node, std::initializer_list<at::Tensor> outputs) {
  for (const auto& x : outputs) torch::autograd::set_history(x, node);
}

}  // namespace op
}  // namespace ddpm
