// The weight-view forms of linear_forward / linear_backward / embedding_forward (nn.h): the one
// entry of every projection of the model, whatever the weight's storage format.
//
// Legend:  R rows   K in-features   O out-features   V embedding rows   D embedding width
//          view = WeightView (kernels/wlinear.h): fp32 | bf16 | fp8 E4M3 + 128x128 scale_inv
//
//   fp32 view          -> the float* functions of nn.cpp (every GemmPrecision; bit-identical
//                         to calling them with the pointer)
//   bf16 / fp8 view    -> wlinear_forward / wlinear_rows (resident inference weights, fp32
//                         activations); only with GemmPrecision::fp32, forward only
// Backward and training paths take the fp32 pointer through f32_weight, which refuses a
// resident bf16 / fp8 weight (a model holding them is for inference; training needs the fp32
// master weights of Model.from_pretrained).
#include <string>

#include "core/check.h"
#include "kernels/nn.h"

namespace dsv3 {

void check_weight_shape(const WeightView& w, int64_t O, int64_t K, const char* op) {
  DSV3_CHECK(w.data != nullptr, "[", op, "] the weight view is empty");
  DSV3_CHECK(w.O == O && w.K == K, "[", op, "] weight view is [", w.O, ", ", w.K,
             "] but the layer needs [", O, ", ", K, "]");
}

const float* f32_weight(const WeightView& w, const char* op) {
  DSV3_CHECK(w.fmt == WeightFormat::fp32, "[", op, "] this weight is resident in ",
             weight_format_name(w.fmt), ": training and gradients need fp32 weights (load the ",
             "model with Model.from_pretrained(dir) to train)");
  return w.as_f32();
}

void linear_forward(float* y, const float* x, const WeightView& w, int64_t R, int64_t K,
                    int64_t O, const LinearMode& p) {
  check_weight_shape(w, O, K, "linear");
  if (w.fmt == WeightFormat::fp32) return linear_forward(y, x, w.as_f32(), R, K, O, p);
  DSV3_CHECK(p == GemmPrecision::fp32, "[linear] a resident ", weight_format_name(w.fmt),
             " weight runs only in inference (GemmPrecision fp32); low-precision training ",
             "needs fp32 weights (load the model with Model.from_pretrained(dir) to train)");
  wlinear_forward(y, x, w, R);
}

void linear_backward(float* dx, float* dw, const float* dy, const float* x, const WeightView& w,
                     int64_t R, int64_t K, int64_t O, const LinearMode& p, bool set_dx) {
  check_weight_shape(w, O, K, "linear_backward");
  linear_backward(dx, dw, dy, x, f32_weight(w, "linear_backward"), R, K, O, p, set_dx);
}

void embedding_forward(float* out, const int64_t* ids, const WeightView& w, int64_t R, int64_t V,
                       int64_t D) {
  check_weight_shape(w, V, D, "embedding");
  if (w.fmt == WeightFormat::fp32) return embedding_forward(out, ids, w.as_f32(), R, V, D);
  for (int64_t r = 0; r < R; ++r)
    DSV3_INDEX_CHECK(ids[r] >= 0 && ids[r] < V, "[embedding] token id ", ids[r], " at position ",
                     r, " is out of range [0, ", V, ")");
  wlinear_rows(out, ids, w, R);
}

}  // namespace dsv3
