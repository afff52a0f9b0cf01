// FP8 linear layer for training (semantics §2.6 "FP8 training mode"): each of the three GEMMs of a
// linear layer takes E4M3 operands quantized along THAT GEMM's inner dimension, so every
// scale multiplies a whole promotion interval:
//
//   forward      y   = Q(x) Q(W)^T        x tiles 1x128 along K;  W blocks 128x128
//   input-grad   dx += Q(dy) Q(W^T)^T     dy tiles 1x128 along O; W^T blocks 128x128 (the
//                                         same blocks as W, transposed)
//   weight-grad  dW += Q(dy^T) Q(x^T)^T   dy^T and x^T tiles 1x128 along R (per 128 tokens)
//
// Q quantizes the fp32 tensor directly (the report re-quantizes its cached FP8 activations
// from 1x128 to 128x1 tiles for the weight gradient; dsv3 quantizes the fp32 x^T once, which
// avoids the double rounding). Outputs, master weights and gradients are fp32.
//
// Legend:  R rows (tokens)   K in-features   O out-features
// Backward ACCUMULATES into dx and dw (callers zero them); a null pointer skips that gradient.
#pragma once
#include <cstdint>

#include "kernels/fp8_gemm.h"
#include "kernels/lowp_weights.h"

namespace dsv3 {

struct Fp8LinearOptions {
  Fp8Format act_fmt = Fp8Format::e4m3;     // x (forward and weight-grad)
  Fp8Format weight_fmt = Fp8Format::e4m3;  // W
  Fp8Format grad_fmt = Fp8Format::e4m3;    // dy (e5m2 for the hybrid-format experiment)
  bool pow2_scale = false;                 // UE8M0 scales for every operand
  Fp8GemmOptions gemm;                     // accumulator emulation, promotion interval
};

// y = Q(x) Q(W)^T                               x[R,K]  w[O,K]  y[R,O]
// weights: the per-step cache (kernels/lowp_weights.h), used with the default options on a
// bf16 tier; results are bit-identical with or without it.
void fp8_linear_forward(float* y, const float* x, const float* w, int64_t R, int64_t K,
                        int64_t O, const Fp8LinearOptions& opts,
                        LowpWeightCache* weights = nullptr);
// dx += Q(dy) Q(W^T)^T ; dw += Q(dy^T) Q(x^T)^T  dy[R,O]  dx[R,K]  dw[O,K]
void fp8_linear_backward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                         int64_t R, int64_t K, int64_t O, const Fp8LinearOptions& opts,
                         LowpWeightCache* weights = nullptr);

}  // namespace dsv3
