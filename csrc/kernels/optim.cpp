#include "kernels/optim.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/bf16.h"
#include "core/check.h"
#include "core/parallel.h"
#include "core/simd.h"

namespace dsv3 {

namespace {

constexpr int64_t kGrain = 1 << 14;

struct Coeffs {
  float lr, b1, b2, c1, c2, eps, decay[3];  // c1 = 1/(1-b1^t), c2 = 1/(1-b2^t)
};                                          // decay[mode]: -, 1, 1 - lr*wd

Coeffs coeffs(const AdamWParams& p, const char* op) {
  DSV3_CHECK(p.step >= 1, "[", op, "] step must be >= 1, got ", p.step);
  DSV3_CHECK(p.beta1 >= 0 && p.beta1 < 1 && p.beta2 >= 0 && p.beta2 < 1, "[", op,
             "] betas must be in [0, 1), got ", p.beta1, ", ", p.beta2);
  DSV3_CHECK(p.eps > 0 && p.lr >= 0 && p.weight_decay >= 0, "[", op,
             "] lr, weight_decay must be >= 0 and eps > 0");
  const double t = (double)p.step;
  return {p.lr,
          p.beta1,
          p.beta2,
          (float)(1.0 / (1.0 - std::pow((double)p.beta1, t))),
          (float)(1.0 / (1.0 - std::pow((double)p.beta2, t))),
          p.eps,
          {1.f, 1.f, 1.f - p.lr * p.weight_decay}};
}


// The moments as stored: fp32, or bf16 bit patterns (decoded to fp32, re-encoded RNE)
inline float moment_get(float x) { return x; }
inline float moment_get(uint16_t x) { return bf16_decode(x); }
inline void moment_put(float& dst, float x) { dst = x; }
inline void moment_put(uint16_t& dst, float x) { dst = bf16_encode(x); }

// One AdamW update over n elements, branch-free so that the SIMD clones vectorize it (the
// optimizer is a pass over the whole slab: scalar sqrt and division made it the step's
// second-largest cost). A frozen element (mode 0) is computed and discarded: its old values
// are stored back. The same IEEE operations per element as a scalar loop (no contraction:
// simd.h), so the results are bit-identical to it in every clone. No __restrict__: the
// pointers may alias (the binding does not forbid it); GCC vectorizes with a run-time overlap
// check instead.
template <typename Mom>
inline __attribute__((always_inline)) void adamw_body(float* w, const float* g, Mom* m, Mom* v,
                                                      const uint8_t* mode, int64_t n,
                                                      const Coeffs& cr) {
  const Coeffs c = cr;
  const float keep_decay = c.decay[2];
  for (int64_t i = 0; i < n; ++i) {
    const int md = mode ? mode[i] : 2;
    const float mi = c.b1 * moment_get(m[i]) + (1.f - c.b1) * g[i];
    const float vi = c.b2 * moment_get(v[i]) + (1.f - c.b2) * (g[i] * g[i]);
    const float mh = mi * c.c1, vh = vi * c.c2;
    const float wi = w[i] * (md == 2 ? keep_decay : 1.f) - c.lr * (mh / (std::sqrt(vh) + c.eps));
    if (md) {
      w[i] = wi;
      moment_put(m[i], mi);
      moment_put(v[i], vi);
    }
  }
}
DSV3_SIMD_CLONES void adamw_run(float* w, const float* g, float* m, float* v,
                                const uint8_t* mode, int64_t n, const Coeffs& c) {
  adamw_body(w, g, m, v, mode, n, c);
}
DSV3_SIMD_CLONES void adamw_run_bf16(float* w, const float* g, uint16_t* m, uint16_t* v,
                                     const uint8_t* mode, int64_t n, const Coeffs& c) {
  adamw_body(w, g, m, v, mode, n, c);
}

// sum of x^2 in double over n elements: 8 partial sums (element i into lane i % 8, in order),
// then added lane 0 .. 7; vectorizable, and the same for every clone and thread count
DSV3_SIMD_CLONES double sum_squares_run(const float* __restrict__ x, int64_t n) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) lane[l] += (double)x[i + l] * (double)x[i + l];
  for (int l = 0; i + l < n; ++l) lane[l] += (double)x[i + l] * (double)x[i + l];
  double s = 0;
  for (int l = 0; l < 8; ++l) s += lane[l];
  return s;
}

}  // namespace


void adamw_update(float* w, const float* g, float* m, float* v, int64_t n, const AdamWParams& p,
                  const uint8_t* mode) {
  const Coeffs c = coeffs(p, "adamw");
  parallel_for(n, kGrain, [&](int64_t a, int64_t b) {
    adamw_run(w + a, g + a, m + a, v + a, mode ? mode + a : nullptr, b - a, c);
  });
}

void adamw_update_bf16(float* w, const float* g, uint16_t* m, uint16_t* v, int64_t n,
                       const AdamWParams& p, const uint8_t* mode) {
  const Coeffs c = coeffs(p, "adamw");
  parallel_for(n, kGrain, [&](int64_t a, int64_t b) {
    adamw_run_bf16(w + a, g + a, m + a, v + a, mode ? mode + a : nullptr, b - a, c);
  });
}

double sum_squares(const float* g, int64_t n) {
  constexpr int64_t C = 4096;
  const int64_t chunks = (n + C - 1) / C;
  std::vector<double> part((size_t)chunks, 0.0);
  parallel_for(chunks, 4, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) part[c] = sum_squares_run(g + c * C, std::min(n, (c + 1) * C) - c * C);
  });
  double s = 0;
  for (double x : part) s += x;
  return s;
}

void scale_inplace(float* x, int64_t n, float s) {
  parallel_for(n, kGrain, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) x[i] *= s;
  });
}

}  // namespace dsv3
