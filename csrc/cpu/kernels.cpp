// cpu/kernels.cpp -- the CPU driver: runs an element body (ops/body.h) over [B, ...] tensors; launch_cpu<Body>
// is instantiated at the end of this file for every body of csrc/ops/ (DDPM_BODY, ops/families.h).
//
// Work is split into fixed chunks of kChunk elements of one sample (independent of the thread
// count) and run with at::parallel_for. A chunk reads each input either in place (direct layout in
// the compute dtype) or through a small buffer (fp16/bf16 conversion, strided gather), runs the body
// with at::vec::Vectorized (SIMD exp/log, no -ffast-math) and writes outputs likewise. Per-sample
// reductions: per-lane partial sums within a chunk, lanes then chunks added in a fixed order, so a
// sample's result is deterministic and independent of the rest of the batch.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "../launch.h"
#include "simd_math.h"
#include "simd_philox.h"

namespace ddpm {
namespace {

constexpr int64_t kChunk = 2048;

// element offsets (in the operand's strides) of iteration indices e0 .. e0 + n - 1 of one sample
void strided_offsets(const Plan& p, const int64_t* stride, int64_t e0, int64_t n, int64_t* offs) {
  int64_t idx[kMaxDims];
  int64_t rem = e0, off = 0;
  for (int k = p.nd - 1; k >= 0; --k) {
    idx[k] = rem % p.size[k];
    rem /= p.size[k];
    off += idx[k] * stride[k];
  }
  for (int64_t i = 0; i < n; ++i) {
    offs[i] = off;
    for (int k = p.nd - 1; k >= 0; --k) {
      if (++idx[k] < p.size[k]) {
        off += stride[k];
        break;
      }
      off -= (p.size[k] - 1) * stride[k];
      idx[k] = 0;
    }
  }
}

template <class S, class T> void load_as(const T* src, const int64_t* offs, int64_t n, S* dst) {
  if (offs) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(src[offs[i]]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(src[i]);
  }
}

template <class S, class T> void store_as(const S* src, const int64_t* offs, int64_t n, T* dst) {
  if (offs) {
    for (int64_t i = 0; i < n; ++i) dst[offs[i]] = static_cast<T>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

template <class S, class Fn> void with_type(at::ScalarType dt, Fn fn) {
  switch (dt) {
    case at::kFloat: fn(float{}); break;
    case at::kDouble: fn(double{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "ddpm_fast: unsupported dtype ", dt);
  }
}

// Philox normals for iteration indices e0 .. e0 + n - 1 of sample b (offset b * N + row-major index)
template <class S> void philox_normals(const Plan& p, uint64_t seed, int64_t b, int64_t e0, int64_t n, S* dst,
                                       int64_t* offs) {
  alignas(64) float z[kChunk];
  float* zf = std::is_same_v<S, float> ? reinterpret_cast<float*>(dst) : z;
  const int64_t base = b * p.N;
  if (!p.row_major) {
    std::array<int64_t, kMaxDims> logical{};  // row-major strides in iteration order
    int64_t s = 1;
    for (int d = p.nd; d >= 1; --d) {
      for (int k = 0; k < p.nd; ++k)
        if (p.dim[k] == d) logical[k] = s;
      for (int k = 0; k < p.nd; ++k)
        if (p.dim[k] == d) s *= p.size[k];
    }
    strided_offsets(p, logical.data(), e0, n, offs);
    philox_normals_scalar(seed, 0, n, [&](int64_t j) { return uint64_t(base + offs[j]); }, zf);
  } else {
    philox_normal_rows(seed, uint64_t(base + e0), n, zf);
  }
  if (zf != reinterpret_cast<float*>(dst))
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<S>(z[j]);
}

// Whether body f reads input k (F::reads where it says, e.g. a copy with constant inputs: the loop then skips
// the loads of the others), else true
template <class F> inline __attribute__((always_inline)) bool reads(const F& f, int k) {
  if constexpr (requires { f.reads(k); })
    return f.reads(k);
  else
    return true;
}

// Whether body f writes output k (F::writes where it says, e.g. a copy whose optional output is absent: the loop
// then skips its stores to the scratch chunk), else true
template <class F> inline __attribute__((always_inline)) bool writes(const F& f, int k) {
  if constexpr (requires { f.writes(k); })
    return f.writes(k);
  else
    return true;
}

// Run body f on n elements: in[k] / out[k] are contiguous compute-dtype arrays of n elements (an absent
// input points at zeros, an absent output at scratch), so the loop loads and stores without tests.
// Inlined into run_chunk, where f may be a copy with constant options (F::specialized).
template <class S, class F>
inline __attribute__((always_inline)) void run_loop(const F f, const S* const* ins, S* const* outs, int64_t n,
                                                    S* red) {
  using Vec = at::vec::Vectorized<S>;
  constexpr int NI = F::NI, NO = F::NO > 0 ? F::NO : 1, NR = F::NR > 0 ? F::NR : 1;
  // the operand pointers in locals: the loop's stores cannot alias them, so they stay in registers and the
  // loads of inputs the body does not read are dropped (through the callers' arrays, both stay in the loop)
  const S* in[NI];
  S* out[NO];
  for (int k = 0; k < NI; ++k) in[k] = ins[k];
  for (int k = 0; k < F::NO; ++k) out[k] = outs[k];
  Vec vin[NI], vout[NO], vr[NR], acc[NR];
  for (int k = 0; k < NR; ++k) acc[k] = Vec(S(0));
  for (int k = 0; k < NO; ++k) vout[k] = Vec(S(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    for (int k = 0; k < NI; ++k)
      if (reads(f, k)) vin[k] = Vec::loadu(in[k] + i);
    f.template operator()<Vec>(vin, vout, vr);
    for (int k = 0; k < F::NO; ++k)
      if (writes(f, k)) vout[k].store(out[k] + i);
    for (int k = 0; k < F::NR; ++k) acc[k] = acc[k] + vr[k];
  }
  if (i < n) {
    const int64_t c = n - i;
    for (int k = 0; k < NI; ++k) vin[k] = Vec::loadu(in[k] + i, c);
    f.template operator()<Vec>(vin, vout, vr);
    for (int k = 0; k < F::NO; ++k) vout[k].store(out[k] + i, c);
    for (int k = 0; k < F::NR; ++k) acc[k] = acc[k] + Vec::set(Vec(S(0)), vr[k], c);
  }
  for (int k = 0; k < F::NR; ++k) {
    alignas(64) S lanes[Vec::size()];
    acc[k].store(lanes);
    S s = S(0);
    for (int j = 0; j < Vec::size(); ++j) s += lanes[j];
    red[k] = s;
  }
}

// run_loop for f, or, where F offers it, for the copy of f with constant options that F::specialized picks
template <class S, class F> void run_chunk(const F& f, const S* const* in, S* const* out, int64_t n, S* red) {
  auto loop = [&](const F& g) __attribute__((always_inline)) { run_loop<S, F>(g, in, out, n, red); };
  if constexpr (requires { f.specialized(loop); })
    f.specialized(loop);
  else
    run_loop<S, F>(f, in, out, n, red);
}

// n int64 words of scratch for the calling thread, kept between launches (grown on demand, never shrunk: at most
// the largest launch's chunk buffers, ~200 KB): a launch allocates and frees no buffer on the heap (at tiny sizes
// that cost ~1 us a call, glibc consolidating its free chunks). A launch runs no other launch inside it.
inline int64_t* thread_scratch(size_t n) {
  thread_local std::unique_ptr<int64_t[]> data;
  thread_local size_t size = 0;
  if (size < n) {
    data.reset(new int64_t[n]);
    size = n;
  }
  return data.get();
}

template <class S, class F> void drive(const Launch& L, const typename F::Options& options) {
  const Plan& p = L.plan;
  const uint64_t seed = L.seed_key ? static_cast<uint64_t>(*L.seed_key) : L.seed;  // a CPU tensor here
  const int64_t nch = (p.N + kChunk - 1) / kChunk;
  const int NR = F::NR;
  std::vector<S> partial(NR > 0 ? size_t(p.B * nch * NR) : 0);
  const S* table = static_cast<const S*>(L.table);
  // the table row each sample reads (as the CUDA driver's device assert; bodies without a table read none)
  for (int64_t b = 0; table && b < p.B; ++b) {
    const int64_t tb = L.t ? L.t[b] : L.fixed_t;
    TORCH_CHECK(tb >= 0 && tb < L.nrows, "t: timestep ", tb, " of sample ", b, " is outside the table's rows [0, ",
                L.nrows, ")");
  }
  // Grain: work below kSerialElements runs on the calling thread. Forking OpenMP threads for it costs more
  // than it saves, and on a busy machine a forked thread can wait a whole scheduler slice for a core (a
  // 4x3x32x32 DDPM step: 15 ms on 2 threads beside other work, 0.6 ms on 1). Measured on 2 cores: forking
  // pays from ~50K elements (16x3x32x32 q_sample 56 -> 41 us, loss 70 -> 62 us) and not at 12K.
  constexpr int64_t kSerialElements = 32768;
  const int64_t per_task = std::max<int64_t>(1, p.N / nch);
  const int64_t grain = std::max<int64_t>(1, (kSerialElements + per_task - 1) / per_task);
  // A chunk holds at most chunk_len elements: the task buffers are sized by it, not by kChunk (a small
  // input allocates a few hundred bytes, not 32-48 KB); only the zeros chunk read by absent inputs is filled.
  const int64_t chunk_len = std::min(kChunk, p.N);
  bool input_absent = false;
  for (int k = 0; k < F::NI; ++k) input_absent |= k != L.noise_input && !L.in[k].base;
  at::parallel_for(0, p.B * nch, grain, [&](int64_t begin, int64_t end) {
    // the gather offsets, then per input and output a chunk buffer (conversion, gather, scratch; each written
    // before it is read), then, when an input is absent, a chunk of zeros: in this thread's scratch
    const size_t nbuf = size_t((F::NI + F::NO + (input_absent ? 1 : 0)) * chunk_len);
    int64_t* const offs = thread_scratch(size_t(chunk_len) + (nbuf * sizeof(S) + 7) / 8);
    S* const bufs = reinterpret_cast<S*>(offs + chunk_len);
    auto chunk_buf = [&](int k) { return bufs + k * chunk_len; };
    const S* zeros = chunk_buf(F::NI + F::NO);
    if (input_absent) std::fill_n(chunk_buf(F::NI + F::NO), chunk_len, S(0));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nch, c = task % nch;
      const int64_t e0 = c * kChunk, n = std::min(kChunk, p.N - e0);
      const int64_t tb = L.t ? L.t[b] : L.fixed_t;
      const S* row = table ? table + tb * L.ncols : nullptr;
      const F f = F::make(row, options, b, tb);
      const S* in[F::NI];
      for (int k = 0; k < F::NI; ++k) {
        S* buf = chunk_buf(k);
        const Operand& o = L.in[k];
        if (k == L.noise_input) {
          philox_normals(p, seed, b, e0, n, buf, offs);
          in[k] = buf;
          continue;
        }
        if (!o.base) {
          in[k] = zeros;
          continue;
        }
        with_type<S>(o.dtype, [&](auto tag) {
          using T = decltype(tag);
          const T* src = reinterpret_cast<const T*>(o.base) + b * o.batch_stride;
          if (o.direct && std::is_same_v<T, S>) {
            in[k] = reinterpret_cast<const S*>(src) + e0;
          } else if (o.direct) {
            load_as(src + e0, nullptr, n, buf);
            in[k] = buf;
          } else {
            strided_offsets(p, o.stride.data(), e0, n, offs);
            load_as(src, offs, n, buf);
            in[k] = buf;
          }
        });
      }
      S* out[F::NO > 0 ? F::NO : 1];
      for (int k = 0; k < F::NO; ++k) {
        const Operand& o = L.out[k];
        if (o.base && o.direct && o.dtype == c10::CppTypeToScalarType<S>::value)
          out[k] = reinterpret_cast<S*>(o.base) + b * o.batch_stride + e0;
        else
          out[k] = chunk_buf(F::NI + k);
      }
      S red[F::NR > 0 ? F::NR : 1];
      run_chunk<S, F>(f, in, out, n, red);
      for (int k = 0; k < F::NO; ++k) {
        const Operand& o = L.out[k];
        if (!o.base || out[k] != chunk_buf(F::NI + k)) continue;
        with_type<S>(o.dtype, [&](auto tag) {
          using T = decltype(tag);
          T* dst = reinterpret_cast<T*>(o.base) + b * o.batch_stride;
          if (o.direct) {
            store_as(out[k], nullptr, n, dst + e0);
          } else {
            strided_offsets(p, o.stride.data(), e0, n, offs);
            store_as(out[k], offs, n, dst);
          }
        });
      }
      for (int k = 0; k < F::NR; ++k) partial[size_t((b * nch + c) * NR + k)] = red[k];
    }
  });
  if constexpr (F::NR > 0) {
    for (int64_t b = 0; b < p.B; ++b) {
      S sums[F::NR];
      for (int k = 0; k < F::NR; ++k) {
        double s = 0.0;  // chunk partials added in double: a sample may hold 2^31+ elements (1M chunks)
        for (int64_t c = 0; c < nch; ++c) s += double(partial[size_t((b * nch + c) * NR + k)]);
        sums[k] = S(s);
      }
      const int64_t tb = L.t ? L.t[b] : L.fixed_t;
      const S* row = table ? table + tb * L.ncols : nullptr;
      S outs[F::NF];
      F::finish(row, options, tb, sums, outs);
      for (int k = 0; k < F::NF; ++k)
        if (L.finals[k]) static_cast<S*>(L.finals[k])[b] = outs[k];  // an unwanted result is not made
    }
  }
}

}  // namespace

template <template <class> class Body> void launch_cpu(const Launch& L, const BodyOptions<Body>& options) {
  if (L.dbl) drive<double, Body<double>>(L, options.d);
  else drive<float, Body<float>>(L, options.f);
}

}  // namespace ddpm

// launch_cpu for every body of csrc/ops/
#define DDPM_BODY(Body) template void launch_cpu<Body>(const Launch&, const BodyOptions<Body>&);
#include "../ops/families.h"
