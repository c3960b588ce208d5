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
// 1 ulp over the normal range; 0 below -104, inf above ln(FLT_MAX); NaN propagates), written once
// with at::vec for every vector width (AVX2, AVX-512). Sleef's exp is an out-of-line call that
// dominated the fused loss; other functions stay Sleef's.
inline at::vec::Vectorized<float> inline_exp(const at::vec::Vectorized<float>& x) {
  using VF = at::vec::Vectorized<float>;
  using VI = at::vec::Vectorized<int32_t>;
  VF n = at::vec::clamp((x * VF(1.44269504088896341f)).round(), VF(-150.f), VF(128.f));
  VF r = at::vec::fnmadd(n, VF(0.693359375f), x);
  r = at::vec::fnmadd(n, VF(-2.12194440e-4f), r);
  VF p(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, VF(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, VF(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, VF(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, VF(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, VF(5.0000001201e-1f));
  p = at::vec::fmadd(p, r * r, r + VF(1.f));
  // 2^n as 2^n1 2^(n - n1), n1 = n / 2 truncated, so both factors stay normal floats
  VF n1 = (n * VF(0.5f)).trunc();
  auto pow2 = [](const VF& k) {
    return at::vec::cast<float>((at::vec::convert_to_int_of_same_size(k) + VI(127)) << VI(23));
  };
  VF y = p * pow2(n1) * pow2(n - n1);
  y = VF::blendv(y, VF(0.f), x < VF(-104.f));
  y = VF::blendv(y, VF(INFINITY), x > VF(88.72283935546875f));
  return y;  // NaN input: r and p are NaN, so y is NaN (both comparisons are false)
}

template <class T> inline at::vec::Vectorized<T> vec_exp(const at::vec::Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) return inline_exp(x);
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

// Philox rounds on W counters at once: the SIMD twin of ddpm_math.h's philox_round (the compiler does
// not vectorise its 32 x 32 -> 64-bit high products by itself). mulhi: high halves of the unsigned
// products, even lanes from one mul_epu32, odd lanes from another on the shifted operands.
#if defined(CPU_CAPABILITY_AVX512) && !defined(_MSC_VER)
#define DDPM_PHILOX_SIMD 1
struct PhiloxSimd {
  using R = __m512i;
  static constexpr int W = 16;
  static R set1(uint32_t x) { return _mm512_set1_epi32(int(x)); }
  static R load(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static void store(uint32_t* p, R x) { _mm512_storeu_si512(p, x); }
  static R mulhi(R a, R b) {
    R even = _mm512_srli_epi64(_mm512_mul_epu32(a, b), 32);
    R odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), _mm512_srli_epi64(b, 32));
    return _mm512_mask_blend_epi32(0xAAAA, even, odd);
  }
  static R mullo(R a, R b) { return _mm512_mullo_epi32(a, b); }
  static R xor3(R a, R b, R c) { return _mm512_xor_si512(_mm512_xor_si512(a, b), c); }
};
#elif defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
#define DDPM_PHILOX_SIMD 1
struct PhiloxSimd {
  using R = __m256i;
  static constexpr int W = 8;
  static R set1(uint32_t x) { return _mm256_set1_epi32(int(x)); }
  static R load(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const R*>(p)); }
  static void store(uint32_t* p, R x) { _mm256_storeu_si256(reinterpret_cast<R*>(p), x); }
  static R mulhi(R a, R b) {
    R even = _mm256_srli_epi64(_mm256_mul_epu32(a, b), 32);
    R odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), _mm256_srli_epi64(b, 32));
    return _mm256_blend_epi32(even, odd, 0xAA);
  }
  static R mullo(R a, R b) { return _mm256_mullo_epi32(a, b); }
  static R xor3(R a, R b, R c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
};
#endif

// philox_uniform2 for the consecutive counters start .. start + n - 1 (W at a time where SIMD is built)
void philox_uniform2_rows(uint64_t seed, uint64_t start, int64_t n, float* u1, float* u2) {
  int64_t i = 0;
#ifdef DDPM_PHILOX_SIMD
  using P = PhiloxSimd;
  const P::R mA = P::set1(0xD2511F53u), mB = P::set1(0xCD9E8D57u), zero = P::set1(0);
  for (; i + P::W <= n; i += P::W) {
    uint32_t lo[P::W], hi[P::W];
    for (int j = 0; j < P::W; ++j) {
      uint64_t c = start + uint64_t(i + j);
      lo[j] = uint32_t(c), hi[j] = uint32_t(c >> 32);
    }
    P::R c0 = P::load(lo), c1 = P::load(hi), c2 = zero, c3 = zero;
    uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    for (int r = 0; r < 10; ++r) {  // philox_round
      P::R n0 = P::xor3(P::mulhi(mB, c2), c1, P::set1(k0));
      P::R n2 = P::xor3(P::mulhi(mA, c0), c3, P::set1(k1));
      c1 = P::mullo(mB, c2);
      c3 = P::mullo(mA, c0);
      c0 = n0, c2 = n2;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    P::store(lo, c0), P::store(hi, c1);
    for (int j = 0; j < P::W; ++j) u1[i + j] = philox_to_uniform(lo[j]), u2[i + j] = philox_to_uniform(hi[j]);
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
        double s = 0.0;  // chunk partials added in double: a sample may hold 2^31+ elements (1M chunks)
        for (int64_t c = 0; c < nch; ++c) s += double(partial[size_t((b * nch + c) * NR + k)]);
        sums[k] = S(s);
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
