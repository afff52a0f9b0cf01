// Low-precision GEMMs for training (semantics §2.6). The precision is an argument of each call:
// every projection of the model goes through linear_forward / linear_backward (nn.h) with the
// precision its parameters carry (MlaParams / MhaParams / SwiGluParams / MoeParams /
// MtpParams ::precision, fp32 unless the training step sets it when it builds the views), and
// the embedding, lm_head, router gate and attention core call the fp32 products directly.
//
//   fp32  the fp32 products (the default): sgemm, or wlinear's GEMV / register tiles for
//         linear_forward (kernels/nn.h)
//   bf16  both operands rounded to bf16 (round-to-nearest-even), exact products, fp32
//         accumulation: vdpbf16ps on the bf16 tier (core/lowp_gemm.h), else rounded
//         copies given to sgemm
//   fp8   fp8_linear_forward / fp8_linear_backward: E4M3 operands tiled along each GEMM's
//         inner dimension (activations and gradients 1x128, weights 128x128), fp32 promotion
//
// No state outside the call: a forward running on another thread during an fp8 training step
// builds its own (fp32) views and computes in fp32. Within one training loss call the
// parameter structs also carry that call's weight cache (LinearMode::weights,
// kernels/lowp_weights.h), so each weight is quantized / rounded and packed once per step
// rather than once per GEMM.
#pragma once
#include <cstdint>

namespace dsv3 {

enum class GemmPrecision : int { fp32 = 0, bf16 = 1, fp8 = 2 };

class LowpWeightCache;  // kernels/lowp_weights.h

// What the parameter structs carry and the linear path takes: the precision of the call and,
// in a training step, the cache of weights prepared once per loss call (null: each call
// prepares its own; results are bit-identical either way). Converts implicitly from
// GemmPrecision, so an fp32 call site just passes GemmPrecision::fp32.
struct LinearMode {
  GemmPrecision kind = GemmPrecision::fp32;
  LowpWeightCache* weights = nullptr;
  LinearMode() = default;
  LinearMode(GemmPrecision k, LowpWeightCache* w = nullptr) : kind(k), weights(w) {}  // NOLINT
  bool operator==(GemmPrecision k) const { return kind == k; }
  bool operator!=(GemmPrecision k) const { return kind != k; }
};

GemmPrecision parse_gemm_precision(const char* s);  // "fp32" | "bf16" | "fp8", else ValueError

// The low-precision forms of linear_forward / linear_backward (nn.h), same shapes and
// accumulate semantics: y = x W^T (overwrites);  dx += dy W ;  dW += dy^T x.
void lowp_linear_forward(float* y, const float* x, const float* w, int64_t R, int64_t K,
                         int64_t O, const LinearMode& p);
void lowp_linear_backward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                          int64_t R, int64_t K, int64_t O, const LinearMode& p);

}  // namespace dsv3
