#include "kernels/wlinear.h"
#include "kernels/wlinear_tiers.h"
#include "kernels/nn.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/blas.h"
#include "core/check.h"
#include "core/mathfn.h"
#include "core/parallel.h"
#include "kernels/precision.h"
#include "core/simd.h"

namespace dsv3 {

namespace {

constexpr int kLanes = 16;  // partial sums kept in 16 lanes so the loops vectorize without
                            // reassociation flags; the lane order is fixed -> deterministic

// Rows per task so that a task touches at least ~32k floats.
int64_t row_grain(int64_t D) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)); }

DSV3_SIMD_CLONES void rmsnorm_rows(float* y, float* rstd, const float* x, const float* w,
                                   int64_t r0, int64_t r1, int64_t D, float eps) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * D;
    const float ss = dot_lanes(xr, xr, D);
    const float rs = 1.f / std::sqrt(ss / (float)D + eps);
    if (rstd) rstd[r] = rs;
    if (!y) continue;  // rstd only (the backward of the Python op recomputes it)
    float* yr = y + r * D;
    for (int64_t j = 0; j < D; ++j) yr[j] = w[j] * (xr[j] * rs);
  }
}

// dx part of the rmsnorm backward for rows [r0, r1) (kSet: dx = ..., else dx += ...); dw
// partial sums into dw_part[D].
template <bool kSet>
DSV3_SIMD_CLONES void rmsnorm_back_rows(float* dx, float* dw_part, const float* dy,
                                        const float* rstd, const float* x, const float* w,
                                        int64_t r0, int64_t r1, int64_t D) {
  for (int64_t r = r0; r < r1; ++r) {
    const float *xr = x + r * D, *dyr = dy + r * D;
    const float rs = rstd[r];
    float acc[kLanes] = {0};
    int64_t j = 0;
    for (; j + kLanes <= D; j += kLanes)
      for (int l = 0; l < kLanes; ++l) acc[l] += w[j + l] * dyr[j + l] * xr[j + l];
    float dot = 0.f;
    for (int l = 0; l < kLanes; ++l) dot += acc[l];
    for (; j < D; ++j) dot += w[j] * dyr[j] * xr[j];
    if (dx) {
      const float c = rs * rs * rs * dot / (float)D;
      float* dxr = dx + r * D;
      for (j = 0; j < D; ++j) dxr[j] = (kSet ? 0.f : dxr[j]) + (rs * (w[j] * dyr[j]) - c * xr[j]);
    }
    if (dw_part)
      for (j = 0; j < D; ++j) dw_part[j] += dyr[j] * (xr[j] * rs);
  }
}

DSV3_SIMD_CLONES void swiglu_range(float* h, const float* g, const float* u, int64_t a,
                                   int64_t b) {
  for (int64_t i = a; i < b; ++i) h[i] = g[i] * sigmoid_f32(g[i]) * u[i];
}

template <bool kSet>
DSV3_SIMD_CLONES void swiglu_back_range(float* dg, float* du, const float* dh, const float* g,
                                        const float* u, int64_t a, int64_t b) {
  // one sigmoid per element for both gradients; the null checks are loop-invariant (the
  // compiler unswitches them)
  for (int64_t i = a; i < b; ++i) {
    const float s = sigmoid_f32(g[i]);
    if (dg) dg[i] = (kSet ? 0.f : dg[i]) + dh[i] * u[i] * (s * (1.f + g[i] * (1.f - s)));
    if (du) du[i] = (kSet ? 0.f : du[i]) + dh[i] * (g[i] * s);
  }
}

DSV3_SIMD_CLONES void exp_range(float* y, const float* x, int64_t a, int64_t b) {
  for (int64_t i = a; i < b; ++i) y[i] = exp_f32(x[i]);
}

// The reductions use OpenMP SIMD reductions: full-width vectors in every clone, a fixed
// association for a given CPU and build (deterministic), no reassociation flags elsewhere.
DSV3_SIMD_CLONES float row_logsumexp(const float* x, int64_t V) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < V; ++j) m = x[j] > m ? x[j] : m;
  if (std::isnan(m) || std::isinf(m)) {  // NaN anywhere, or +-inf max: fall back to plain math
    for (int64_t j = 0; j < V; ++j)
      if (std::isnan(x[j])) return x[j];
    if (m == -INFINITY) return -INFINITY;
  }
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < V; ++j) s += exp_f32(x[j] - m);
  return m + std::log(s);
}

