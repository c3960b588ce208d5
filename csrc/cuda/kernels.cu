// cuda/kernels.cu -- the CUDA driver: runs an element body (ops/body.h) over [B, ...] tensors.
//
// Grid (chunks of a sample, samples), the chunk length chosen from N, B and the device's SM count
// (chunk_elems: >= 4 blocks per SM where the batch allows): a block loads its sample's table row once
// into shared memory, builds the body's per-sample coefficients, and walks its chunk 8 elements a
// thread and step, with 128-bit loads and stores (one for 8 fp16 / bf16, two for 8 float32) where all
// 8 are in the chunk and the address is 16-byte aligned, element by element otherwise. Per-sample
// reductions are deterministic and two-stage: a fixed-order block reduction writes one partial per
// (sample, chunk); a second kernel adds a sample's partials in chunk order, in double, and finishes
// the [B] results. No float atomics, no host syncs, launches on the current stream. Compute is
// float32 (storage fp16 / bf16 / fp32). Noise for the sampler steps is drawn in-kernel with Philox
// 4x32-10 (ddpm_math.h's philox_normal(seed, b * N + i): the stream of triton.language.randn4x),
// compiled only into the kNoise instances of the bodies that can draw it. The op families (csrc/ops/)
// hand this driver only operands in the plan's direct layout.
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

constexpr int kThreads = 256;       // a body kernel's block
constexpr int kFinishThreads = 128;  // a finish kernel's block (one thread per sample)
constexpr int kVec = 8;  // elements per thread and step: one 16-byte access of fp16 / bf16, two of float32
// Grid sizing: a sample's N elements are cut into chunks of kVec-multiple length so that the grid
// (chunks x samples) holds kTargetBlocksPerSm blocks per SM of the device where it can; a chunk is
// never shorter than kMinChunkElems (a block's fixed cost: table row, reduction) nor longer than
// kMaxChunkElems (float32 per-thread sums stay short). Same N, B and device: same chunks, same results.
constexpr int64_t kMinChunkElems = 1024, kMaxChunkElems = 8192;
constexpr int64_t kTargetBlocksPerSm = 4;
constexpr int kMaxIn = 8, kMaxOut = 4, kMaxFinal = 4;  // operand slots of a body (SolverUpdateElem: 8 in)

enum StoreType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

template <class S, class Options> struct KArgs {
  char* in[kMaxIn];
  int in_type[kMaxIn];  // StoreType of each operand
  int64_t in_bs[kMaxIn];
  char* out[kMaxOut];
  int out_type[kMaxOut];
  int64_t out_bs[kMaxOut];
  int64_t N, nch, chunk, ncols, nrows, fixed_t;  // chunk: elements of a sample per block (chunk_elems)
  const S* table;
  const int64_t* t;
  Options p;  // the body's options
  int noise_input;
  uint64_t seed;
  const int64_t* seed_key;  // the seed on the device (read in-kernel), or nullptr: seed
  bool row_major;
  int nd;
  int64_t size[kMaxDims], logical[kMaxDims];  // iteration-order sizes, row-major strides
  S* partial;                                 // [B, nch, NR]
  S* finals[kMaxFinal];
};

// Elements per chunk for B samples of N elements on a device with `sm_count` SMs (see kMinChunkElems).
inline int64_t chunk_elems(int64_t N, int64_t B, int64_t sm_count) {
  const int64_t target_blocks = kTargetBlocksPerSm * std::max<int64_t>(sm_count, 1);
  const int64_t samples = std::max<int64_t>(B, 1);
  const int64_t chunks_per_sample = (target_blocks + samples - 1) / samples;
  int64_t chunk = (N + chunks_per_sample - 1) / chunks_per_sample;
  chunk = (chunk + kVec - 1) / kVec * kVec;  // chunk starts keep 16-byte alignment
  return std::clamp(chunk, kMinChunkElems, kMaxChunkElems);
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// 16-bit storage types from / to their bit patterns
template <class H> __device__ __forceinline__ float half_bits_to_float(uint32_t bits) {
  return static_cast<float>(H(static_cast<unsigned short>(bits & 0xffffu), H::from_bits()));
}
template <class H> __device__ __forceinline__ uint32_t float_to_half_bits(float v) {
  return static_cast<uint32_t>(static_cast<H>(v).x);
}

// kVec elements from p (count of them valid, the rest read as 0) into dst: 128-bit loads when all
// kVec are valid and p is 16-byte aligned, element by element otherwise (tails, odd batch strides).
template <class S>
__device__ __forceinline__ void load_vec(const float* p, int64_t count, S* dst) {
  if (count == kVec && aligned16(p)) {
    const float4 lo = reinterpret_cast<const float4*>(p)[0], hi = reinterpret_cast<const float4*>(p)[1];
    dst[0] = lo.x, dst[1] = lo.y, dst[2] = lo.z, dst[3] = lo.w;
    dst[4] = hi.x, dst[5] = hi.y, dst[6] = hi.z, dst[7] = hi.w;
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) dst[j] = j < count ? static_cast<S>(p[j]) : S(0);
  }
}

