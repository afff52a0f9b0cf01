#include "kernels/optim.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/bf16.h"
#include "core/check.h"
#include "core/parallel.h"

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

inline void update(float& w, float g, float m, float v, const Coeffs& c, int mode, float* mo,
                   float* vo) {
  m = c.b1 * m + (1.f - c.b1) * g;
  v = c.b2 * v + (1.f - c.b2) * (g * g);
  const float mh = m * c.c1, vh = v * c.c2;
  w = w * c.decay[mode] - c.lr * (mh / (std::sqrt(vh) + c.eps));
  *mo = m;
  *vo = v;
}

}  // namespace


void adamw_update(float* w, const float* g, float* m, float* v, int64_t n, const AdamWParams& p,
                  const uint8_t* mode) {
  const Coeffs c = coeffs(p, "adamw");
  parallel_for(n, kGrain, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const int md = mode ? mode[i] : 2;
      if (md) update(w[i], g[i], m[i], v[i], c, md, &m[i], &v[i]);
    }
  });
}

void adamw_update_bf16(float* w, const float* g, uint16_t* m, uint16_t* v, int64_t n,
                       const AdamWParams& p, const uint8_t* mode) {
  const Coeffs c = coeffs(p, "adamw");
  parallel_for(n, kGrain, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const int md = mode ? mode[i] : 2;
      if (!md) continue;
      float mo, vo;
      update(w[i], g[i], bf16_decode(m[i]), bf16_decode(v[i]), c, md, &mo, &vo);
      m[i] = bf16_encode(mo);
      v[i] = bf16_encode(vo);
    }
  });
}

double sum_squares(const float* g, int64_t n) {
  constexpr int64_t C = 4096;
  const int64_t chunks = (n + C - 1) / C;
  std::vector<double> part((size_t)chunks, 0.0);
  parallel_for(chunks, 4, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double s = 0;
      const int64_t e = std::min(n, (c + 1) * C);
      for (int64_t i = c * C; i < e; ++i) s += (double)g[i] * (double)g[i];
      part[c] = s;
    }
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
