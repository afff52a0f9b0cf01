// A whole DeepSeekMoE layer call that keeps nothing between calls (the Python layer ops
// dsv3.ops.moe_forward / moe_backward): the forward with its balance loss, and the backward,
// which re-runs the forward and adds the sequence-wise balance loss's gradient (balance.h).
//
// Legend:  B sequences   T tokens per sequence   R = B*T   D hidden   E routed experts
//
// Saved activations and scratch live in a buffer per calling thread, reused between calls: at
// the sizes researchers use (thousands of tokens) they are tens of MB, and fresh buffers
// would be page-faulted in (and zeroed by the kernel) on every call.
#pragma once
#include <cstdint>

#include "kernels/moe.h"

namespace dsv3 {

// y[R,D] = moe(x[R,D]); *balance_loss (may be null) = seq_balance_loss of the routing with
// weight alpha (0 when alpha == 0). Returns the forward's acts: views into the calling
// thread's scratch, valid until that thread's next layer call.
MoeActs moe_layer_forward(float* y, double* balance_loss, const float* x, const MoeParams& p,
                          const MoeConfig& c, int64_t B, int64_t T, double alpha);

// dx[R,D] += ..., grads += ...  of  L(moe(x)) + alpha * balance_loss, given dy = dL/dy.
void moe_layer_backward(float* dx, const MoeGrads& g, const float* dy, const float* x,
                        const MoeParams& p, const MoeConfig& c, int64_t B, int64_t T,
                        double alpha);

}  // namespace dsv3
