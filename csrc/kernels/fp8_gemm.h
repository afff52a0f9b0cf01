// FP8 GEMM with fine-grained scales and emulated tensor-core accumulation (semantics §2.6).
//
// Legend:  M rows of A (tokens)   N rows of B (output features)   K inner dimension
//          P promotion interval   k accumulator bits   Ka, Kb scale chunks of A, B along K
//
// C = A @ B^T where A [M,K] and B [N,K] are fp8 codes with block scales (see fp8.h). The
// operation emulated is the one of DeepSeek-V3's FP8 GEMM:
//   for each interval of P products along K (P = 128 = the scale chunk, by default):
//     partial[m,n] = sum over the interval of a[m,k] * b[n,k]   (decoded values, exact
//                                                                products, limited sum)
//     C[m,n]      += partial[m,n] * sa[m, chunk] * sb[n, chunk]  (fp32, "promotion")
// where sa/sb are the scales of the blocks holding the interval. The limited sum is:
//   accumulator_bits = 0 (default): fp32, exact products. On a bf16 tier (core/lowp_gemm.h,
//       the usual case) exactly the scheme above: codes decoded to bf16 once per packed
//       operand, a fresh fp32 sum per interval, promoted C += (partial * sa) * sb. On the fp32
//       tier (or an odd interval shorter than K) one sgemm of the dequantized operands (a*sa,
//       b*sb in fp32), i.e. with the scales applied before the sum instead of after each
//       interval. Both are fp32 evaluations of the same exact value and differ only by fp32
//       rounding (|err| <= gamma_{K+2} * sum_k |a sa b sb|, gamma_n = n u/(1 - n u), u =
//       2^-24), which is all an fp32 accumulator promises (its summation order is unspecified).
//   accumulator_bits = k in [1, 24]: after each add the running sum is truncated toward zero
//       to k significant bits (leading bit included; fp32 keeps 24): s <- trunc_k(s + p),
//       with s + p taken exactly (TwoSum), so k = 24 is fp32 with round-toward-zero adds.
//       H800 tensor cores keep about 14 bits. Products are visited in k order.
//   promotion_interval = 0 ("None"): one interval over all of K — only meaningful when each
//       operand has a single scale along K (per-tensor scales, block = {rows, K}).
// Every interval must lie inside one scale chunk of each operand: P divides the operand's
// block.cols, or K <= block.cols. Deterministic for any thread count (each C element is
// computed by one thread, in a fixed order) in the emulated and bf16-tier modes; the fp32-tier
// mode inherits BLAS's determinism for a fixed thread count.
#pragma once
#include <cstdint>

#include "core/lowp_gemm.h"
#include "kernels/fp8.h"

namespace dsv3 {

// One GEMM operand: codes [rows, K] row-major, scales [ceil(rows/block.rows), ceil(K/block.cols)].
// Layouts used by the recipe: {1, 128} tiles (activations, gradients), {128, 128} blocks
// (weights), {rows, K} one scale per tensor.
struct Fp8Operand {
  const uint8_t* codes = nullptr;
  const float* scales = nullptr;
  Fp8Block block;
  Fp8Format fmt = Fp8Format::e4m3;
};

struct Fp8GemmOptions {
  int accumulator_bits = 0;          // 0: fp32 (sgemm); 1..24: emulated, truncated
  int64_t promotion_interval = 128;  // products per limited sum; 0: all of K (no promotion)
};

// C = A @ B^T (or C += when accumulate)       a: [M,K]  b: [N,K]  C[M,N] fp32
void fp8_gemm(float* C, const Fp8Operand& a, const Fp8Operand& b, int64_t M, int64_t N,
              int64_t K, const Fp8GemmOptions& opts, bool accumulate);

// B packed once for several products: the panels of core/lowp_gemm.h holding b's codes decoded
// to bf16. Only where fp8_gemm_packable(K, opts) (a bf16 tier, exact accumulation, an even
// promotion interval or one covering K); fp8_gemm with the panels is then bit-identical to
// fp8_gemm without them. transposed: b.codes hold B^T [K,N] row-major (element (n,k) at
// codes[k*N + n]); the panels are those of B itself.
bool fp8_gemm_packable(int64_t K, const Fp8GemmOptions& opts);
void fp8_pack_b(Bf16PackedB& out, const uint8_t* codes, Fp8Format fmt, int64_t N, int64_t K,
                bool transposed);
// C = (or +=) A @ B^T with B given as panels (fp8_pack_b) and its scales in b (b.codes unused
// beyond the checks)
void fp8_gemm(float* C, const Fp8Operand& a, const Fp8Operand& b, const Bf16PackedB& b_panels,
              int64_t M, int64_t N, int64_t K, const Fp8GemmOptions& opts, bool accumulate);

// Checks the option/layout combination (std::invalid_argument "[fp8.gemm] ..."); fp8_gemm
// calls it, bindings may call it early.
void fp8_gemm_check(const Fp8Operand& a, const Fp8Operand& b, int64_t M, int64_t N, int64_t K,
                    const Fp8GemmOptions& opts);

}  // namespace dsv3
