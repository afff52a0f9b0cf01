#include "kernels/mlp.h"

#include "core/check.h"
#include "kernels/nn.h"

namespace dsv3 {

void mlp_forward(float* y, MlpActs& a, const float* x, const SwiGluParams& p, int64_t R,
                 int64_t D, int64_t W) {
  DSV3_CHECK(p.gate_proj.data && p.up_proj.data && p.down_proj.data,
             "[mlp] gate_proj, up_proj and down_proj are required");
  a.g.resize(R * W);
  a.u.resize(R * W);
  a.h.resize(R * W);
  linear_forward(a.g.data(), x, p.gate_proj, R, D, W, p.precision);
  linear_forward(a.u.data(), x, p.up_proj, R, D, W, p.precision);
  swiglu_forward(a.h.data(), a.g.data(), a.u.data(), R * W);
  linear_forward(y, a.h.data(), p.down_proj, R, W, D, p.precision);
}

void mlp_backward(float* dx, const SwiGluGrads& g, const float* dy, const MlpActs& a,
                  const float* x, const SwiGluParams& p, int64_t R, int64_t D, int64_t W) {
  std::vector<float> dh((size_t)(R * W), 0.f), dg((size_t)(R * W), 0.f), du((size_t)(R * W), 0.f);
  linear_backward(dh.data(), g.down_proj, dy, a.h.data(), p.down_proj, R, W, D, p.precision);
  swiglu_backward(dg.data(), du.data(), dh.data(), a.g.data(), a.u.data(), R * W);
  linear_backward(dx, g.gate_proj, dg.data(), x, p.gate_proj, R, D, W, p.precision);
  linear_backward(dx, g.up_proj, du.data(), x, p.up_proj, R, D, W, p.precision);
}

}  // namespace dsv3
