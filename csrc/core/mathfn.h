// Elementwise math that the compiler can vectorize. glibc's expf is a scalar call (its SIMD
// variants are only declared under -ffast-math, which dsv3 never uses), so the hot loops use
// this Cephes-style expf: |relative error| < 2 ulp on the normal range, subnormal results,
// +inf above 88.72, NaN propagated.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

namespace dsv3 {

inline float pow2i(int32_t n) {  // 2^n for n in [-126, 127]
  const int32_t bits = (n + 127) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float exp_f32(float x) {
  const bool nan = x != x;
  float xc = nan ? 0.f : x;
  xc = xc < -104.f ? -104.f : (xc > 89.f ? 89.f : xc);
  // fn = floor(t) without a libm call or a float->int conversion (|t| < 160, exact): adding
  // 1.5 * 2^23 rounds t to an integer held in the low mantissa bits; one step down if that
  // rounded up. Branch-free, so loops calling exp_f32 vectorize in every SIMD clone.
  const float t = xc * 1.44269504088896341f + 0.5f;
  float shifted = t + 12582912.f;
  float fn = shifted - 12582912.f;
  const bool up = fn > t;
  fn = up ? fn - 1.f : fn;
  shifted = up ? shifted - 1.f : shifted;
  int32_t ti;
  std::memcpy(&ti, &shifted, sizeof ti);
  ti -= 0x4B400000;  // the bits of 1.5 * 2^23
  const float r = (xc - fn * 0.693359375f) - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const int32_t n = ti, n1 = n / 2, n2 = n - n1;  // two steps reach subnormals
  float y = p * pow2i(n1) * pow2i(n2);
  y = x > 88.72283905206835f ? std::numeric_limits<float>::infinity() : y;
  return nan ? x : y;
}

inline float sigmoid_f32(float x) { return 1.f / (1.f + exp_f32(-x)); }

}  // namespace dsv3
