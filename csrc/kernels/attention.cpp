#include "kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/blas.h"
#include "core/check.h"
#include "core/mathfn.h"
#include "core/parallel.h"
#include "core/simd.h"
#include "kernels/softmax.h"

namespace dsv3 {

namespace {

constexpr int64_t kBlock = 64;  // query rows per block

// Visible keys for query row i: [0, n).
inline int64_t visible(const AttnShape& s, int64_t i) {
  return std::min(s.Tk, s.start_pos + i + 1);
}

// P = exp(S - lse) for visible entries, 0 elsewhere; then dS = P * (dP - delta).
DSV3_SIMD_CLONES void softmax_back_row(float* p, float* dp, float lse, float delta, int64_t n,
                                       int64_t width) {
  for (int64_t j = 0; j < n; ++j) {
    p[j] = exp_f32(p[j] - lse);
    dp[j] = p[j] * (dp[j] - delta);
  }
  for (int64_t j = n; j < width; ++j) p[j] = dp[j] = 0.f;
}

}  // namespace

void attention_check(const AttnShape& s) {
  DSV3_CHECK(s.B >= 1 && s.Tq >= 1 && s.Tk >= 1 && s.H >= 1 && s.Hkv >= 1 && s.Dk >= 1 &&
                 s.Dv >= 1,
             "[attention] every dimension must be >= 1 (B=", s.B, ", Tq=", s.Tq, ", Tk=", s.Tk,
             ", H=", s.H, ", Hkv=", s.Hkv, ", Dk=", s.Dk, ", Dv=", s.Dv, ")");
  DSV3_CHECK(s.H % s.Hkv == 0, "[attention] query heads (", s.H,
             ") must be a multiple of key/value heads (", s.Hkv, ")");
  DSV3_CHECK(s.start_pos >= 0, "[attention] start_pos must be >= 0, got ", s.start_pos);
  DSV3_CHECK(s.Tk >= s.start_pos + s.Tq, "[attention] k/v hold ", s.Tk,
             " tokens but start_pos + Tq = ", s.start_pos + s.Tq, " are needed");
  DSV3_CHECK(std::isfinite(s.scale), "[attention] scale must be finite, got ", s.scale);
}

void attention_forward(float* o, float* lse, const float* q, const float* k, const float* v,
                       const AttnShape& s) {
  attention_check(s);
  const int64_t ldq = s.H * s.Dk, ldk = s.Hkv * s.Dk, ldv = s.Hkv * s.Dv, ldo = s.H * s.Dv;
  const int64_t group = s.H / s.Hkv;
  parallel_for(s.B * s.H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> S((size_t)(kBlock * s.Tk)), inv(kBlock);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / s.H, h = t % s.H, hk = h / group;
      const float* qb = q + b * s.Tq * ldq + h * s.Dk;
      const float* kb = k + b * s.Tk * ldk + hk * s.Dk;
      const float* vb = v + b * s.Tk * ldv + hk * s.Dv;
      float* ob = o + b * s.Tq * ldo + h * s.Dv;
      for (int64_t i0 = 0; i0 < s.Tq; i0 += kBlock) {
        const int64_t m = std::min(kBlock, s.Tq - i0);
        const int64_t n = visible(s, i0 + m - 1);  // keys any row of the block can see
        sgemm(false, true, m, n, s.Dk, s.scale, qb + i0 * ldq, ldq, kb, ldk, 0.f, S.data(), n);
        // Unnormalised P = exp(S - max); the 1/sum goes on the m x Dv output rows instead of
        // the m x n probabilities (one pass fewer over S).
        for (int64_t i = 0; i < m; ++i) {
          const SoftmaxPiece p = softmax_piece(S.data() + i * n, visible(s, i0 + i), n);
          inv[i] = 1.f / p.sum;
          if (lse) lse[(b * s.H + h) * s.Tq + i0 + i] = p.max + std::log(p.sum);
        }
        sgemm(false, false, m, s.Dv, n, 1.f, S.data(), n, vb, ldv, 0.f, ob + i0 * ldo, ldo);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < s.Dv; ++j) ob[(i0 + i) * ldo + j] *= inv[i];
      }
    }
  });
}

void attention_backward(float* dq, float* dk, float* dv, const float* d_o, const float* o,
                        const float* lse, const float* q, const float* k, const float* v,
                        const AttnShape& s) {
  attention_check(s);
  const int64_t ldq = s.H * s.Dk, ldk = s.Hkv * s.Dk, ldv = s.Hkv * s.Dv, ldo = s.H * s.Dv;
  const int64_t group = s.H / s.Hkv;
  // One task per (batch, kv head): the heads of a group accumulate into the same dk/dv rows,
  // so they run in order inside the task (deterministic, no races).
  parallel_for(s.B * s.Hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> P((size_t)(kBlock * s.Tk)), dP((size_t)(kBlock * s.Tk));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / s.Hkv, hk = t % s.Hkv;
      const float* kb = k + b * s.Tk * ldk + hk * s.Dk;
      const float* vb = v + b * s.Tk * ldv + hk * s.Dv;
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const float* qb = q + b * s.Tq * ldq + h * s.Dk;
        const float* ob = o + b * s.Tq * ldo + h * s.Dv;
        const float* dob = d_o + b * s.Tq * ldo + h * s.Dv;
        const float* lb = lse + (b * s.H + h) * s.Tq;
        for (int64_t i0 = 0; i0 < s.Tq; i0 += kBlock) {
          const int64_t m = std::min(kBlock, s.Tq - i0);
          const int64_t n = visible(s, i0 + m - 1);
          // P <- scale * q k^T (softmax applied below), dP <- dO v^T
          sgemm(false, true, m, n, s.Dk, s.scale, qb + i0 * ldq, ldq, kb, ldk, 0.f, P.data(), n);
          sgemm(false, true, m, n, s.Dv, 1.f, dob + i0 * ldo, ldo, vb, ldv, 0.f, dP.data(), n);
          for (int64_t i = 0; i < m; ++i) {
            float dl = 0.f;
            const float *orow = ob + (i0 + i) * ldo, *dorow = dob + (i0 + i) * ldo;
            for (int64_t d = 0; d < s.Dv; ++d) dl += orow[d] * dorow[d];
            softmax_back_row(P.data() + i * n, dP.data() + i * n, lb[i0 + i], dl,
                             visible(s, i0 + i), n);
          }
          // dv += P^T dO ; dq += scale * dS k ; dk += scale * dS^T q
          if (dv)
            sgemm(true, false, n, s.Dv, m, 1.f, P.data(), n, dob + i0 * ldo, ldo, 1.f,
                  dv + b * s.Tk * ldv + hk * s.Dv, ldv);
          if (dq)
            sgemm(false, false, m, s.Dk, n, s.scale, dP.data(), n, kb, ldk, 1.f,
                  dq + b * s.Tq * ldq + h * s.Dk + i0 * ldq, ldq);
          if (dk)
            sgemm(true, false, n, s.Dk, m, s.scale, dP.data(), n, qb + i0 * ldq, ldq, 1.f,
                  dk + b * s.Tk * ldk + hk * s.Dk, ldk);
        }
      }
    }
  });
}

}  // namespace dsv3
