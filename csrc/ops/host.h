// ops/host.h -- what every op's host function (ops/<family>.cpp) shares: argument checks that raise the
// Python exception ddpm_fast/ops.py would (TypeError / ValueError naming the argument), the driver's view of
// a tensor (Operand), Runner<Body>, which fills a Launch by named slot and runs it on the tensors' device,
// and DDPM_DEVICE_OP / DDPM_AUTOGRAD_OP, which register an op beside its host function. The fake (meta)
// impls, which must take symbolic shapes under torch.compile, are Python (ddpm_fast/native.py). Option ints
// are the codes of options.h.
#pragma once

#include <torch/library.h>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <cmath>
#include <utility>
#include <vector>

#include "../launch.h"
#include "../op_namespace.h"
#include "direct.h"

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

inline at::ScalarType compute_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// Argument checks, once, here: ddpm_fast/ops.py sends CPU tensors on the compiled path straight to these
// (no Python duplicate of them), so each raises the Python exception ops.py would (TypeError / ValueError
// through TORCH_CHECK_TYPE / TORCH_CHECK_VALUE) with a message that names the argument.
inline void check_t(const Tensor& t, int64_t B, const Tensor& table) {
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

inline void check_input(const char* name, const Tensor& x) {
  const auto s = x.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, name,
                   ": expected a float16, bfloat16, float32 or float64 tensor, got ", s);
  TORCH_CHECK_VALUE(x.dim() >= 1, name, ": expected a batched tensor [B, ...], got a 0-dim tensor");
}

