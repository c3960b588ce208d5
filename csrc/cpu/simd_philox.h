// cpu/simd_philox.h -- the CPU kernels' in-kernel noise: Philox-4x32-10 blocks run on whole SIMD registers
// (AVX-512 / AVX2), then Box-Muller on both word pairs of each block, giving the N(0, 1) draws of
// ddpm_math.h's philox_normal (the stream of triton.language.randn4x). Self-contained.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

#include "../ddpm_math.h"
#include "simd_math.h"

namespace ddpm {

// Philox-4x32-10 on whole registers: the SIMD twin of ddpm_math.h's philox_block (the compiler does
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
  // out[4k + j] = n_j[k] (k < 16) for the four float registers n_0 .. n_3: their 4 x 16 transpose
  static void store_interleaved4(const __m512 n[4], float* out) {
    // within each 128-bit quarter L: q_j = (n_0, n_1, n_2, n_3)[4L + j]
    const __m512 t0 = _mm512_unpacklo_ps(n[0], n[1]), t1 = _mm512_unpackhi_ps(n[0], n[1]);
    const __m512 t2 = _mm512_unpacklo_ps(n[2], n[3]), t3 = _mm512_unpackhi_ps(n[2], n[3]);
    const __m512 q0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
    const __m512 q1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
    const __m512 q2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
    const __m512 q3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
    // then the 4 x 4 transpose of the quarters
    const __m512 a = _mm512_shuffle_f32x4(q0, q1, 0x44), b = _mm512_shuffle_f32x4(q0, q1, 0xEE);
    const __m512 c = _mm512_shuffle_f32x4(q2, q3, 0x44), d = _mm512_shuffle_f32x4(q2, q3, 0xEE);
    _mm512_storeu_ps(out, _mm512_shuffle_f32x4(a, c, 0x88));
    _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(a, c, 0xDD));
    _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(b, d, 0x88));
    _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(b, d, 0xDD));
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
  // out[4k + j] = n_j[k] (k < 8) for the four float registers n_0 .. n_3: their 4 x 8 transpose
  static void store_interleaved4(const __m256 n[4], float* out) {
    // within each 128-bit half H: q_j = (n_0, n_1, n_2, n_3)[4H + j]
    const __m256 t0 = _mm256_unpacklo_ps(n[0], n[1]), t1 = _mm256_unpackhi_ps(n[0], n[1]);
    const __m256 t2 = _mm256_unpacklo_ps(n[2], n[3]), t3 = _mm256_unpackhi_ps(n[2], n[3]);
    const __m256 q0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
    const __m256 q1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
    const __m256 q2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
    const __m256 q3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
    _mm256_storeu_ps(out, _mm256_permute2f128_ps(q0, q1, 0x20));
    _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(q2, q3, 0x20));
    _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(q0, q1, 0x31));
    _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(q2, q3, 0x31));
  }
};
#endif

// Box-Muller on whole vectors: r cos or r sin (where sine > 0) of 2 pi u_turns, r = box_muller_radius(u_radius)
inline at::vec::Vectorized<float> box_muller_lanes(const at::vec::Vectorized<float>& u_radius,
                                                   const at::vec::Vectorized<float>& u_turns,
                                                   const at::vec::Vectorized<float>& sine) {
  using VF = at::vec::Vectorized<float>;
  return box_muller_radius(u_radius) *
         VF::blendv(vec_cos_turns(u_turns), vec_sin_turns(u_turns), sine > VF(0.0f));
}

// z[i] = philox_normal(seed, counter(i)) for i in i0 .. n - 1: a scalar Philox block per draw, one vector of
// Box-Muller at a time (the draw for any counter order; the same values as philox_normal_rows)
template <class Counter> inline void philox_normals_scalar(uint64_t seed, int64_t i0, int64_t n, Counter counter, float* z) {
  using VF = at::vec::Vectorized<float>;
  alignas(64) float u_radius[VF::size()], u_turns[VF::size()], sine[VF::size()];
  for (int64_t i = i0; i < n; i += VF::size()) {
    const int64_t m = std::min<int64_t>(VF::size(), n - i);
    for (int64_t j = 0; j < m; ++j)
      sine[j] = philox_pair_uniforms(seed, counter(i + j), &u_radius[j], &u_turns[j]) ? 1.0f : 0.0f;
    box_muller_lanes(VF::loadu(u_radius, m), VF::loadu(u_turns, m), VF::loadu(sine, m)).store(z + i, m);
  }
}

// philox_normal(seed, counter) for counters start .. start + n - 1, as float: whole blocks on SIMD registers,
// their four draws each, the unaligned head and the tail through philox_normals_scalar
inline void philox_normal_rows(uint64_t seed, uint64_t start, int64_t n, float* z) {
  using VF = at::vec::Vectorized<float>;
  const auto row_counter = [&](int64_t j) { return start + uint64_t(j); };
  int64_t i = 0;
#ifdef DDPM_PHILOX_SIMD
  using P = PhiloxLanes;
  static_assert(2 * P::W == VF::size(), "two Philox registers per float vector");
  constexpr int G = 4;  // registers in flight per counter word: independent chains hide the multiply latency
  constexpr int64_t kDraws = 4 * G * P::W;  // draws per iteration: four per block
  i = std::min<int64_t>(n, int64_t((4 - start % 4) % 4));  // the head, up to the first whole block
  philox_normals_scalar(seed, 0, i, row_counter, z);
  const P::R mA = P::set1(0xD2511F53u), mB = P::set1(0xCD9E8D57u);
  P::R K0[10], K1[10];
  {
    uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    for (int r = 0; r < 10; ++r, k0 += kPhiloxW0, k1 += kPhiloxW1) K0[r] = P::set1(k0), K1[r] = P::set1(k1);
  }
  for (; i + kDraws <= n; i += kDraws) {
    const uint64_t block = (start + uint64_t(i)) / 4;
    P::R c0[G], c1[G], c2[G], c3[G];
    for (int g = 0; g < G; ++g) {
      c0[g] = P::iota_plus(block + uint64_t(g * P::W));  // low half: block bits 0-31
      c1[g] = P::hi(c0[g]);                                // block bits 32-63
      c2[g] = c3[g] = P::set1(0);
    }
#pragma GCC unroll 10
    for (int r = 0; r < 10; ++r) {
      for (int g = 0; g < G; ++g) {
        P::R p0 = P::mul(mA, c0[g]), p2 = P::mul(mB, c2[g]);
        c0[g] = P::xor3(P::hi(p2), c1[g], K0[r]);
        c2[g] = P::xor3(P::hi(p0), c3[g], K1[r]);
        c1[g] = p2, c3[g] = p0;
      }
    }
    for (int g = 0; g < G; g += 2) {  // blocks g * W .. (g + 2) * W - 1: one float vector per word
      const VF radius01 = box_muller_radius(VF(P::uniform(c0[g], c0[g + 1])));
      const VF radius23 = box_muller_radius(VF(P::uniform(c2[g], c2[g + 1])));
      const VF turns01(P::uniform(c1[g], c1[g + 1])), turns23(P::uniform(c3[g], c3[g + 1]));
      const decltype(P::uniform(c0[g], c0[g])) draws[4] = {
          radius01 * vec_cos_turns(turns01), radius01 * vec_sin_turns(turns01),
          radius23 * vec_cos_turns(turns23), radius23 * vec_sin_turns(turns23)};
      P::store_interleaved4(draws, z + i + 4 * g * P::W);
    }
  }
#endif
  philox_normals_scalar(seed, i, n, row_counter, z);
}

}  // namespace ddpm
