// Rotary position embedding with optional YaRN scaling (semantics §2.2).
//
// Legend:  R rows (tokens)   H heads   Dr rotary dim (even)   P = Dr/2 frequency pairs
// Layout: ADJACENT pairs (x[2i], x[2i+1]) rotate by angle pos * f_i, f_i = theta^(-2i/Dr) —
// DeepSeek-V3's checkpoint layout. Angles are formed in double precision from the integer
// position, so long positions lose no accuracy; cos/sin are scaled by `attn_factor`.
//
// YaRN (when yarn == true):
//   corr(r) = Dr * ln(orig / (r * 2 pi)) / (2 ln theta)
//   low = floor(corr(beta_fast)), high = ceil(corr(beta_slow)), clamped to [0, Dr-1],
//   high += 0.001 if equal; ramp_i = clamp((i - low) / (high - low), 0, 1)
//   f_i' = f_i / factor * ramp_i + f_i * (1 - ramp_i)
//   attn_factor = mscale(factor, mscale) / mscale(factor, mscale_all_dim),
//   mscale(s, m) = 0.1 * m * ln(s) + 1 for s > 1, else 1.
#pragma once
#include <cstdint>
#include <vector>

namespace dsv3 {

struct RopeParams {
  int64_t dim = 64;
  double theta = 10000.0;
  bool yarn = false;
  double factor = 1.0;
  double original_max_position_embeddings = 4096;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
};

struct RopeTable {
  std::vector<double> inv_freq;  // [P]
  double attn_factor = 1.0;
  double low = 0, high = 0;      // YaRN correction range (0, 0 without YaRN)
};

double yarn_mscale(double scale, double mscale);
RopeTable rope_table(const RopeParams& p);  // validates p (dim even and > 0, theta > 1, ...)

// y[r,h,:] = rotate(x[r,h,:], pos[r]).  Strides are in floats: row stride and head stride,
// so q_pe can be rotated inside a packed [R, H, Dn+Dr] projection. y may alias x.
void rope_forward(float* y, int64_t y_row, int64_t y_head, const float* x, int64_t x_row,
                  int64_t x_head, const int64_t* pos, int64_t R, int64_t H, const RopeTable& t);
// dx += rotate(dy, -pos)   (the rotation is orthogonal; its transpose is the inverse)
void rope_backward(float* dx, int64_t dx_row, int64_t dx_head, const float* dy, int64_t dy_row,
                   int64_t dy_head, const int64_t* pos, int64_t R, int64_t H, const RopeTable& t);

// Positions of R = B*T rows of B sequences at start_pos..start_pos+T-1: pos[r] = start_pos + r%T.
std::vector<int64_t> row_positions(int64_t B, int64_t T, int64_t start_pos);

// Gradient through "rope the last Dr dims of every head" of a [R, heads, Dn+Dr] buffer, in
// place: the unrotated part passes through, the rotated part is rotated back.
void rope_heads_backward(float* d, int64_t heads, int64_t Dn, int64_t Dr, const int64_t* pos,
                         int64_t R, const RopeTable& t);

}  // namespace dsv3
