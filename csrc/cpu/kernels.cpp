// cpu/kernels.cpp -- the CPU driver: runs a ddpm_elem.h body over [B, ...] tensors.
//
// Work is split into fixed chunks of kChunk elements of one sample (independent of the thread
// count) and run with at::parallel_for. A chunk reads each input either in place (direct layout in
// the compute dtype) or through a small buffer (fp16/bf16 conversion, strided gather), runs the body
// with at::vec::Vectorized (SIMD exp/log, no -ffast-math) and writes outputs likewise. Per-sample
// reductions: per-lane partial sums within a chunk, lanes then chunks added in a fixed order, so a
// sample's result is deterministic and independent of the rest of the batch.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../ddpm_math.h"

namespace ddpm {

// exp for the hot loops: inlined Cody-Waite range reduction + Cephes' degree-7 polynomial (about
// 1 ulp over the normal range; 0 below ln(2^-126) - 18, inf above ln(FLT_MAX); NaN propagates).
// Sleef's exp is an out-of-line call that dominated the fused loss; other functions stay Sleef's.
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
inline at::vec::Vectorized<float> inline_exp(const at::vec::Vectorized<float>& xv) {
  __m256 x = xv;
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  n = _mm256_min_ps(_mm256_max_ps(n, _mm256_set1_ps(-150.f)), _mm256_set1_ps(128.f));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  // 2^n as 2^(n1) 2^(n - n1), n1 = n / 2 truncated, so both factors stay normal floats
  __m256i ni = _mm256_cvtps_epi32(n);
  __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-104.f), _CMP_LT_OQ));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, _mm256_set1_ps(88.72283935546875f), _CMP_GT_OQ));
  return y;  // NaN input: r and p are NaN, so y is NaN (both comparisons are false)
}
#endif

template <class T> inline at::vec::Vectorized<T> vec_exp(const at::vec::Vectorized<T>& x) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  if constexpr (std::is_same_v<T, float>) return inline_exp(x);
#endif
  return x.exp();
}

template <class T> struct Prim<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  using Mask = V;
  static V exp(const V& x) { return vec_exp<T>(x); }
  static V log(const V& x) { return x.log(); }
  static V sqrt(const V& x) { return x.sqrt(); }
  static V cos(const V& x) { return x.cos(); }
  static Mask lt(const V& a, const V& b) { return a < b; }
  static Mask gt(const V& a, const V& b) { return a > b; }
  static Mask ge(const V& a, const V& b) { return a >= b; }
  static Mask le(const V& a, const V& b) { return a <= b; }
  static Mask land(const Mask& a, const Mask& b) { return a & b; }
  static V select(const Mask& m, const V& a, const V& b) { return V::blendv(b, a, m); }
  static V min(const V& a, const V& b) { return at::vec::minimum(a, b); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
};

}  // namespace ddpm

#include "../launch.h"

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

// philox_uniform2 for the consecutive counters start .. start + n - 1 (8 lanes at a time on AVX2)
void philox_uniform2_rows(uint64_t seed, uint64_t start, int64_t n, float* u1, float* u2) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  const __m256i A = _mm256_set1_epi32(int(0xD2511F53u)), Bm = _mm256_set1_epi32(int(0xCD9E8D57u));
  auto mulhi = [](__m256i a, __m256i b) {  // high 32 bits of the 8 unsigned 32 x 32 products
    __m256i even = _mm256_srli_epi64(_mm256_mul_epu32(a, b), 32);
    __m256i oddp = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), _mm256_srli_epi64(b, 32));
    return _mm256_blend_epi32(even, oddp, 0xAA);
  };
  const float scale = 4.6566127342e-10f;
  for (; i + 8 <= n; i += 8) {
    alignas(32) uint32_t lo[8], hi[8];
    for (int j = 0; j < 8; ++j) {
      uint64_t c = start + uint64_t(i + j);
      lo[j] = uint32_t(c);
      hi[j] = uint32_t(c >> 32);
    }
    __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
    __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      __m256i K0 = _mm256_set1_epi32(int(k0)), K1 = _mm256_set1_epi32(int(k1));
      __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(mulhi(Bm, c2), c1), K0);
      __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(mulhi(A, c0), c3), K1);
      c1 = _mm256_mullo_epi32(Bm, c2);
      c3 = _mm256_mullo_epi32(A, c0);
      c0 = n0;
      c2 = n2;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    // int32 x -> (x < 0 ? ~x : x) * 2^-31
    c0 = _mm256_xor_si256(c0, _mm256_srai_epi32(c0, 31));
    c1 = _mm256_xor_si256(c1, _mm256_srai_epi32(c1, 31));
    _mm256_storeu_ps(u1 + i, _mm256_mul_ps(_mm256_cvtepi32_ps(c0), _mm256_set1_ps(scale)));
    _mm256_storeu_ps(u2 + i, _mm256_mul_ps(_mm256_cvtepi32_ps(c1), _mm256_set1_ps(scale)));
  }