template <class S, class H>  // H: c10::Half or c10::BFloat16
__device__ __forceinline__ void load_vec(const H* p, int64_t count, S* dst) {
  if (count == kVec && aligned16(p)) {
    const uint4 w = *reinterpret_cast<const uint4*>(p);
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // little-endian: element 2j in the low half of word j
      dst[2 * j] = static_cast<S>(half_bits_to_float<H>(words[j]));
      dst[2 * j + 1] = static_cast<S>(half_bits_to_float<H>(words[j] >> 16));
    }
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) dst[j] = j < count ? static_cast<S>(p[j]) : S(0);
  }
}

template <class S>
__device__ __forceinline__ void store_vec(float* p, int64_t count, const S* src) {
  if (count == kVec && aligned16(p)) {
    float4 lo, hi;
    lo.x = static_cast<float>(src[0]), lo.y = static_cast<float>(src[1]);
    lo.z = static_cast<float>(src[2]), lo.w = static_cast<float>(src[3]);
    hi.x = static_cast<float>(src[4]), hi.y = static_cast<float>(src[5]);
    hi.z = static_cast<float>(src[6]), hi.w = static_cast<float>(src[7]);
    gpu::store16(reinterpret_cast<float4*>(p), lo);
    gpu::store16(reinterpret_cast<float4*>(p) + 1, hi);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      if (j < count) p[j] = static_cast<float>(src[j]);
  }
}