template <bool kSet>
DSV3_SIMD_CLONES void softmax_grad_row(float* d, const float* x, float lse, float scale,
                                       int64_t V) {
  for (int64_t j = 0; j < V; ++j) d[j] = (kSet ? 0.f : d[j]) + scale * exp_f32(x[j] - lse);
}

}  // namespace

void exp_elementwise(float* y, const float* x, int64_t n) { exp_range(y, x, 0, n); }

void embedding_forward(float* out, const int64_t* ids, const float* weight, int64_t R, int64_t V,
                       int64_t D) {
  for (int64_t r = 0; r < R; ++r)
    DSV3_INDEX_CHECK(ids[r] >= 0 && ids[r] < V, "[embedding] token id ", ids[r], " at position ",
                     r, " is out of range [0, ", V, ")");
  parallel_for(R, row_grain(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      std::memcpy(out + r * D, weight + ids[r] * D, sizeof(float) * D);
  });
}

void embedding_backward(float* d_weight, const float* d_out, const int64_t* ids, int64_t R,
                        int64_t V, int64_t D) {
  for (int64_t r = 0; r < R; ++r)
    DSV3_INDEX_CHECK(ids[r] >= 0 && ids[r] < V, "[embedding_backward] token id ", ids[r],
                     " at position ", r, " is out of range [0, ", V, ")");
  // Each thread owns a range of columns and walks all rows in order: no races, fixed order.
  parallel_for(D, 64, [&](int64_t c0, int64_t c1) {
    for (int64_t r = 0; r < R; ++r) {
      float* dst = d_weight + ids[r] * D;
      const float* src = d_out + r * D;
      for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
    }
  });
}

static_assert(kLinearGemvRows <= wlin::kMaxGemvR, "linear's GEMV rows must be the GEMV's");

void linear_forward(float* y, const float* x, const float* w, int64_t R, int64_t K, int64_t O,
                    const LinearMode& p) {
  if (p != GemmPrecision::fp32) return lowp_linear_forward(y, x, w, R, K, O, p);
  // A few rows (batch-1 decoding, speculative verification, an expert with few tokens): the
  // memory-bound GEMV of kernels/wlinear.h, which streams w once at the machine's bandwidth
  // whatever OpenBLAS build is loaded (the pthreads and serial builds' sgemv fell to 0.68x /
  // 0.82x of the OpenMP build's decode speed, README "Threads, OpenBLAS builds").
  // More rows, on the vector tiers: wlinear's register-tile prefill (the fp32 rows packed per
  // 256-wide K chunk into register-tile panels, as for resident weights). Each y element is one
  // FMA chain over k in order, so a row's bits depend on neither R nor the thread count, and
  // the speed not on which kernel set the loaded OpenBLAS picked (an OPENBLAS_CORETYPE=Haswell
  // in the environment halves sgemm on an AVX-512 CPU). The scalar tier, and empty products
  // (K or O = 0: wlinear refuses an empty view): sgemm.
  if (R >= 1 && K >= 1 && O >= 1 && (R <= kLinearGemvRows || wlinear_prefill_tiles()))
    return wlinear_forward(y, x, WeightView::f32(w, O, K), R);
  sgemm(false, true, R, O, K, 1.f, x, K, w, K, 0.f, y, O);
}

void linear_backward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                     int64_t R, int64_t K, int64_t O, const LinearMode& p, bool set_dx) {
  if (p != GemmPrecision::fp32) {
    if (dx && set_dx) std::fill_n(dx, R * K, 0.f);  // the low-precision GEMMs accumulate
    return lowp_linear_backward(dx, dw, dy, x, w, R, K, O, p);
  }
  if (dx) sgemm(false, false, R, K, O, 1.f, dy, O, w, K, set_dx ? 0.f : 1.f, dx, K);
  if (dw) sgemm(true, false, O, K, R, 1.f, dy, O, x, K, 1.f, dw, K);
}

