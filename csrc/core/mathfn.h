// Elementwise math that the compiler can vectorize. glibc's expf is a scalar call (its SIMD
// variants are only declared under -ffast-math, which dsv3 never uses), so the hot loops use
// this Cephes-style expf with explicit FMAs: error < 1.5 ulp (1.01 measured) on the normal range,
// subnormal results, 0 below -103.97, +inf above 88.72, NaN propagated
// (tests/test_mathfn.py checks it against float64 over the whole range).
#pragma once
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>

namespace dsv3 {

inline float pow2i(int32_t n) {  // 2^n for n in [-126, 127]
  const int32_t bits = (n + 127) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// a * b + c with one rounding. In the x86-64-v3 and AVX-512 clones (core/simd.h) this is one
// vfmadd; in the baseline x86-64 clone, a libm call (correct, slow: only pre-2013 CPUs run it).
// The result is the same in every clone, so contraction stays off elsewhere.
inline float fma_f32(float a, float b, float c) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_fmaf(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

inline float exp_f32(float x) {
  const bool nan = x != x;
  float xc = nan ? 0.f : x;
  xc = xc < -104.f ? -104.f : (xc > 89.f ? 89.f : xc);
  // n = round(x / ln2) (ties to even) without a float->int conversion: adding 1.5 * 2^23
  // leaves the rounded integer in the low mantissa bits (|x / ln2| < 151, exact).
  const float shifted = fma_f32(xc, 1.44269504088896341f, 12582912.f);
  const float fn = shifted - 12582912.f;
  int32_t n;
  std::memcpy(&n, &shifted, sizeof n);
  n -= 0x4B400000;  // the bits of 1.5 * 2^23
  // r = x - n ln2 with ln2 split in two (Cody-Waite; n * hi is exact): |r| <= ln2/2 + 1e-7.
  float r = fma_f32(fn, -0.693145751953125f, xc);
  r = fma_f32(fn, -1.428606765330187045e-6f, r);
  // exp(r) = 1 + r + r^2 P(r), P the Cephes expf minimax polynomial (|rel err| < 2 ulp).
  float p = 1.9875691500e-4f;
  p = fma_f32(p, r, 1.3981999507e-3f);
  p = fma_f32(p, r, 8.3334519073e-3f);
  p = fma_f32(p, r, 4.1665795894e-2f);
  p = fma_f32(p, r, 1.6666665459e-1f);
  p = fma_f32(p, r, 5.0000001201e-1f);
  p = fma_f32(p, r * r, r) + 1.f;
  // p * 2^n in two steps (n in [-150, 128]) so subnormal results round once, correctly.
  const int32_t n1 = n >> 1, n2 = n - n1;
  float y = p * pow2i(n1) * pow2i(n2);
  y = x > 88.72283905206835f ? std::numeric_limits<float>::infinity() : y;
  return nan ? x : y;
}

inline float sigmoid_f32(float x) { return 1.f / (1.f + exp_f32(-x)); }

// sum_i a[i] b[i] with partial sums in 16 lanes (lane l takes i = l, l + 16, ...; then the lanes
// in order, then the tail): a fixed order, so it vectorizes without reassociation flags and
// rounds the same in every SIMD clone. Inline it into a DSV3_SIMD_CLONES function.
inline float dot_lanes(const float* a, const float* b, int64_t n) {
  constexpr int L = 16;
  float acc[L] = {0};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int l = 0; l < L; ++l) acc[l] += a[i + l] * b[i + l];
  float sum = 0.f;
  for (int l = 0; l < L; ++l) sum += acc[l];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

}  // namespace dsv3
