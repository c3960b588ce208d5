// layout.h -- host-side iteration plans shared by the CPU and CUDA implementations (the fake impls in
// ddpm_fast/native.py give their outputs the same layout: _plan_strides).
//
// Every kernel walks a tensor [B, ...] one sample at a time, over the N = numel / B elements of a
// sample in one iteration order. The order is the memory order of a "reference" input when its
// non-batch dims are dense (contiguous, channels_last, any permutation), else row-major. Outputs are
// allocated in that order (so they are always "direct"); an operand whose non-batch strides equal
// the plan's dense strides is direct too (element e of sample b at base + b * batch_stride + e);
// any other operand (slices, broadcast views, other layouts) is gathered / scattered by strides.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <numeric>
#include <vector>

namespace ddpm {

constexpr int kMaxDims = 8;  // non-batch dims

struct Plan {
  int64_t B = 0, N = 0;
  int nd = 0;                                  // non-batch dims, in iteration order (outer -> inner)
  std::array<int, kMaxDims> dim{};             // tensor dim (1-based) of iteration dim k
  std::array<int64_t, kMaxDims> size{};        // its size
  std::array<int64_t, kMaxDims> dense{};       // dense stride (elements) of iteration dim k
  bool row_major = true;                       // iteration order == logical row-major order
  // strides of a tensor laid out in this plan (batch stride N)
  std::vector<int64_t> out_strides(int64_t ndim) const {
    std::vector<int64_t> s(ndim, 1);
    s[0] = N;
    for (int k = 0; k < nd; ++k) s[dim[k]] = dense[k];
    return s;
  }
};

// The plan of tensor `ref` ([B, ...], at least 1-d). Fixed-size arrays, no heap: every op call makes one.
inline Plan make_plan(const at::Tensor& ref) {
  Plan p;
  const int64_t ndim = ref.dim();
  TORCH_CHECK(ndim >= 1 && ndim - 1 <= kMaxDims, "ddpm_fast: tensors need 1 to ", kMaxDims + 1, " dims");
  const auto sizes = ref.sizes(), strides = ref.strides();
  p.B = sizes[0];
  p.nd = static_cast<int>(ndim - 1);
  p.N = 1;
  for (int64_t d = 1; d < ndim; ++d) p.N *= sizes[d];
  // Candidate order: size-1 dims first (they do not matter), then the others by decreasing stride (a stable
  // insertion sort: equal strides keep their logical order).
  std::array<int, kMaxDims> cand{};
  int n_cand = 0;
  for (int d = 1; d <= p.nd; ++d)
    if (sizes[d] == 1) cand[n_cand++] = d;
  const int first_big = n_cand;
  for (int d = 1; d <= p.nd; ++d) {
    if (sizes[d] == 1) continue;
    int k = n_cand++;
    for (; k > first_big && strides[cand[k - 1]] < strides[d]; --k) cand[k] = cand[k - 1];
    cand[k] = d;
  }
  bool dense = true;
  int64_t expect = 1;
  for (int k = p.nd - 1; k >= 0; --k) {
    int d = cand[k];
    if (sizes[d] == 1) continue;
    if (strides[d] != expect) { dense = false; break; }
    expect *= sizes[d];
  }
  int64_t s = 1;
  for (int k = p.nd - 1; k >= 0; --k) {
    p.dim[k] = dense ? cand[k] : k + 1;  // else row-major
    p.size[k] = sizes[p.dim[k]];
    p.dense[k] = s;
    s *= p.size[k];
  }
  // row-major: the dims of size > 1 in logical order (a permutation that only moves size-1 dims still is)
  int last = 0;
  for (int k = 0; k < p.nd; ++k) {
    if (p.size[k] == 1) continue;
    if (p.dim[k] < last) p.row_major = false;
    last = p.dim[k];
  }
  return p;
}

// A new uninitialised tensor: on the CPU without the dispatcher (at::detail::empty_strided_cpu, what
// at::empty_strided runs there, ~1,000 instructions less a call), else at::empty_strided.
inline at::Tensor new_tensor(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& opts) {
  if (opts.device().is_cpu() && !opts.pinned_memory())
    return at::detail::empty_strided_cpu(sizes, strides, opts.dtype().toScalarType());
  return at::empty_strided(sizes, strides, opts);
}

// A new tensor of `sizes` (same non-batch sizes as the plan) laid out in the plan's order.
inline at::Tensor alloc_like_plan(const Plan& p, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return new_tensor(sizes, p.out_strides(static_cast<int64_t>(sizes.size())), opts);
}

// Whether a tensor of the plan's shape with these strides can be walked as base + b * batch_stride + e.
inline bool is_direct(const Plan& p, at::IntArrayRef strides) {
  for (int k = 0; k < p.nd; ++k)
    if (p.size[k] > 1 && strides[p.dim[k]] != p.dense[k]) return false;
  return true;
}
inline bool is_direct(const Plan& p, const at::Tensor& x) { return is_direct(p, x.strides()); }

// The gradient of model_output [B, C or 2C, ...]: allocated in model_output's suggested memory format.
inline at::Tensor alloc_grad_like(const at::Tensor& mo, at::ScalarType dtype) {
  if (mo.is_cpu())  // without the dispatcher, as new_tensor
    return at::detail::empty_cpu(mo.sizes(), dtype, false, mo.suggest_memory_format());
  return at::empty(mo.sizes(), mo.options().dtype(dtype).memory_format(mo.suggest_memory_format()));
}

}  // namespace ddpm
