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
// dominated the fused loss; log and the Box-Muller cosine below are inlined for the same reason.
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

// log for the hot loops: x = m 2^e with m in [sqrt(1/2), sqrt(2)) by integer arithmetic on the bits
// (as musl's logf), then Cephes' logf polynomial in m - 1 (about 1 ulp), written with at::vec for every
// width. A vector with any lane that is not a positive normal finite float (0, subnormal, negative, inf,
// NaN) takes Sleef's log, which handles them all.
inline at::vec::Vectorized<float> inline_log(const at::vec::Vectorized<float>& x) {
  using VF = at::vec::Vectorized<float>;
  using VI = at::vec::Vectorized<int32_t>;
  if ((x >= VF(1.17549435e-38f) & x < VF(INFINITY)).zero_mask() != 0) return x.log();
  VI bits = at::vec::cast<int32_t>(x) + VI(0x3f800000 - 0x3f3504f3);
  VF e = at::vec::convert_to_fp_of_same_size<float>((bits >> VI(23)) - VI(0x7f));
  VF m = at::vec::cast<float>((bits & VI(0x007fffff)) + VI(0x3f3504f3)) - VF(1.f);
  VF z = m * m;
  VF y(7.0376836292e-2f);
  y = at::vec::fmadd(y, m, VF(-1.1514610310e-1f));
  y = at::vec::fmadd(y, m, VF(1.1676998740e-1f));
  y = at::vec::fmadd(y, m, VF(-1.2420140846e-1f));
  y = at::vec::fmadd(y, m, VF(1.4249322787e-1f));
  y = at::vec::fmadd(y, m, VF(-1.6668057665e-1f));
  y = at::vec::fmadd(y, m, VF(2.0000714765e-1f));
  y = at::vec::fmadd(y, m, VF(-2.4999993993e-1f));
  y = at::vec::fmadd(y, m, VF(3.3333331174e-1f));
  y = y * m * z;
  y = at::vec::fmadd(e, VF(-2.12194440e-4f), y);
  y = at::vec::fmadd(z, VF(-0.5f), y);
  return at::vec::fmadd(e, VF(0.693359375f), m + y);
}

// cos(2 pi u) for u in turns: u - round(u) is exact, and cos(2 pi y) = sin(2 pi w), w = 1/4 - |y| in
// [-1/4, 1/4], where an odd degree-9 polynomial (least squares on Chebyshev nodes) is within 2e-7 of
// sine in float32. Non-finite u gives NaN.
inline at::vec::Vectorized<float> inline_cos_turns(const at::vec::Vectorized<float>& u) {
  using VF = at::vec::Vectorized<float>;
  VF w = VF(0.25f) - (u - u.round()).abs();
  VF w2 = w * w;
  VF p(39.57223129f);
  p = at::vec::fmadd(p, w2, VF(-76.55503082f));
  p = at::vec::fmadd(p, w2, VF(81.60126495f));
  p = at::vec::fmadd(p, w2, VF(-41.34165955f));
  p = at::vec::fmadd(p, w2, VF(6.283185005f));
  return p * w;
}

template <class T> inline at::vec::Vectorized<T> vec_exp(const at::vec::Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) return inline_exp(x);
  return x.exp();
}

template <class T> inline at::vec::Vectorized<T> vec_log(const at::vec::Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) return inline_log(x);
  return x.log();
}

template <class T> inline at::vec::Vectorized<T> vec_cos_turns(const at::vec::Vectorized<T>& u) {
  if constexpr (std::is_same_v<T, float>) return inline_cos_turns(u);
  return (u * at::vec::Vectorized<T>(T(6.283185307179586))).cos();
}

template <class T> struct Prim<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  using Mask = V;
  static V exp(const V& x) { return vec_exp<T>(x); }
  static V log(const V& x) { return vec_log<T>(x); }
  static V sqrt(const V& x) { return x.sqrt(); }
  static V cos_turns(const V& u) { return vec_cos_turns<T>(u); }
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

