// Low-precision GEMMs for training (semantics §2.6): one per-thread setting, consulted by
// linear_forward / linear_backward (nn.h) and by the MoE experts' GEMMs, so every linear layer
// of the model follows it while the attention core, embedding, lm_head and router gate (which
// do not go through these functions, or opt out with a ScopedGemmPrecision(fp32)) stay fp32.
//
//   fp32  plain sgemm (the default; this path is unchanged and costs one thread-local load)
//   bf16  both operands rounded to bf16 (round-to-nearest-even), exact products, fp32
//         accumulation: vdpbf16ps on the bf16 tier (core/lowp_gemm.h), else rounded
//         copies given to sgemm
//   fp8   fp8_linear_forward / fp8_linear_backward: E4M3 operands tiled along each GEMM's
//         inner dimension (activations and gradients 1x128, weights 128x128), fp32 promotion
//
// The setting belongs to the calling thread (core/parallel.h ThreadState) and follows its work
// into parallel_for's workers (the MoE experts run inside such loops): the training step sets
// it for its duration with ScopedGemmPrecision, and a forward running concurrently on another
// thread keeps its own (fp32) precision.
#pragma once
#include <cstdint>

namespace dsv3 {

enum class GemmPrecision : int { fp32 = 0, bf16 = 1, fp8 = 2 };

GemmPrecision gemm_precision();
GemmPrecision parse_gemm_precision(const char* s);  // "fp32" | "bf16" | "fp8", else ValueError

class ScopedGemmPrecision {
 public:
  explicit ScopedGemmPrecision(GemmPrecision p);
  ~ScopedGemmPrecision();
  ScopedGemmPrecision(const ScopedGemmPrecision&) = delete;
  ScopedGemmPrecision& operator=(const ScopedGemmPrecision&) = delete;

 private:
  GemmPrecision prev_;
};

// The low-precision forms of linear_forward / linear_backward (nn.h), same shapes and
// accumulate semantics: y = x W^T (overwrites);  dx += dy W ;  dW += dy^T x.
void lowp_linear_forward(float* y, const float* x, const float* w, int64_t R, int64_t K,
                         int64_t O, GemmPrecision p);
void lowp_linear_backward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                          int64_t R, int64_t K, int64_t O, GemmPrecision p);

}  // namespace dsv3
