// launch.h -- what an op's host function (csrc/ops/<family>.cpp) hands to a device driver (cpu/kernels.cpp,
// cuda/kernels.cu): the operands in the body's slot order, the schedule table, t, the Philox seed, and the
// body's own options. See ops/README for how bodies reach the drivers (no central list).
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include <ATen/ATen.h>

#include "ddpm_math.h"
#include "layout.h"

namespace ddpm {

// One [B, ...] tensor as the drivers see it (absent when base == nullptr).
struct Operand {
  char* base = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t batch_stride = 0;                  // elements
  bool direct = false;                       // element e of sample b at base + b * batch_stride + e
  std::array<int64_t, kMaxDims> stride{};    // element strides in the plan's iteration order
};

struct Launch {
  Plan plan;
  std::vector<Operand> in, out;              // the body's F::NI input and F::NO output slots, in slot order
  bool dbl = false;                          // compute in double (float64 inputs) else float
  const void* table = nullptr;               // [T, ncols] in the compute dtype, or nullptr
  int64_t ncols = 0, nrows = 0;
  const int64_t* t = nullptr;                // [B] timesteps, or nullptr: use fixed_t
  int64_t fixed_t = 0;
  int noise_input = -1;                      // input slot drawn from Philox(seed, b * N + i), or -1
  uint64_t seed = 0;
  const int64_t* seed_key = nullptr;         // [1] int64 on the kernel's device holding the seed, or nullptr:
                                             // seed (a device-side draw: CUDA-graph capture safe)
  std::array<void*, 4> finals{};             // F::NF per-sample results [B] in the compute dtype (null: not made)
};

// A body's options (Body<S>::Options) in both compute dtypes; the driver passes the one of L.dbl to make().
template <template <class> class Body> struct BodyOptions {
  typename Body<float>::Options f;
  typename Body<double>::Options d;
};

// Run Body over L: defined in cpu/kernels.cpp (and cuda/kernels.cu), instantiated there for every body that a
// family header lists with DDPM_BODY (ops/body.h).
template <template <class> class Body> void launch_cpu(const Launch& L, const BodyOptions<Body>& options);
#if defined(DDPM_WITH_CUDA) || defined(DDPM_CUDA_EMU)
template <template <class> class Body> void launch_cuda(const Launch& L, const BodyOptions<Body>& options);
#endif

}  // namespace ddpm