#endif
  for (; i < n; ++i) philox_uniform2(seed, start + uint64_t(i), &u1[i], &u2[i]);
}

// Philox normals for iteration indices e0 .. e0 + n - 1 of sample b (offset b * N + row-major index)
template <class S> void philox_normals(const Plan& p, uint64_t seed, int64_t b, int64_t e0, int64_t n, S* dst,
                                       int64_t* offs) {
  using VF = at::vec::Vectorized<float>;
  alignas(64) float u1[kChunk], u2[kChunk], z[kChunk];
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
    for (int64_t i = 0; i < n; ++i) philox_uniform2(seed, uint64_t(base + offs[i]), &u1[i], &u2[i]);
  } else {
    philox_uniform2_rows(seed, uint64_t(base + e0), n, u1, u2);
  }
  int64_t i = 0;
  for (; i + VF::size() <= n; i += VF::size())
    box_muller(VF::loadu(u1 + i), VF::loadu(u2 + i)).store(z + i);
  for (; i < n; ++i) z[i] = box_muller(u1[i], u2[i]);
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<S>(z[j]);
}

// Run body f on n elements: in[k] / out[k] are contiguous compute-dtype arrays (nullptr: absent).
template <class S, class F> void run_chunk(const F& f, const S* const* in, S* const* out, int64_t n, S* red) {
  using Vec = at::vec::Vectorized<S>;
  constexpr int NI = F::NI, NO = F::NO > 0 ? F::NO : 1, NR = F::NR > 0 ? F::NR : 1;
  Vec vin[NI], vout[NO], vr[NR], acc[NR];
  for (int k = 0; k < NR; ++k) acc[k] = Vec(S(0));
  for (int k = 0; k < NI; ++k) vin[k] = Vec(S(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    for (int k = 0; k < NI; ++k)
      if (in[k]) vin[k] = Vec::loadu(in[k] + i);
    f.template operator()<Vec>(vin, vout, vr);
    for (int k = 0; k < F::NO; ++k)
      if (out[k]) vout[k].store(out[k] + i);
    for (int k = 0; k < F::NR; ++k) acc[k] = acc[k] + vr[k];
  }
  if (i < n) {
    const int64_t c = n - i;
    for (int k = 0; k < NI; ++k)
      if (in[k]) vin[k] = Vec::loadu(in[k] + i, c);
    f.template operator()<Vec>(vin, vout, vr);
    for (int k = 0; k < F::NO; ++k)
      if (out[k]) vout[k].store(out[k] + i, c);
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

template <class S, class F> void drive(const Launch& L, const Params<S>& prm) {
  const Plan& p = L.plan;
  const int64_t nch = (p.N + kChunk - 1) / kChunk;
  const int NR = F::NR;
  std::vector<S> partial(NR > 0 ? size_t(p.B * nch * NR) : 0);
  const S* table = static_cast<const S*>(L.table);
  at::parallel_for(0, p.B * nch, 1, [&](int64_t begin, int64_t end) {
    std::vector<S> bufs(size_t((F::NI + F::NO) * kChunk));
    std::vector<int64_t> offs(kChunk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nch, c = task % nch;
      const int64_t e0 = c * kChunk, n = std::min(kChunk, p.N - e0);
      const int64_t tb = L.t ? L.t[b] : L.fixed_t;
      const S* row = table ? table + tb * L.ncols : nullptr;
      const F f = F::make(row, prm, b, tb);
      const S* in[F::NI];
      for (int k = 0; k < F::NI; ++k) {
        S* buf = bufs.data() + k * kChunk;
        const Operand& o = L.in[k];
        if (k == L.noise_input) {
          philox_normals(p, L.seed, b, e0, n, buf, offs.data());
          in[k] = buf;
          continue;
        }
        if (!o.base) {
          in[k] = nullptr;
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
            strided_offsets(p, o.stride.data(), e0, n, offs.data());
            load_as(src, offs.data(), n, buf);
            in[k] = buf;
          }
        });
      }
      S* out[F::NO > 0 ? F::NO : 1];
      for (int k = 0; k < F::NO; ++k) {
        const Operand& o = L.out[k];
        out[k] = nullptr;
        if (!o.base) continue;
        if (o.direct && o.dtype == c10::CppTypeToScalarType<S>::value)
          out[k] = reinterpret_cast<S*>(o.base) + b * o.batch_stride + e0;
        else
          out[k] = bufs.data() + (F::NI + k) * kChunk;
      }
      S red[F::NR > 0 ? F::NR : 1];
      run_chunk<S, F>(f, in, out, n, red);
      for (int k = 0; k < F::NO; ++k) {
        const Operand& o = L.out[k];
        if (!o.base || out[k] != bufs.data() + (F::NI + k) * kChunk) continue;
        with_type<S>(o.dtype, [&](auto tag) {
          using T = decltype(tag);
          T* dst = reinterpret_cast<T*>(o.base) + b * o.batch_stride;
          if (o.direct) {
            store_as(out[k], nullptr, n, dst + e0);
          } else {
            strided_offsets(p, o.stride.data(), e0, n, offs.data());
            store_as(out[k], offs.data(), n, dst);
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
        S s = S(0);
        for (int64_t c = 0; c < nch; ++c) s += partial[size_t((b * nch + c) * NR + k)];
        sums[k] = s;
      }
      const int64_t tb = L.t ? L.t[b] : L.fixed_t;
      const S* row = table ? table + tb * L.ncols : nullptr;
      S outs[F::NF];
      F::finish(row, prm, tb, sums, outs);
      for (int k = 0; k < F::NF; ++k) static_cast<S*>(L.finals[k])[b] = outs[k];
    }
  }
}

template <class S> void dispatch(const Launch& L, const Params<S>& prm) {
  switch (L.body) {
    case Body::QSample: return drive<S, QSampleElem<S>>(L, prm);
    case Body::LinearBackward: return drive<S, LinearBackwardElem<S>>(L, prm);
    case Body::Posterior: return drive<S, PosteriorElem<S>>(L, prm);
    case Body::Predict: return drive<S, PredictElem<S>>(L, prm);
    case Body::PMeanVar: return drive<S, PMeanVarElem<S>>(L, prm);
    case Body::PSample: return drive<S, PSampleElem<S>>(L, prm);
    case Body::Ddim: return drive<S, DdimElem<S>>(L, prm);
    case Body::Vb: return drive<S, VbElem<S>>(L, prm);
    case Body::Train: return drive<S, TrainElem<S>>(L, prm);
    case Body::Scale: return drive<S, ScaleElem<S>>(L, prm);
    case Body::Prior: return drive<S, PriorElem<S>>(L, prm);
    case Body::PriorBackward: return drive<S, PriorBackwardElem<S>>(L, prm);
    case Body::NormalKl: return drive<S, NormalKlElem<S>>(L, prm);
    case Body::NormalKlBackward: return drive<S, NormalKlBackwardElem<S>>(L, prm);
    case Body::Dgll: return drive<S, DgllElem<S>>(L, prm);
    case Body::DgllBackward: return drive<S, DgllBackwardElem<S>>(L, prm);
  }
}

}  // namespace

void launch_cpu(const Launch& L) {
  if (L.dbl) dispatch<double>(L, L.pd);
  else dispatch<float>(L, L.pf);
}

}  // namespace ddpm
