// cuda/kernels.cu -- the CUDA driver: runs an element body (ops/body.h) over [B, ...] tensors.
//
// Grid (chunks of a sample, samples): a block loads its sample's table row once into shared memory,
// builds the body's per-sample coefficients, and walks its chunk with 16-byte vector accesses where
// the address allows (scalar tail otherwise). Per-sample reductions are deterministic and two-stage:
// a fixed-order block reduction writes one partial per (sample, chunk); a second kernel adds a
// sample's partials in chunk order and finishes the [B] results. No float atomics, no host syncs,
// launches on the current stream. Compute is float32 (storage fp16 / bf16 / fp32). Noise for the sampler steps is drawn in-kernel with Philox 4x32-10
// (ddpm_math.h: the stream of triton.language.randn(seed, b * N + i)). ops.cpp hands this driver
// only operands in the plan's direct layout.
//
// The same file builds as host C++ against the CUDA emulation (backend "cuda_emu", -DDDPM_CUDA_EMU):
// every runtime call goes through cuda/runtime.h.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../launch.h"
#include "runtime.h"

namespace ddpm {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunkElems = 8192;  // elements of one sample per block
constexpr int kMaxIn = 5, kMaxOut = 4, kMaxFinal = 4;

enum StoreType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

template <class S, class Options> struct KArgs {
  char* in[kMaxIn];
  int in_type[kMaxIn];  // StoreType of each operand
  int64_t in_bs[kMaxIn];
  char* out[kMaxOut];
  int out_type[kMaxOut];
  int64_t out_bs[kMaxOut];
  int64_t N, nch, ncols, nrows, fixed_t;
  const S* table;
  const int64_t* t;
  Options p;  // the body's options
  int noise_input;
  uint64_t seed;
  bool row_major;
  int nd;
  int64_t size[kMaxDims], logical[kMaxDims];  // iteration-order sizes, row-major strides
  S* partial;                                 // [B, nch, NR]
  S* finals[kMaxFinal];
};

template <class T, int VEC> struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <class S, class T, int VEC>
__device__ __forceinline__ void load_pack(const T* p, int64_t count, S* dst) {
  if (count == VEC && (reinterpret_cast<uintptr_t>(p) % (sizeof(T) * VEC)) == 0) {
    Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
    for (int j = 0; j < VEC; ++j) dst[j] = static_cast<S>(pk.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) dst[j] = j < count ? static_cast<S>(p[j]) : S(0);
  }
}

template <class S, class T, int VEC>
__device__ __forceinline__ void store_pack(T* p, int64_t count, const S* src) {
  if (count == VEC && (reinterpret_cast<uintptr_t>(p) % (sizeof(T) * VEC)) == 0) {
    Pack<T, VEC> pk;
#pragma unroll
    for (int j = 0; j < VEC; ++j) pk.v[j] = static_cast<T>(src[j]);
    *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if (j < count) p[j] = static_cast<T>(src[j]);
  }
}

// VEC elements of operand `base` (storage type `type`) from element offset `off`
template <class S, int VEC>
__device__ __forceinline__ void load_any(const char* base, int type, int64_t off, int64_t count, S* dst) {
  if constexpr (std::is_same_v<S, double>) {
    load_pack<S, double, VEC>(reinterpret_cast<const double*>(base) + off, count, dst);
  } else {
    if (type == kF16) load_pack<S, c10::Half, VEC>(reinterpret_cast<const c10::Half*>(base) + off, count, dst);
    else if (type == kBF16) load_pack<S, c10::BFloat16, VEC>(reinterpret_cast<const c10::BFloat16*>(base) + off, count, dst);
    else load_pack<S, float, VEC>(reinterpret_cast<const float*>(base) + off, count, dst);
  }
}

template <class S, int VEC>
__device__ __forceinline__ void store_any(char* base, int type, int64_t off, int64_t count, const S* src) {
  if constexpr (std::is_same_v<S, double>) {
    store_pack<S, double, VEC>(reinterpret_cast<double*>(base) + off, count, src);
  } else {
    if (type == kF16) store_pack<S, c10::Half, VEC>(reinterpret_cast<c10::Half*>(base) + off, count, src);
    else if (type == kBF16) store_pack<S, c10::BFloat16, VEC>(reinterpret_cast<c10::BFloat16*>(base) + off, count, src);
    else store_pack<S, float, VEC>(reinterpret_cast<float*>(base) + off, count, src);
  }
}

template <class A> __device__ __forceinline__ int64_t logical_index(const A& a, int64_t e) {
  if (a.row_major) return e;
  int64_t off = 0;
  for (int k = a.nd - 1; k >= 0; --k) {
    off += (e % a.size[k]) * a.logical[k];
    e /= a.size[k];
  }
  return off;
}

template <class S, class F>
__global__ void __launch_bounds__(kThreads, 2) body_kernel(const KArgs<S, typename F::Options> a) {
  constexpr int VEC = 4;  // 16-byte accesses for float32 (8 for fp16 / bf16, 2 x 16 for float64)
  constexpr int NR = F::NR > 0 ? F::NR : 1, NO = F::NO > 0 ? F::NO : 1;
  __shared__ S row[kNumCols];
  __shared__ S warp_red[kThreads / 32][NR];
  const int64_t b = blockIdx.y, c = blockIdx.x;
  const int64_t tb = a.t ? a.t[b] : a.fixed_t;
  CUDA_KERNEL_ASSERT(a.table == nullptr || (tb >= 0 && tb < a.nrows));  // table-less bodies read no row
  if (a.table && threadIdx.x < kNumCols) row[threadIdx.x] = a.table[tb * a.ncols + threadIdx.x];
  __syncthreads();
  const F f = F::make(a.table ? row : nullptr, a.p, b, tb);
  S acc[NR];
#pragma unroll
  for (int k = 0; k < NR; ++k) acc[k] = S(0);
  const int64_t e_begin = c * kChunkElems, e_end = min(a.N, e_begin + kChunkElems);
  for (int64_t e = e_begin + int64_t(threadIdx.x) * VEC; e < e_end; e += int64_t(kThreads) * VEC) {
    const int64_t cnt = min(int64_t(VEC), e_end - e);
    S vin[F::NI][VEC];
#pragma unroll
    for (int k = 0; k < F::NI; ++k) {
      if (k == a.noise_input) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          float u1, u2;
          philox_uniform2(a.seed, uint64_t(b * a.N + logical_index(a, e + j)), &u1, &u2);
          vin[k][j] = static_cast<S>(box_muller(u1, u2));
        }
      } else if (a.in[k] == nullptr) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) vin[k][j] = S(0);
      } else {
        load_any<S, VEC>(a.in[k], a.in_type[k], b * a.in_bs[k] + e, cnt, vin[k]);
      }
    }
    S vout[NO][VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      S xi[F::NI], xo[NO], r[NR];
#pragma unroll
      for (int k = 0; k < F::NI; ++k) xi[k] = vin[k][j];
      f.template operator()<S>(xi, xo, r);
#pragma unroll
      for (int k = 0; k < F::NO; ++k) vout[k][j] = xo[k];
      if (j < cnt) {
#pragma unroll
        for (int k = 0; k < F::NR; ++k) acc[k] += r[k];
      }
    }