// Philox-4x32-10 on whole registers: the SIMD twin of ddpm_math.h's philox_uniform2 (the compiler does
// not vectorise its 32 x 32 -> 64-bit products by itself). Each 64-bit lane holds one counter word in
// its low half, so one mul_epu32 gives a round's whole product: high half to the next c0 / c2, low half
// to the next c1 / c3. The upper halves carry garbage that mul_epu32 ignores and the final pack drops.
#if defined(CPU_CAPABILITY_AVX512) && !defined(_MSC_VER)
#define DDPM_PHILOX_SIMD 1
struct PhiloxLanes {
  using R = __m512i;
  static constexpr int W = 8;  // counters per register; two registers make one Vectorized<float>
  static R set1(uint64_t x) { return _mm512_set1_epi64(int64_t(x)); }
  static R iota_plus(uint64_t start) { return _mm512_add_epi64(set1(start), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0)); }
  static R mul(R a, R b) { return _mm512_mul_epu32(a, b); }
  static R hi(R a) { return _mm512_srli_epi64(a, 32); }
  static R xor3(R a, R b, R c) { return _mm512_ternarylogic_epi64(a, b, c, 0x96); }
  // the low halves of a's lanes then b's, as uniform [0, 1) floats (philox_to_uniform)
  static __m512 uniform(R a, R b) {
    __m512i x = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(a)), _mm512_cvtepi64_epi32(b), 1);
    x = _mm512_xor_si512(x, _mm512_srai_epi32(x, 31));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_set1_ps(4.6566127342e-10f));
  }
};
#elif defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
#define DDPM_PHILOX_SIMD 1
struct PhiloxLanes {
  using R = __m256i;
  static constexpr int W = 4;
  static R set1(uint64_t x) { return _mm256_set1_epi64x(int64_t(x)); }
  static R iota_plus(uint64_t start) { return _mm256_add_epi64(set1(start), _mm256_set_epi64x(3, 2, 1, 0)); }
  static R mul(R a, R b) { return _mm256_mul_epu32(a, b); }
  static R hi(R a) { return _mm256_srli_epi64(a, 32); }
  static R xor3(R a, R b, R c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static __m256 uniform(R a, R b) {
    // 32-bit words 0, 2 of each 128-bit half of a and b, then the 64-bit quarters reordered a0 a1 b0 b1
    __m256 lo = _mm256_shuffle_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), _MM_SHUFFLE(2, 0, 2, 0));
    __m256i x = _mm256_permute4x64_epi64(_mm256_castps_si256(lo), _MM_SHUFFLE(3, 1, 2, 0));
    x = _mm256_xor_si256(x, _mm256_srai_epi32(x, 31));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(4.6566127342e-10f));
  }
};
#endif

// z[i] = box_muller of philox_uniform2(seed, counter(i)) for i in i0 .. n - 1: scalar Philox, one vector
// of Box-Muller at a time (the draw for any counter order; the same values as philox_normal_rows)
template <class Counter> void philox_normals_scalar(uint64_t seed, int64_t i0, int64_t n, Counter counter, float* z) {
  using VF = at::vec::Vectorized<float>;
  alignas(64) float u1[VF::size()], u2[VF::size()];
  for (int64_t i = i0; i < n; i += VF::size()) {
    const int64_t m = std::min<int64_t>(VF::size(), n - i);
    for (int64_t j = 0; j < m; ++j) philox_uniform2(seed, counter(i + j), &u1[j], &u2[j]);
    box_muller(VF::loadu(u1, m), VF::loadu(u2, m)).store(z + i, m);
  }
}

