// Basic layers: forward/backward pairs on contiguous float32 buffers.
//
// Legend:  R rows (tokens; B*T flattened)   K in-features   O out-features   D feature dim
//          V vocabulary size                F elements of an elementwise op
// Conventions: forward(out..., saved..., in..., weights..., opts) /
//              backward(d_in..., d_weights..., d_out, saved..., in..., weights...).
// Backward functions ACCUMULATE (+=) into every gradient output; callers zero them. A null
// gradient pointer skips that gradient. Where a `set` flag exists, set=true overwrites the
// large gradient instead (the Python ops: fresh outputs need no zeroing pass).
#pragma once
#include <cstdint>

#include "kernels/precision.h"
#include "kernels/wlinear.h"

namespace dsv3 {

// out[r,:] = weight[ids[r],:]             ids[R] in [0,V)   weight[V,D]   out[R,D]
void embedding_forward(float* out, const int64_t* ids, const float* weight, int64_t R, int64_t V,
                       int64_t D);
// The same rows of a weight in any storage format (kernels/wlinear.h): an fp32 view is the
// call above; bf16 / fp8 rows are dequantized (wlinear_rows). w must be [V, D].
void embedding_forward(float* out, const int64_t* ids, const WeightView& w, int64_t R, int64_t V,
                       int64_t D);
// d_weight[ids[r],:] += d_out[r,:]        (deterministic: columns split across threads)
void embedding_backward(float* d_weight, const float* d_out, const int64_t* ids, int64_t R,
                        int64_t V, int64_t D);

// The one linear path of the model's projections; p is the GEMM precision of THIS call
// (kernels/precision.h: fp32, or the bf16/fp8 training GEMMs). fp32 runs kernels/wlinear.h:
// with at most kLinearGemvRows rows its GEMV (memory-bound decoding at full bandwidth with any
// OpenBLAS build), with more its register-tile prefill on the vector tiers (sgemm on the scalar
// tier); the same fp32 sum up to reassociation. Both compute a row independently of the call's
// other rows (so a token's logits are the same in a 1-row decode step and in a speculative
// verification of up to 16 rows), but they sum in different orders, and so does sgemm, whose
// rows may also depend on the call's row count (OpenBLAS picks kernels by shape). The orders
// depend on the ISA tier (DSV3_ISA). The backward's GEMMs are sgemm.
// y = x W^T                               x[R,K]  W[O,K]  y[R,O]
constexpr int64_t kLinearGemvRows = 16;  // = the GEMV's limit (wlinear_tiers.h kMaxGemvR)
void linear_forward(float* y, const float* x, const float* w, int64_t R, int64_t K, int64_t O,
                    const LinearMode& p);
// dx += dy W ;  dW += dy^T x              dy[R,O]   (set_dx: dx = dy W, dx need not be zeroed)
void linear_backward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                     int64_t R, int64_t K, int64_t O, const LinearMode& p, bool set_dx = false);
// The same over a weight view (the parameter structs hold views, kernels/wlinear.h); w must be
// [O, K]. Forward: an fp32 view is the call above (any precision, bit-identical); a bf16 / fp8
// view is a resident inference weight and needs p == fp32 (wlinear_forward dequantizes on
// the fly). Backward: fp32 views only (training needs fp32 master weights); a resident bf16 /
// fp8 view throws std::invalid_argument.
void linear_forward(float* y, const float* x, const WeightView& w, int64_t R, int64_t K,
                    int64_t O, const LinearMode& p);
void linear_backward(float* dx, float* dw, const float* dy, const float* x, const WeightView& w,
                     int64_t R, int64_t K, int64_t O, const LinearMode& p, bool set_dx = false);
// w must be a non-empty [O, K] view, else std::invalid_argument naming op.
void check_weight_shape(const WeightView& w, int64_t O, int64_t K, const char* op);
// w as an fp32 pointer for the training paths; a bf16 / fp8 view throws std::invalid_argument
// naming op.
const float* f32_weight(const WeightView& w, const char* op);

// y = w * x / sqrt(mean(x^2) + eps), in fp32; rstd[R] = 1/sqrt(mean(x^2)+eps) is saved
//                                         x[R,D]  w[D]  y[R,D]  rstd[R] (either may be null)
// D >= 1 and eps finite and >= 0, else std::invalid_argument ("[rmsnorm] ...").
void rmsnorm_forward(float* y, float* rstd, const float* x, const float* w, int64_t R, int64_t D,
                     float eps);
// dx += rstd*(w*dy) - rstd^3/D * x * sum(w*dy*x) ;  dw += sum_r dy*x*rstd   (set_dx: dx =)
void rmsnorm_backward(float* dx, float* dw, const float* dy, const float* rstd, const float* x,
                      const float* w, int64_t R, int64_t D, bool set_dx = false);

// y = exp(x) elementwise with the engine's exp_f32, in the hot loops' SIMD clone (for tests).
void exp_elementwise(float* y, const float* x, int64_t n);

// h = silu(g) * u = g * sigmoid(g) * u    g[F]  u[F]  h[F]
void swiglu_forward(float* h, const float* g, const float* u, int64_t F);
// dg += dh * u * s * (1 + g * (1 - s)) ;  du += dh * silu(g)     (s = sigmoid(g); set: =)
void swiglu_backward(float* dg, float* du, const float* dh, const float* g, const float* u,
                     int64_t F, bool set = false);

// Softmax cross-entropy with ignore-index.  logits[R,V]  targets[R]  loss_rows[R]  lse[R]
// The number of rows with t_r != ignore_index; targets outside [0,V) that are not ignore_index
// throw std::out_of_range ("[op] target ...").
int64_t cross_entropy_count(const int64_t* targets, int64_t R, int64_t V, int64_t ignore_index,
                            const char* op);
// loss_rows[r] = logsumexp(logits[r]) - logits[r, t_r] (0 where t_r == ignore_index).
// Returns the number of counted rows; the mean loss is sum(loss_rows) / count.
// Targets outside [0,V) that are not ignore_index throw std::out_of_range.
int64_t cross_entropy_forward(float* loss_rows, float* lse, const float* logits,
                              const int64_t* targets, int64_t R, int64_t V, int64_t ignore_index);
// d_logits[r,:] += scale * (softmax(logits[r]) - onehot(t_r)) for counted rows
// (scale = d_loss / count for the mean loss). set: d_logits = ..., ignored rows zeroed.
// Checks the targets as cross_entropy_forward does.
void cross_entropy_backward(float* d_logits, const float* lse, const float* logits,
                            const int64_t* targets, int64_t R, int64_t V, int64_t ignore_index,
                            float scale, bool set = false);

}  // namespace dsv3