void rmsnorm_forward(float* y, float* rstd, const float* x, const float* w, int64_t R, int64_t D,
                     float eps) {
  DSV3_CHECK(R >= 0 && D >= 1, "[rmsnorm] needs rows >= 0 and a feature dim >= 1, got R=", R,
             ", D=", D);
  DSV3_CHECK(eps >= 0 && std::isfinite(eps), "[rmsnorm] eps must be finite and >= 0, got ", eps);
  parallel_for(R, row_grain(D),
               [&](int64_t r0, int64_t r1) { rmsnorm_rows(y, rstd, x, w, r0, r1, D, eps); });
}

void rmsnorm_backward(float* dx, float* dw, const float* dy, const float* rstd, const float* x,
                      const float* w, int64_t R, int64_t D, bool set_dx) {
  DSV3_CHECK(R >= 0 && D >= 1, "[rmsnorm_backward] needs rows >= 0 and a feature dim >= 1, got R=",
             R, ", D=", D);
  const auto rows = [&](float* part, int64_t r0, int64_t r1) {
    if (set_dx)
      rmsnorm_back_rows<true>(dx, part, dy, rstd, x, w, r0, r1, D);
    else
      rmsnorm_back_rows<false>(dx, part, dy, rstd, x, w, r0, r1, D);
  };
  if (!dw) {
    parallel_for(R, row_grain(D), [&](int64_t r0, int64_t r1) { rows(nullptr, r0, r1); });
    return;
  }
  // dw: one partial row per task, summed in task order afterwards (deterministic).
  const int64_t grain = row_grain(D);
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(num_threads(), R / grain));
  std::vector<float> part((size_t)(tasks * D), 0.f);
  parallel_for(tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = R * t / tasks, r1 = R * (t + 1) / tasks;
      rows(part.data() + t * D, r0, r1);
    }
  });
  for (int64_t t = 0; t < tasks; ++t)
    for (int64_t j = 0; j < D; ++j) dw[j] += part[t * D + j];
}

void swiglu_forward(float* h, const float* g, const float* u, int64_t F) {
  parallel_for(F, 1 << 15, [&](int64_t a, int64_t b) { swiglu_range(h, g, u, a, b); });
}

void swiglu_backward(float* dg, float* du, const float* dh, const float* g, const float* u,
                     int64_t F, bool set) {
  parallel_for(F, 1 << 15, [&](int64_t a, int64_t b) {
    if (set)
      swiglu_back_range<true>(dg, du, dh, g, u, a, b);
    else
      swiglu_back_range<false>(dg, du, dh, g, u, a, b);
  });
}

int64_t cross_entropy_count(const int64_t* targets, int64_t R, int64_t V, int64_t ignore_index,
                            const char* op) {
  int64_t count = 0;
  for (int64_t r = 0; r < R; ++r) {
    if (targets[r] == ignore_index) continue;
    DSV3_INDEX_CHECK(targets[r] >= 0 && targets[r] < V, "[", op, "] target ", targets[r],
                     " at row ", r, " is out of range [0, ", V, ") and is not ignore_index (",
                     ignore_index, ")");
    ++count;
  }
  return count;
}

int64_t cross_entropy_forward(float* loss_rows, float* lse, const float* logits,
                              const int64_t* targets, int64_t R, int64_t V, int64_t ignore_index) {
  const int64_t count = cross_entropy_count(targets, R, V, ignore_index, "cross_entropy");
  parallel_for(R, row_grain(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = logits + r * V;
      const float l = row_logsumexp(xr, V);
      lse[r] = l;
      loss_rows[r] = targets[r] == ignore_index ? 0.f : l - xr[targets[r]];
    }
  });
  return count;
}

void cross_entropy_backward(float* d_logits, const float* lse, const float* logits,
                            const int64_t* targets, int64_t R, int64_t V, int64_t ignore_index,
                            float scale, bool set) {
  cross_entropy_count(targets, R, V, ignore_index, "cross_entropy_backward");
  parallel_for(R, row_grain(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (targets[r] == ignore_index) {
        if (set) std::memset(d_logits + r * V, 0, sizeof(float) * V);
        continue;
      }
      if (set)
        softmax_grad_row<true>(d_logits + r * V, logits + r * V, lse[r], scale, V);
      else
        softmax_grad_row<false>(d_logits + r * V, logits + r * V, lse[r], scale, V);
      d_logits[r * V + targets[r]] -= scale;
    }
  });
}

}  // namespace dsv3