// x is checked against ref (itself already checked): same shape, device and dtype; the message names both
inline void check_same(const char* name, const Tensor& x, const char* ref_name, const Tensor& ref) {
  TORCH_CHECK_VALUE(x.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), " (that of ", ref_name,
                    "), got ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == ref.device(), name, ": expected device ", ref.device(), " (like ", ref_name,
                    "), got ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " (that of ",
                   ref_name, "), got ", x.scalar_type());
}

// model_output against x (x_t or x0, named x_name, checked first): its shape, or doubled channels for a
// learned variance
inline void check_model_output(const Tensor& mo, const char* x_name, const Tensor& x, int64_t var_type) {
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

// The checks of an op on x (named x_name) and a second input `other` (named other_name; x's shape, device
// and dtype) at timesteps t of table
inline void check_inputs(const char* x_name, const Tensor& x, const char* other_name, const Tensor& other,
                         const Tensor& t, const Tensor& table) {
  check_input(x_name, x);
  check_same(other_name, other, x_name, x);
  check_t(t, x.size(0), table);
}

// The checks of an op that reads the model output mo for x (named x_name) at timesteps t of table
inline void check_model_inputs(const Tensor& mo, const char* x_name, const Tensor& x, int64_t var_type,
                               const Tensor& t, const Tensor& table) {
  check_input(x_name, x);
  check_model_output(mo, x_name, x, var_type);
  check_t(t, x.size(0), table);
}

// The driver's view of x's data read with `strides`, those of a tensor of the plan's shape [B, ...] (dim 0 the
// batch; one_sample: B = 1, whose batch stride is taken as N).
inline Operand strided_operand(const Plan& p, const Tensor& x, at::IntArrayRef strides, bool one_sample) {
  Operand o;
  o.dtype = x.scalar_type();
  o.direct = is_direct(p, strides);
  o.batch_stride = one_sample ? p.N : strides[0];
  for (int k = 0; k < p.nd; ++k) o.stride[k] = strides[p.dim[k]];
  o.base = static_cast<char*>(x.data_ptr());
  return o;
}

// The driver's view of x; on CUDA a non-direct input is first copied into the plan's layout. The Operand
// holds a raw pointer, so the tensor it points into is kept alive in `keep` until the launch has run: x
// may be a temporary (run_bcast's cast of a broadcast fp16 / bf16 input to the compute dtype).
inline Operand operand(const Plan& p, const Tensor& x, std::vector<Tensor>& keep) {
  if (!x.defined()) return Operand();
  Tensor y = x;
  if (cuda_path(x) && !is_direct(p, x)) {
    y = alloc_like_plan(p, x.sizes(), x.options());
    y.copy_(x);
  }
  keep.push_back(y);
  return strided_operand(p, y, y.strides(), y.size(0) == 1);
}

// One launch of Body: operands set by slot (Body<S>::in_... / out_...; an unset or undefined one is absent),
// the body's options set in both compute dtypes, then run() on ref's device.
template <template <class> class Body> struct Runner {
  using Slots = Body<float>;
  Launch L;
  BodyOptions<Body> options;
  std::vector<Tensor> keep;
  std::vector<std::pair<Tensor, Tensor>> copy_back;  // (tmp, target) for CUDA outputs not direct
  Tensor device_ref;

  Runner(const Plan& plan, const Tensor& ref, bool dbl) : device_ref(ref) {
    L.plan = plan;
    L.dbl = dbl;
    L.in.resize(Slots::NI);
    L.out.resize(Slots::NO);
    keep.reserve(Slots::NI + Slots::NO);  // one allocation, not one per doubling
  }
  // over ref's plan, in ref's compute dtype
  explicit Runner(const Tensor& ref) : Runner(make_plan(ref), ref, ref.scalar_type() == at::kDouble) {}
  void in(int slot, const Tensor& x) { L.in[slot] = operand(L.plan, x, keep); }
  void out(int slot, const Tensor& x) {
    if (x.defined() && cuda_path(x) && !is_direct(L.plan, x)) {
      Tensor tmp = alloc_like_plan(L.plan, x.sizes(), x.options());
      copy_back.emplace_back(tmp, x);
      L.out[slot] = operand(L.plan, tmp, keep);
      return;
    }
    L.out[slot] = operand(L.plan, x, keep);
  }
  // output `slot`: a new tensor of the reference's shape, dtype and device, laid out in the plan
  Tensor new_out(int slot) {
    Tensor x = alloc_like_plan(L.plan, device_ref.sizes(), device_ref.options());
    out(slot, x);
    return x;
  }
  // input `slot` drawn in-kernel: Philox(seed, b * N + i) normals; the seed is read in-kernel from seed_key
  // (an int64 [1] tensor on ref's device, e.g. a torch.randint draw of a generator) when it is given
  void philox_noise(int slot, int64_t seed, const c10::optional<Tensor>& seed_key) {
    L.noise_input = slot;
    L.seed = static_cast<uint64_t>(seed);
    if (seed_key.has_value() && seed_key->defined()) {
      const Tensor& key = *seed_key;
      TORCH_CHECK_VALUE(key.dim() == 1 && key.numel() == 1 && key.scalar_type() == at::kLong &&
                            key.device() == device_ref.device(),
                        "seed_key: expected an int64 tensor of shape [1] on ", device_ref.device(), ", got ",
                        key.scalar_type(), " ", key.sizes(), " on ", key.device());
      keep.push_back(key);
      L.seed_key = key.data_ptr<int64_t>();
    }
  }
  // input `slot`: the given noise when there is one, else drawn in-kernel (philox_noise)
  void noise(int slot, const c10::optional<Tensor>& given, int64_t seed, const c10::optional<Tensor>& seed_key) {
    if (given.has_value() && given->defined()) in(slot, *given);
    else philox_noise(slot, seed, seed_key);
  }
  // the schedule table, each sample at its timestep t[b] (or, t undefined, at L.fixed_t); the drivers read it in
  // the compute dtype on the inputs' device, so both are checked here (a raw torch.ops call may pass another)
  void table(const Tensor& table, const Tensor& t) {
    const auto compute = L.dbl ? at::kDouble : at::kFloat;
    TORCH_CHECK_TYPE(table.scalar_type() == compute, "table: expected dtype ", compute,
                     " (the compute dtype of the inputs), got ", table.scalar_type());
    TORCH_CHECK_VALUE(table.device() == device_ref.device(), "table: expected device ", device_ref.device(),
                      " (that of the inputs), got ", table.device());
    L.table = table.data_ptr();
    L.ncols = table.size(1);
    L.nrows = table.size(0);
    L.t = t.defined() ? t.data_ptr<int64_t>() : nullptr;
  }
  // the schedule table, every sample at timestep fixed_t
  void table_at(const Tensor& table, int64_t fixed_t) {
    this->table(table, Tensor());
    L.fixed_t = fixed_t;
  }
  // fn(options) for the float and the double options (a generic lambda: S from the options' fields)
  template <class Fn> void set_options(Fn fn) {
    fn(options.f);
    fn(options.d);
  }
  // Slots::NF per-sample results [B] in x's compute dtype, registered as the launch's finals; a result whose bit
  // in `wanted` is clear is not made (an undefined tensor, and the launch writes no such result)
  std::vector<Tensor> finals(const Tensor& x, unsigned wanted = ~0u) {
    std::vector<Tensor> f(Slots::NF);
    const auto opts = x.options().dtype(compute_type(x.scalar_type()));
    for (int k = 0; k < Slots::NF; ++k) {
      if (!(wanted >> k & 1u)) continue;
      // a mean over zero elements is NaN (the kernels do not run when a sample has no elements)
      f[k] = x.numel() == 0 ? at::full({x.size(0)}, std::nan(""), opts) : new_tensor({x.size(0)}, {1}, opts);
      L.finals[k] = f[k].data_ptr();
    }
    return f;
  }
  void run() {
    if (L.plan.B == 0 || L.plan.N == 0) return;
    c10::DeviceGuard guard(device_ref.device());
#ifdef DDPM_CUDA_EMU
    launch_cuda<Body>(L, options);  // emulated on the CPU: CPU tensors take the CUDA host path
    for (auto& [tmp, target] : copy_back) target.copy_(tmp);
#else
    if (device_ref.is_cpu()) {
      launch_cpu<Body>(L, options);
    } else if (device_ref.is_cuda()) {
#ifdef DDPM_WITH_CUDA
      launch_cuda<Body>(L, options);
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

inline Tensor gather_col(const Tensor& table, const Tensor& t, int64_t col) {
  return table.select(1, col).index_select(0, t);
}


// model_output's mean and variance halves (the variance half undefined without a learned variance)
inline std::pair<Tensor, Tensor> halves(const Tensor& mo, bool learned) {
  if (!learned) return {mo, Tensor()};
  int64_t c = mo.size(1) / 2;
  return {mo.narrow(1, 0, c), mo.narrow(1, c, c)};
}

// An options field `const S* field` (a per-sample [B] array) set to x's data when x is defined and of dtype
// S, else nullptr: x is passed in the options of its compute dtype only (the launch reads those).
template <class S> void point_to(const S*& field, const Tensor& x) {
  field = x.defined() && x.scalar_type() == c10::CppTypeToScalarType<S>::value ? x.data_ptr<S>() : nullptr;
}
template <class S> void point_to(const S*& field, const c10::optional<Tensor>& x) {
  if (x.has_value()) return point_to(field, *x);
  field = nullptr;
}

// ModelOptions of a model-reading body; thresh's data is passed in the options of its dtype only
template <class Options>
void set_model_options(Options& o, int64_t mean_type, int64_t var_type, bool clip, const c10::optional<Tensor>& thresh) {
  o.mean_type = int(mean_type);
  o.var_type = int(var_type);
  o.clip = clip;
  point_to(o.thresh, thresh);
}

// MeanOptions of a body with per-sample means over the plan's N elements
template <class Options> void set_mean_options(Options& o, const Plan& p) {
  using S = std::remove_reference_t<decltype(o.numel)>;
  o.numel = static_cast<S>(p.N);
  o.inv_numel = S(1) / static_cast<S>(p.N);
}

}  // namespace op
}  // namespace ddpm

// DDPM_DEVICE_OP(name, "(arguments) -> results"): defines the op `name` of this library (DDPM_NS) with that
// schema, and registers the host function `name` as its CPU kernel and, in a build with CUDA kernels, as its
// CUDA kernel (the same function: Runner runs the driver of the tensors' device), and the op's direct Python
// binding (direct.h). One line after the host function, at namespace scope.
#define DDPM_DEVICE_OP(name, signature)                                  \
  DDPM_TORCH_LIBRARY_FRAGMENT(DDPM_NS, m) {                              \
    m.def(#name signature);                                              \
    m.impl(#name, c10::DispatchKey::CPU, &name);                         \
    DDPM_CUDA_IMPL_(name)                                                \
  }                                                                      \
  static const ::ddpm::op::DirectBinding direct_binding_##name(#name, &name);
#ifdef DDPM_WITH_CUDA
#define DDPM_CUDA_IMPL_(name) m.impl(#name, c10::DispatchKey::CUDA, &name);
#else
#define DDPM_CUDA_IMPL_(name)
#endif

// DDPM_AUTOGRAD_OP(name, kernel): registers kernel (its torch::autograd::Function's entry, ops/
// autograd_common.h) as the Autograd kernel of the op `name`. One line after the kernel, at namespace scope.
#define DDPM_AUTOGRAD_OP(name, kernel) \
  DDPM_TORCH_LIBRARY_IMPL(DDPM_NS, Autograd, m) { m.impl(#name, &kernel); }
