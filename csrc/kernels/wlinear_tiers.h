// Internal to wlinear*.cpp: the per-tier kernels behind wlinear.h, and the tier choice.
//
// Legend:  tier   scalar | avx2 (AVX2 + FMA, 8 lanes) | avx512 (AVX-512F/BW/VL, 16 lanes) |
//                 avx512-gfni (avx512 whose fp8 GEMV decodes codes with GFNI, x permuted)
//          OB     weight rows streamed together by one GEMV step (fixed per tier, fmt, R)
//          RB     x rows per GEMV register block (<= 4)
//          super  kSuperRows weight rows: the unit of GEMV work; every row block of x runs over
//                 a super group in turn while its weights are in cache (24: a multiple of
//                 every OB)
//
// The four gemv_* / dequant_* are one source (wlinear_tier_body.inc, with the prefill tiles
// in wlinear_tier_prefill.inc) compiled four times with a different target attribute and lane
// type; the choice is made once per process (CPU features, capped by DSV3_ISA) in wlinear.cpp.
#pragma once
#include <cstdint>

#include "kernels/wlinear.h"

namespace dsv3::wlin {

enum class Tier : int { scalar = 0, avx2 = 1, avx512 = 2, avx512_gfni = 3 };

constexpr int64_t kBk = 128;   // scale block edge
constexpr int64_t kMaxGemvR = 16;  // decode GEMV for R <= this, prefill panels above (bf16:
                                   // kBf16GemvR)
// bf16 weights take the GEMV up to this many rows too: measured on Zen 4 (2 threads, a 64-token
// prefill of Config.medium, bf16-resident), 20-40% faster than dequantized panels + sgemm,
// whose bf16 -> fp32 dequant and small-task imbalance the GEMV does not have; fp32 weights (sgemm
// in place) measured even and fp8 ones (the GEMV decodes every code once per 4-row block) slower.
// Against the avx512 register-tile prefill (prefill_panel) it still measured 12% faster on that
// prefill (same process, alternated; a threshold of 16 or 32 was slower), and kMaxGemvR = 16
// even with fp8 thresholds of 8, 10 or 12 (2026-12-07, bench_llamacpp.py's model)
constexpr int64_t kBf16GemvR = 64;
constexpr int64_t kGemvRB = 4;     // x rows per GEMV register block
constexpr int64_t kPanelRows = 64;   // prefill_panels: weight rows per block (whole micro-panels)
constexpr int64_t kPanelBlocks = 4;  // prefill_panel: micro-panels per task at most
constexpr int64_t kSuperRows = 24;

// fp8 GEMV input of the avx512-gfni tier (TierKernels::fp8_perm): each row padded with zeros
// to a multiple of kPermGroup and each group of 64 reordered, x'[16u + j] = x[16(j/4) + 4u +
// j%4] (u < 4, j < 16): the order in which its four unpacks leave the codes.
constexpr int64_t kPermGroup = 64;
inline int64_t perm_index(int64_t k) {  // the position of x[k] in x'
  const int64_t g = k - k % kPermGroup, c = k % kPermGroup;
  return g + 16 * ((c % 16) / 4) + 4 * (c / 16) + c % 4;
}

struct TierKernels {
  // y[r, o] for r < R (1 <= R <= kMaxGemvR; bf16 kBf16GemvR), o in [s0 * kSuperRows,
  // min(O, s1 * kSuperRows));
  // x rows ldx apart (fp8 with prescaled: x is the activations times 2^a, unscale = 2^(120 -
  // a); else 1; fp8 with fp8_perm: also padded and reordered, as above)
  void (*gemv)(float* y, const float* x, int64_t ldx, const WeightView& w, float unscale,
               int64_t R, int64_t s0, int64_t s1);
  // dst[0:n] = w[o, k0:k0+n] as fp32 (fp8: e4m3(code) * sinv, one rounding; NaN codes -> NaN)
  void (*dequant)(float* dst, const WeightView& w, int64_t o, int64_t k0, int64_t n);
  // true when one of the n E4M3 codes at p is a NaN (0x7f / 0xff): the GEMV's own check
  bool (*has_nan)(const uint8_t* p, int64_t n);
  // y[r, :] = x[r, 0:n] @ w[r0 : r0 + n, :] (wlinear_rows_product)
  void (*rows_product)(float* y, int64_t ldy, const float* x, int64_t ldx, const WeightView& w,
                       int64_t r0, int64_t n, int64_t R);
  // y[r, o0 + j] (rows ldy apart) = x[r, :] (rows ldx apart) . w[o0 + j, :] for r < R, j < on
  // (any format; on <= kPanelBlocks * kPanelRows keeps the pack in L2): one prefill task;
  // nullptr where the tier has none (the caller dequantizes into panels and runs sgemm)
  void (*prefill_panel)(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t R,
                        const WeightView& w, int64_t o0, int64_t on);
  bool prescaled;  // the fp8 GEMV wants x prescaled (the vector tiers)
  bool fp8_perm;   // the fp8 GEMV wants x padded and reordered (avx512-gfni)
};

// The kernels of one tier; nullptr fields when this build has no such tier (non-x86).
TierKernels kernels_scalar();
TierKernels kernels_avx2();
TierKernels kernels_avx512();
TierKernels kernels_avx512_gfni();

}  // namespace dsv3::wlin
