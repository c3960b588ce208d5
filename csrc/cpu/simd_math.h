// cpu/simd_math.h -- SIMD elementary functions for the CPU kernels: inlined exp, log and cos(2 pi u) on
// at::vec::Vectorized<float> (Sleef's for double), and Prim<Vectorized<T>>, through which ddpm_math.h's
// formulas run on whole registers. Self-contained: include it (or cpu/driver.h) before instantiating a body
// on Vectorized values.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

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

// sin(2 pi w) for w in [-1/4, 1/4] turns: an odd degree-9 polynomial (least squares on Chebyshev nodes),
// within 2e-7 of sine in float32
inline at::vec::Vectorized<float> sin_quarter_turns(const at::vec::Vectorized<float>& w) {
  using VF = at::vec::Vectorized<float>;
  VF w2 = w * w;
  VF p(39.57223129f);
  p = at::vec::fmadd(p, w2, VF(-76.55503082f));
  p = at::vec::fmadd(p, w2, VF(81.60126495f));
  p = at::vec::fmadd(p, w2, VF(-41.34165955f));
  p = at::vec::fmadd(p, w2, VF(6.283185005f));
  return p * w;
}

// cos(2 pi u) for u in turns: y = u - round(u) is exact, and cos(2 pi y) = sin(2 pi w), w = 1/4 - |y|
// (exact too). Non-finite u gives NaN.
inline at::vec::Vectorized<float> inline_cos_turns(const at::vec::Vectorized<float>& u) {
  using VF = at::vec::Vectorized<float>;
  return sin_quarter_turns(VF(0.25f) - (u - u.round()).abs());
}

// sin(2 pi u) for u in turns: with y = u - round(u) and a = |y| (exact), sin(2 pi u) = sign(y) sin(2 pi w),
// w = min(a, 1/2 - a) (exact, in [0, 1/4]). Non-finite u gives NaN.
inline at::vec::Vectorized<float> inline_sin_turns(const at::vec::Vectorized<float>& u) {
  using VF = at::vec::Vectorized<float>;
  const VF y = u - u.round(), a = y.abs();
  const VF s = sin_quarter_turns(at::vec::minimum(a, VF(0.5f) - a));
  return VF::blendv(s, -s, y < VF(0.0f));
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

template <class T> inline at::vec::Vectorized<T> vec_sin_turns(const at::vec::Vectorized<T>& u) {
  if constexpr (std::is_same_v<T, float>) return inline_sin_turns(u);
  return (u * at::vec::Vectorized<T>(T(6.283185307179586))).sin();
}

template <class T> struct Prim<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  using Mask = V;
  static V exp(const V& x) { return vec_exp<T>(x); }
  static V log(const V& x) { return vec_log<T>(x); }
  static V sqrt(const V& x) { return x.sqrt(); }
  static V cos_turns(const V& u) { return vec_cos_turns<T>(u); }
  static V sin_turns(const V& u) { return vec_sin_turns<T>(u); }
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
