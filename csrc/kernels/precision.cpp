#include "kernels/precision.h"

#include <cstring>
#include <vector>

#include "core/blas.h"
#include "core/check.h"
#include "core/lowp_gemm.h"
#include "core/parallel.h"
#include "kernels/fp8_linear.h"
#include "kernels/lowp_weights.h"

namespace dsv3 {

namespace {

inline float bf16_rne(float x) { return bf16_decode(bf16_encode(x)); }  // core/bf16.h

std::vector<float> bf16_copy(const float* x, int64_t n) {
  std::vector<float> out((size_t)n);
  parallel_for(n, 1 << 15, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) out[i] = bf16_rne(x[i]);
  });
  return out;
}

// element (i, k) at p[i * rs + k * cs]
Bf16Src src(const float* p, int64_t rs, int64_t cs) {
  Bf16Src s;
  s.f32 = p;
  s.rs = rs;
  s.cs = cs;
  return s;
}

}  // namespace

GemmPrecision parse_gemm_precision(const char* s) {
  if (!std::strcmp(s, "fp32")) return GemmPrecision::fp32;
  if (!std::strcmp(s, "bf16")) return GemmPrecision::bf16;
  if (!std::strcmp(s, "fp8")) return GemmPrecision::fp8;
  DSV3_CHECK(false, "[precision] precision must be 'fp32', 'bf16' or 'fp8', got '", s, "'");
  return GemmPrecision::fp32;
}

void lowp_linear_forward(float* y, const float* x, const float* w, int64_t R, int64_t K,
                         int64_t O, const LinearMode& p) {
  if (R == 0 || O == 0) return;
  if (p.kind == GemmPrecision::fp8) {
    fp8_linear_forward(y, x, w, R, K, O, Fp8LinearOptions{}, p.weights);
    return;
  }
  if (lowp_tier() != LowpTier::fp32) {  // y = x W^T on the bf16 units (core/lowp_gemm.h)
    const Bf16PackedB* pw = p.weights && K > 0 ? p.weights->bf16(w, O, K, false) : nullptr;
    if (pw) {  // round(W)'s panels kept for the step's micro-batches (lowp_weights.h)
      Bf16Buf pa;
      bf16_pack_a(pa, src(x, K, 1), R, K);
      bf16_gemm_packed(y, O, pa.data(), R, *pw, nullptr, false);
      return;
    }
    bf16_gemm(y, O, src(x, K, 1), src(w, K, 1), R, O, K, false);
    return;
  }
  std::vector<float> xb = bf16_copy(x, R * K), wb = bf16_copy(w, O * K);
  sgemm(false, true, R, O, K, 1.f, xb.data(), K, wb.data(), K, 0.f, y, O);
}

void lowp_linear_backward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                          int64_t R, int64_t K, int64_t O, const LinearMode& p) {
  if (p.kind == GemmPrecision::fp8) {
    fp8_linear_backward(dx, dw, dy, x, w, R, K, O, Fp8LinearOptions{}, p.weights);
    return;
  }
  if (R == 0 || K == 0 || O == 0) return;
  if (lowp_tier() != LowpTier::fp32) {  // both products read their transposed operands in place
    const Bf16PackedB* pwt = dx && p.weights ? p.weights->bf16(w, O, K, true) : nullptr;
    if (pwt) {  // dx += dy W with round(W)^T's kept panels
      Bf16Buf pa;
      bf16_pack_a(pa, src(dy, O, 1), R, O);
      bf16_gemm_packed(dx, K, pa.data(), R, *pwt, nullptr, true);
    } else if (dx) {
      bf16_gemm(dx, K, src(dy, O, 1), src(w, 1, K), R, K, O, true);  // dx += dy W
    }
    if (dw) bf16_gemm(dw, K, src(dy, 1, O), src(x, 1, K), O, K, R, true);  // dW += dy^T x
    return;
  }
  std::vector<float> dyb = bf16_copy(dy, R * O);
  if (dx) {
    std::vector<float> wb = bf16_copy(w, O * K);
    sgemm(false, false, R, K, O, 1.f, dyb.data(), O, wb.data(), K, 1.f, dx, K);
  }
  if (dw) {
    std::vector<float> xb = bf16_copy(x, R * K);
    sgemm(true, false, O, K, R, 1.f, dyb.data(), O, xb.data(), K, 1.f, dw, K);
  }
}

}  // namespace dsv3