template <class S, class H>
__device__ __forceinline__ void store_vec(H* p, int64_t count, const S* src) {
  if (count == kVec && aligned16(p)) {
    uint32_t words[4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
      words[j] = float_to_half_bits<H>(static_cast<float>(src[2 * j])) |
                 (float_to_half_bits<H>(static_cast<float>(src[2 * j + 1])) << 16);
    uint4 w;
    w.x = words[0], w.y = words[1], w.z = words[2], w.w = words[3];
    gpu::store16(reinterpret_cast<uint4*>(p), w);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      if (j < count) p[j] = static_cast<H>(static_cast<float>(src[j]));
  }
}

// float64 storage (double compute only; the CUDA build runs float32 math): element by element
template <class S> __device__ __forceinline__ void load_vec(const double* p, int64_t count, S* dst) {
#pragma unroll
  for (int j = 0; j < kVec; ++j) dst[j] = j < count ? static_cast<S>(p[j]) : S(0);
}
template <class S> __device__ __forceinline__ void store_vec(double* p, int64_t count, const S* src) {
#pragma unroll
  for (int j = 0; j < kVec; ++j)
    if (j < count) p[j] = static_cast<double>(src[j]);
}

// kVec elements of operand `base` (storage type `type`) from element offset `off`
template <class S>
__device__ __forceinline__ void load_any(const char* base, int type, int64_t off, int64_t count, S* dst) {
  if constexpr (std::is_same_v<S, double>) {
    load_vec<S>(reinterpret_cast<const double*>(base) + off, count, dst);
  } else {
    if (type == kF16) load_vec<S, c10::Half>(reinterpret_cast<const c10::Half*>(base) + off, count, dst);
    else if (type == kBF16) load_vec<S, c10::BFloat16>(reinterpret_cast<const c10::BFloat16*>(base) + off, count, dst);
    else load_vec<S>(reinterpret_cast<const float*>(base) + off, count, dst);
  }
}

template <class S>
__device__ __forceinline__ void store_any(char* base, int type, int64_t off, int64_t count, const S* src) {
  if constexpr (std::is_same_v<S, double>) {
    store_vec<S>(reinterpret_cast<double*>(base) + off, count, src);
  } else {
    if (type == kF16) store_vec<S, c10::Half>(reinterpret_cast<c10::Half*>(base) + off, count, src);
    else if (type == kBF16) store_vec<S, c10::BFloat16>(reinterpret_cast<c10::BFloat16*>(base) + off, count, src);
    else store_vec<S>(reinterpret_cast<float*>(base) + off, count, src);
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

// Resident blocks per SM asked of ptxas (__launch_bounds__: at most 65536 / (256 * n) registers a thread): 4,
// or the body's own kMinBlocksPerSm (3, 80 registers, for the bodies that at 64 registers spill or get a stack
// frame on sm_90).
template <class F> constexpr int min_blocks_per_sm() {
  if constexpr (requires { F::kMinBlocksPerSm; }) return F::kMinBlocksPerSm;
  else return 4;
}

// Whether ops may ask body F for an in-kernel noise input (Launch::noise_input >= 0): its kMayDrawNoise.
template <class F> constexpr bool may_draw_noise() {
  if constexpr (requires { F::kMayDrawNoise; }) return F::kMayDrawNoise;
  else return false;
}

// kNoise: input a.noise_input is drawn in-kernel (Philox + Box-Muller); only the bodies that can draw
// noise (may_draw_noise) get a kNoise = true instance, so the others carry none of that code.
template <class S, class F, bool kNoise>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm<F>()) body_kernel(const KArgs<S, typename F::Options> a) {
  constexpr int NR = F::NR > 0 ? F::NR : 1, NO = F::NO > 0 ? F::NO : 1;
  __shared__ S row[kNumCols];
  __shared__ S warp_red[kThreads / 32][NR];
  const int64_t b = blockIdx.y, c = blockIdx.x;
  const int64_t tb = a.t ? a.t[b] : a.fixed_t;
  CUDA_KERNEL_ASSERT(a.table == nullptr || (tb >= 0 && tb < a.nrows));  // table-less bodies read no row
  // the row's first min(ncols, kNumCols) columns: a body's own table may be narrower than the schedule's
  if (a.table && threadIdx.x < kNumCols && threadIdx.x < a.ncols)
    row[threadIdx.x] = a.table[tb * a.ncols + threadIdx.x];
  __syncthreads();
  const F f = F::make(a.table ? row : nullptr, a.p, b, tb);
  uint64_t seed = a.seed;
  if constexpr (kNoise) {
    if (a.seed_key) seed = static_cast<uint64_t>(*a.seed_key);
  }
  S acc[NR];
#pragma unroll
  for (int k = 0; k < NR; ++k) acc[k] = S(0);
  const int64_t e_begin = c * a.chunk, e_end = min(a.N, e_begin + a.chunk);
  for (int64_t e = e_begin + int64_t(threadIdx.x) * kVec; e < e_end; e += int64_t(kThreads) * kVec) {
    const int64_t cnt = min(int64_t(kVec), e_end - e);
    S vin[F::NI][kVec];
#pragma unroll
    for (int k = 0; k < F::NI; ++k) {
      if constexpr (kNoise) {
        if (k == a.noise_input) {
          const uint64_t first = uint64_t(b * a.N + e);  // the counter of element e when row-major
          if (a.row_major && cnt == kVec && (first & 3) == 0) {
            // whole Philox blocks: one per four draws
            static_assert(kVec % 4 == 0, "a vector of whole Philox blocks");
#pragma unroll
            for (int j = 0; j < kVec; j += 4) {
              float z0, z1, z2, z3;
              philox_normals4(seed, (first + j) >> 2, z0, z1, z2, z3);
              vin[k][j] = static_cast<S>(z0), vin[k][j + 1] = static_cast<S>(z1);
              vin[k][j + 2] = static_cast<S>(z2), vin[k][j + 3] = static_cast<S>(z3);
            }
          } else {
#pragma unroll
            for (int j = 0; j < kVec; ++j)
              vin[k][j] = static_cast<S>(philox_normal(seed, uint64_t(b * a.N + logical_index(a, e + j))));
          }
          continue;
        }
      }
      if (a.in[k] == nullptr) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) vin[k][j] = S(0);
      } else {
        load_any<S>(a.in[k], a.in_type[k], b * a.in_bs[k] + e, cnt, vin[k]);
      }
    }
    S vout[NO][kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
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
      store_any<S>(a.out[k], a.out_type[k], b * a.out_bs[k] + e, cnt, vout[k]);
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
    for (int k = 0; k < F::NF; ++k)
      if (a.finals[k]) a.finals[k][b] = outs[k];  // an unwanted result is not made (Runner::finals)
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
  static_assert(F::NI <= kMaxIn && F::NO <= kMaxOut, "a body with more operand slots: raise kMaxIn / kMaxOut");
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
  a.chunk = chunk_elems(p.N, p.B, gpu::sm_count());
  a.nch = (p.N + a.chunk - 1) / a.chunk;
  a.ncols = L.ncols;
  a.nrows = L.nrows;
  a.fixed_t = L.fixed_t;
  a.table = static_cast<const S*>(L.table);
  a.t = L.t;
  a.p = prm;
  a.noise_input = L.noise_input;
  a.seed = L.seed;
  a.seed_key = L.seed_key;
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
  if constexpr (may_draw_noise<F>()) {
    if (a.noise_input >= 0) gpu::launch(body_kernel<S, F, true>, grid, dim3(kThreads), 0, stream, a);
    else gpu::launch(body_kernel<S, F, false>, grid, dim3(kThreads), 0, stream, a);
  } else {
    TORCH_CHECK(a.noise_input < 0, "ddpm_fast (CUDA): this body draws no in-kernel noise (noise_input ",
                a.noise_input, ")");
    gpu::launch(body_kernel<S, F, false>, grid, dim3(kThreads), 0, stream, a);
  }
  gpu::launch_check();
  if constexpr (F::NR > 0) {
    gpu::launch(finish_kernel<S, F>, dim3(static_cast<unsigned>((p.B + kFinishThreads - 1) / kFinishThreads)),
                dim3(kFinishThreads), 0, stream, a, p.B);
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
