// Internal to wlinear*.cpp: the per-tier kernels behind wlinear.h, and the tier choice.
//
// Legend:  tier   scalar | avx2 (AVX2 + FMA, 8 lanes) | avx512 (AVX-512F/BW/VL, 16 lanes)
//          OB     weight rows streamed together by one GEMV step (fixed per tier, fmt, R)
//          RB     x rows per GEMV register block (<= 4)
//          super  kSuperRows weight rows: the unit of GEMV work; every row block of x runs over
//                 a super group in turn while its weights are in cache (24: a multiple of
//                 every OB)
//
// The three gemv_* / dequant_* are one source (wlinear_tier_body.inc) compiled three times
// with a different target attribute and lane type; the choice is made once per process
// (CPU features, capped by DSV3_ISA) in wlinear.cpp.
#pragma once
#include <cstdint>

#include "kernels/wlinear.h"

namespace dsv3::wlin {

enum class Tier : int { scalar = 0, avx2 = 1, avx512 = 2 };

constexpr int64_t kBk = 128;   // scale block edge
constexpr int64_t kMaxGemvR = 16;  // decode GEMV for R <= this, prefill panels above
constexpr int64_t kGemvRB = 4;     // x rows per GEMV register block
constexpr int64_t kSuperRows = 24;

struct TierKernels {
  // y[r, o] for r < R (1 <= R <= kMaxGemvR), o in [s0 * kSuperRows, min(O, s1 * kSuperRows))
  // (fp8 with prescaled: x is the activations times 2^a, unscale = 2^(120 - a); else 1)
  void (*gemv)(float* y, const float* x, const WeightView& w, float unscale, int64_t R,
               int64_t s0, int64_t s1);
  // dst[0:n] = w[o, k0:k0+n] as fp32 (fp8: e4m3(code) * sinv, one rounding; NaN codes -> NaN)
  void (*dequant)(float* dst, const WeightView& w, int64_t o, int64_t k0, int64_t n);
  // true when one of the n E4M3 codes at p is a NaN (0x7f / 0xff): the GEMV's own check
  bool (*has_nan)(const uint8_t* p, int64_t n);
  bool prescaled;  // the fp8 GEMV wants x prescaled (the vector tiers)
};

// The kernels of one tier; nullptr fields when this build has no such tier (non-x86).
TierKernels kernels_scalar();
TierKernels kernels_avx2();
TierKernels kernels_avx512();

}  // namespace dsv3::wlin
