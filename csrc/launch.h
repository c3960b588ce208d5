// launch.h -- what ops.cpp hands to a device driver (cpu/kernels.cpp, cuda/kernels.cu).
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include <ATen/ATen.h>

#include "ddpm_elem.h"
#include "layout.h"

namespace ddpm {

// The per-element bodies (ddpm_elem.h): Body::Name runs NameElem<S>.
#define DDPM_BODIES(X)                                                                                 \
  X(QSample) X(LinearBackward) X(Posterior) X(Predict) X(PMeanVar) X(PSample) X(Ddim) X(Vb) X(Train) \
  X(TrainMse) X(Scale) X(Prior) X(PriorBackward) X(NormalKl) X(NormalKlBackward) X(Dgll) X(DgllBackward)

enum class Body {
#define DDPM_BODY_ENUM(name) name,
  DDPM_BODIES(DDPM_BODY_ENUM)
#undef DDPM_BODY_ENUM
};

// fn.template operator()<NameElem<S>>() for body b: the one dispatch of both drivers
template <class S, class Fn> void with_body(Body b, Fn&& fn) {
  switch (b) {
#define DDPM_BODY_CASE(name) \
  case Body::name:           \
    return fn.template operator()<name##Elem<S>>();
    DDPM_BODIES(DDPM_BODY_CASE)
#undef DDPM_BODY_CASE
  }
}

// One [B, ...] tensor as the drivers see it (absent when base == nullptr).
struct Operand {
  char* base = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t batch_stride = 0;                  // elements
  bool direct = false;                       // element e of sample b at base + b * batch_stride + e
  std::array<int64_t, kMaxDims> stride{};    // element strides in the plan's iteration order
};

struct Launch {
  Body body = Body::QSample;
  Plan plan;
  std::vector<Operand> in, out;              // F::NI inputs, F::NO outputs
  bool dbl = false;                          // compute in double (float64 inputs) else float
  const void* table = nullptr;               // [T, ncols] in the compute dtype, or nullptr
  int64_t ncols = 0, nrows = 0;
  const int64_t* t = nullptr;                // [B] timesteps, or nullptr: use fixed_t
  int64_t fixed_t = 0;
  Params<float> pf;                          // options (float compute)
  Params<double> pd;                         // options (double compute)
  int noise_input = -1;                      // input index drawn from Philox(seed, b * N + i)
  uint64_t seed = 0;
  std::array<void*, 4> finals{};             // NF per-sample results [B] in the compute dtype
};

void launch_cpu(const Launch& L);
#if defined(DDPM_WITH_CUDA) || defined(DDPM_CUDA_EMU)
void launch_cuda(const Launch& L);  // cuda/kernels.cu, on a GPU or emulated on the CPU
#endif

}  // namespace ddpm
