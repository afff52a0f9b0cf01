// AdamW with decoupled weight decay (Loshchilov & Hutter), fp32 master weights, moments in
// fp32 or bf16, and global-norm gradient clipping.
//
// Legend:  n parameters of one contiguous range   t = the step number, starting at 1
//
// One step on w[n] with gradient g[n] (the PyTorch torch.optim.AdamW formula):
//   w  <- w - lr * wd * w                       (only where decay applies: matrices)
//   m  <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
//   w  <- w - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
// Arithmetic is fp32 per element (the bias corrections in double, then rounded once).
// bf16 moments are stored as uint16 (the top half of an fp32); each step decodes them,
// updates in fp32 and re-encodes with round-to-nearest-even.
// Every element is independent, so results do not depend on the thread count.
#pragma once
#include <cstdint>

namespace dsv3 {

struct AdamWParams {
  float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.f;
  int64_t step = 1;  // t, >= 1
};

// mode[n] (may be null = all 2): 0 leaves the element alone (frozen), 1 updates it without
// weight decay, 2 with. One call covers a whole parameter slab in one parallel region.
void adamw_update(float* w, const float* g, float* m, float* v, int64_t n, const AdamWParams& p,
                  const uint8_t* mode = nullptr);
void adamw_update_bf16(float* w, const float* g, uint16_t* m, uint16_t* v, int64_t n,
                       const AdamWParams& p, const uint8_t* mode = nullptr);

// sum_i g_i^2 in double over fixed 4096-element chunks combined in order (inside a chunk 8
// interleaved partial sums): the same value for every thread count and ISA.
double sum_squares(const float* g, int64_t n);

// x[n] *= s
void scale_inplace(float* x, int64_t n, float s);

}  // namespace dsv3
