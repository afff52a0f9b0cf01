// SwiGLU MLP: the dense FFN of the first layers, and the shape of every expert.
//
// Legend:  R rows (tokens)   D hidden   W width (intermediate_size, or moe_intermediate_size
//          times the number of experts it stands for)
//   y = down_proj(silu(gate_proj x) * up_proj x)     gate/up [W,D], down [D,W]
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/precision.h"
#include "core/memory.h"
#include "kernels/wlinear.h"

namespace dsv3 {

struct SwiGluParams {  // weight views (kernels/wlinear.h: fp32 or resident bf16 / fp8)
  WeightView gate_proj;  // [W,D]
  WeightView up_proj;    // [W,D]
  WeightView down_proj;  // [D,W]
  LinearMode precision = LinearMode();  // of the three projections (precision.h)
};
struct SwiGluGrads {  // null members are skipped
  float* gate_proj = nullptr;
  float* up_proj = nullptr;
  float* down_proj = nullptr;
};
struct MlpActs {
  FVec g, u, h;  // [R,W] gate_proj x, up_proj x, silu(g)*u
};

// y[R,D] = SwiGLU(x[R,D])
void mlp_forward(float* y, MlpActs& acts, const float* x, const SwiGluParams& p, int64_t R,
                 int64_t D, int64_t W);
// dx += ..., grads += ...
void mlp_backward(float* dx, const SwiGluGrads& g, const float* dy, const MlpActs& acts,
                  const float* x, const SwiGluParams& p, int64_t R, int64_t D, int64_t W);

}  // namespace dsv3
