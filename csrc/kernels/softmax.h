// Row softmax shared by the attention kernels (causal core, absorbed MLA).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "core/mathfn.h"
#include "core/simd.h"

namespace dsv3 {

// Unnormalised softmax (a piece of one split over key chunks, or a whole row):
// row[0..n) <- exp(row - max), entries
// [n, width) zeroed; returns {max, sum}. n <= 0 gives {-inf, 0} and an all-zero row. Pieces
// combine as sum_c exp(max_c - M) * piece_c / sum_c exp(max_c - M) * sum_c.
struct SoftmaxPiece {
  float max, sum;
};
DSV3_SIMD_CLONES inline SoftmaxPiece softmax_piece(float* row, int64_t n, int64_t width) {
  if (n <= 0) {
    for (int64_t j = 0; j < width; ++j) row[j] = 0.f;
    return {-INFINITY, 0.f};
  }
  constexpr int L = 16;
  // the max in 16 lanes of a GCC vector (the array form of this loop stays scalar), with the
  // same NaN rule as the scalar loop: a NaN never wins a comparison
  typedef float f32x16 __attribute__((vector_size(4 * L)));
  f32x16 mx;
  float acc[L];
  for (int l = 0; l < L; ++l) mx[l] = -INFINITY, acc[l] = 0.f;
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    f32x16 r;
    std::memcpy(&r, row + j, sizeof r);
#if defined(__clang__)  // no ?: on these vector types in older Clang: select by bit masks
    typedef int i32x16 __attribute__((vector_size(4 * L)));
    const i32x16 gt = r > mx;
    mx = (f32x16)(((i32x16)r & gt) | ((i32x16)mx & ~gt));
#else
    mx = r > mx ? r : mx;
#endif
  }
  float m = -INFINITY;
  for (int l = 0; l < L; ++l) m = mx[l] > m ? mx[l] : m;
  for (int64_t t = j; t < n; ++t) m = row[t] > m ? row[t] : m;
  // exp and sum in one pass; lane l accumulates columns l, l + L, ... (fixed order)
  for (j = 0; j + L <= n; j += L)
    for (int l = 0; l < L; ++l) {
      const float e = exp_f32(row[j + l] - m);
      row[j + l] = e;
      acc[l] += e;
    }
  for (int64_t t = j; t < n; ++t) row[t] = exp_f32(row[t] - m);
  float sum = 0.f;
  for (int l = 0; l < L; ++l) sum += acc[l];
  for (; j < n; ++j) sum += row[j];
  for (j = n; j < width; ++j) row[j] = 0.f;
  return {m, sum};
}

// In place: row[0..n) <- exp(row - max) / sum; returns the log-sum-exp of row[0..n).
// Entries [n, width) are zeroed (masked keys).
DSV3_SIMD_CLONES inline float softmax_row(float* row, int64_t n, int64_t width) {
  const SoftmaxPiece p = softmax_piece(row, n, width);
  const float inv = 1.f / p.sum;
  for (int64_t j = 0; j < n; ++j) row[j] *= inv;
  return p.max + std::log(p.sum);
}

}  // namespace dsv3