// Philox N(0, 1) draws (box_muller of philox_uniform2) for counters start .. start + n - 1, as float
void philox_normal_rows(uint64_t seed, uint64_t start, int64_t n, float* z) {
  using VF = at::vec::Vectorized<float>;
  int64_t i = 0;
#ifdef DDPM_PHILOX_SIMD
  using P = PhiloxLanes;
  static_assert(2 * P::W == VF::size(), "two Philox registers per float vector");
  constexpr int G = 4;  // registers in flight per counter word: independent chains hide the multiply latency
  const P::R mA = P::set1(0xD2511F53u), mB = P::set1(0xCD9E8D57u);
  P::R K0[10], K1[10];
  {
    uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    for (int r = 0; r < 10; ++r, k0 += kPhiloxW0, k1 += kPhiloxW1) K0[r] = P::set1(k0), K1[r] = P::set1(k1);
  }
  for (; i + G * P::W <= n; i += G * P::W) {
    P::R c0[G], c1[G], c2[G], c3[G];
    for (int g = 0; g < G; ++g) {
      c0[g] = P::iota_plus(start + uint64_t(i + g * P::W));  // low half: counter bits 0-31
      c1[g] = P::hi(c0[g]);                                    // counter bits 32-63
      c2[g] = c3[g] = P::set1(0);
    }
    // unrolled: no register copies between rounds, the last round's unused c2 / c3 dropped (15% faster on AVX2)
#pragma GCC unroll 10
    for (int r = 0; r < 10; ++r) {
      for (int g = 0; g < G; ++g) {
        P::R p0 = P::mul(mA, c0[g]), p2 = P::mul(mB, c2[g]);
        c0[g] = P::xor3(P::hi(p2), c1[g], K0[r]);
        c2[g] = P::xor3(P::hi(p0), c3[g], K1[r]);
        c1[g] = p2, c3[g] = p0;
      }
    }
    for (int g = 0; g < G; g += 2)
      box_muller(VF(P::uniform(c0[g], c0[g + 1])), VF(P::uniform(c1[g], c1[g + 1]))).store(z + i + g * P::W);
  }
#endif
  philox_normals_scalar(seed, i, n, [&](int64_t j) { return start + uint64_t(j); }, z);
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

// Run body f on n elements: in[k] / out[k] are contiguous compute-dtype arrays of n elements (an absent
// input points at zeros, an absent output at scratch), so the loop loads and stores without tests.
// Inlined into run_chunk, where f may be a copy with constant options (F::specialized).
template <class S, class F>
inline __attribute__((always_inline)) void run_loop(const F f, const S* const* in, S* const* out, int64_t n, S* red) {
  using Vec = at::vec::Vectorized<S>;
  constexpr int NI = F::NI, NO = F::NO > 0 ? F::NO : 1, NR = F::NR > 0 ? F::NR : 1;
  Vec vin[NI], vout[NO], vr[NR], acc[NR];
  for (int k = 0; k < NR; ++k) acc[k] = Vec(S(0));
  for (int k = 0; k < NO; ++k) vout[k] = Vec(S(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    for (int k = 0; k < NI; ++k) vin[k] = Vec::loadu(in[k] + i);
    f.template operator()<Vec>(vin, vout, vr);
    for (int k = 0; k < F::NO; ++k) vout[k].store(out[k] + i);
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

template <class S, class F> void drive(const Launch& L, const Params<S>& prm) {
  const Plan& p = L.plan;
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
  at::parallel_for(0, p.B * nch, grain, [&](int64_t begin, int64_t end) {
    // per input and output a chunk buffer (conversion, gather, scratch), then a chunk of zeros (absent inputs)
    std::vector<S> bufs(size_t((F::NI + F::NO + 1) * kChunk), S(0));
    const S* zeros = bufs.data() + (F::NI + F::NO) * kChunk;
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
            strided_offsets(p, o.stride.data(), e0, n, offs.data());
            load_as(src, offs.data(), n, buf);
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
  with_body<S>(L.body, [&]<class F>() { drive<S, F>(L, prm); });
}

}  // namespace

void launch_cpu(const Launch& L) {
  if (L.dbl) dispatch<double>(L, L.pd);
  else dispatch<float>(L, L.pf);
}

}  // namespace ddpm
