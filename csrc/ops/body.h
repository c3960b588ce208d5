// ops/body.h -- what an element body is, and DDPM_BODY, which hands a body to the device drivers.
//
// A body (template <class S> struct NameElem, S = float or double, the compute dtype) runs one op's math on
// one element; the drivers (cpu/kernels.cpp, cuda/kernels.cu) walk it over [B, ...] tensors. It has
//   struct Options { ... };            its own options (S-typed; per-sample [B] arrays as const S*)
//   enum In : int { in_a, in_b, kNumIn };   named input slots; enum Out { out_c, kNumOut }: output slots
//   static constexpr int NI = kNumIn, NO = kNumOut, NR = number of per-sample sums (enum Sum { sum_... })
//   static make(const S* row, const Options&, int64_t b, int64_t t)   one sample's coefficients (row: its
//                                                                     table row, or nullptr without table)
//   template <class V> operator()(const V* in, V* out, V* sums) const   one element: in[in_a] ... out[out_c],
//                                                                     V = S or at::vec::Vectorized<S>
//   with NR > 0: NF (enum Final { final_..., kNumFinals }) and static finish(row, options, t, sums, finals)
// and optionally specialized(run) (a CPU loop over a copy with constant options), kMayDrawNoise (true: the
// op may ask for an input drawn in-kernel, Launch::noise_input) and kMinBlocksPerSm (CUDA __launch_bounds__,
// default 4). The formulas are
// ddpm_math.h's; a body only composes them. An absent input reads as zeros, an absent output is not written.
#pragma once

#include <cstdint>

#include "../ddpm_math.h"

// DDPM_BODY(NameElem): one line per body in its family header, after the body. Empty here; a driver file
// defines it (an explicit instantiation of its launch function) before it includes ops/families.h.
#ifndef DDPM_BODY
#define DDPM_BODY(Body)
#endif