#pragma unroll
    for (int k = 0; k < F::NO; ++k) {
      if (a.out[k] == nullptr) continue;
      store_any<S, VEC>(a.out[k], a.out_type[k], b * a.out_bs[k] + e, cnt, vout[k]);
    }
  }
  if constexpr (F::NR > 0) {
    // fixed-order block reduction: warp tree, then warps in order
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int k = 0; k < F::NR; ++k) {
      S v = acc[k];
#pragma unroll
      for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
      if (lane == 0) warp_red[warp][k] = v;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int k = 0; k < F::NR; ++k) {
        S s = S(0);
        for (int w = 0; w < kThreads / 32; ++w) s += warp_red[w][k];
        a.partial[(b * a.nch + c) * F::NR + k] = s;
      }
    }
  }
}

// second stage: one thread per sample adds its chunk partials in order and finishes the results
template <class S, class F> __global__ void finish_kernel(const KArgs<S, typename F::Options> a, int64_t B) {
  if constexpr (F::NR > 0) {
    const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (b >= B) return;
    S sums[F::NR];
    for (int k = 0; k < F::NR; ++k) {
      double s = 0.0;  // chunk partials added in double (as the CPU driver): no drift over many chunks
      for (int64_t c = 0; c < a.nch; ++c) s += double(a.partial[(b * a.nch + c) * F::NR + k]);
      sums[k] = S(s);
    }
    const int64_t tb = a.t ? a.t[b] : a.fixed_t;
    const S* row = a.table ? a.table + tb * a.ncols : nullptr;
    S outs[F::NF];
    F::finish(row, a.p, tb, sums, outs);
    for (int k = 0; k < F::NF; ++k) a.finals[k][b] = outs[k];
  }
}

int store_type(at::ScalarType t, bool dbl) {
  switch (t) {
    case at::kFloat: TORCH_CHECK(!dbl, "ddpm_fast (CUDA): float64 math needs float64 operands"); return kF32;
    case at::kDouble: TORCH_CHECK(dbl, "ddpm_fast (CUDA): float64 operand in float32 math"); return kF64;
    case at::kHalf: TORCH_CHECK(!dbl, "ddpm_fast (CUDA): float64 math needs float64 operands"); return kF16;
    case at::kBFloat16: TORCH_CHECK(!dbl, "ddpm_fast (CUDA): float64 math needs float64 operands"); return kBF16;
    default: TORCH_CHECK(false, "ddpm_fast (CUDA): unsupported dtype ", t);
  }
  return kF32;
}

template <class S, class F> void run(const Launch& L, const typename F::Options& prm) {
  const Plan& p = L.plan;
  KArgs<S, typename F::Options> a{};
  TORCH_CHECK(int(L.in.size()) == F::NI && int(L.out.size()) == F::NO, "ddpm_fast: operand count mismatch");
  const auto acc_type = c10::CppTypeToScalarType<S>::value;
  for (int k = 0; k < F::NI; ++k) {
    TORCH_CHECK(!L.in[k].base || L.in[k].direct, "ddpm_fast (CUDA): input ", k, " is not in the plan's layout");
    a.in[k] = L.in[k].base;
    a.in_type[k] = L.in[k].base ? store_type(L.in[k].dtype, L.dbl) : kF32;
    a.in_bs[k] = L.in[k].batch_stride;
  }
  for (int k = 0; k < F::NO; ++k) {
    TORCH_CHECK(!L.out[k].base || L.out[k].direct, "ddpm_fast (CUDA): output ", k, " is not in the plan's layout");
    a.out[k] = L.out[k].base;
    a.out_type[k] = L.out[k].base ? store_type(L.out[k].dtype, L.dbl) : kF32;
    a.out_bs[k] = L.out[k].batch_stride;
  }
  a.N = p.N;
  a.nch = (p.N + kChunkElems - 1) / kChunkElems;
  a.ncols = L.ncols;
  a.nrows = L.nrows;
  a.fixed_t = L.fixed_t;
  a.table = static_cast<const S*>(L.table);
  a.t = L.t;
  a.p = prm;
  a.noise_input = L.noise_input;
  a.seed = L.seed;
  a.row_major = p.row_major;
  a.nd = p.nd;
  int64_t s = 1;
  for (int d = p.nd; d >= 1; --d) {
    for (int k = 0; k < p.nd; ++k)
      if (p.dim[k] == d) a.logical[k] = s;
    for (int k = 0; k < p.nd; ++k)
      if (p.dim[k] == d) s *= p.size[k];
  }
  for (int k = 0; k < p.nd; ++k) a.size[k] = p.size[k];
  TORCH_CHECK(p.B <= 65535, "ddpm_fast (CUDA): at most 65535 samples per call");
  const gpu::Stream stream = gpu::current_stream();
  at::Tensor partial;
  if constexpr (F::NR > 0) {
    partial = at::empty({p.B * a.nch * F::NR},
                        at::TensorOptions().dtype(acc_type).device(gpu::device()));
    a.partial = partial.data_ptr<S>();
    for (int k = 0; k < F::NF; ++k) a.finals[k] = static_cast<S*>(L.finals[k]);
  }
  dim3 grid(static_cast<unsigned>(a.nch), static_cast<unsigned>(p.B));
  gpu::launch(body_kernel<S, F>, grid, dim3(kThreads), 0, stream, a);
  gpu::launch_check();
  if constexpr (F::NR > 0) {
    gpu::launch(finish_kernel<S, F>, dim3(static_cast<unsigned>((p.B + 127) / 128)), dim3(128), 0, stream, a, p.B);
    gpu::launch_check();
  }
}

}  // namespace

// float32 math only (fp16 / bf16 / fp32 storage); ddpm_fast.native sends float64 CUDA inputs to the
// reference path, which keeps the nvcc build of both architectures within a few minutes.
template <template <class> class Body> void launch_cuda(const Launch& L, const BodyOptions<Body>& options) {
  TORCH_CHECK(!L.dbl, "ddpm_fast (CUDA): float64 inputs run on the reference path, not the CUDA kernels");
  run<float, Body<float>>(L, options.f);
}

}  // namespace ddpm

// launch_cuda for every body of csrc/ops/
#define DDPM_BODY(Body) template void launch_cuda<Body>(const Launch&, const BodyOptions<Body>&);
#include "../ops/families.h"
