// Bit-level codecs behind fp8.h (internal: included by fp8.cpp and fp8_gemm.cpp only).
//
// A format is a compile-time description (Traits) so that every constant folds and the
// per-element functions below are straight-line integer code the compiler vectorizes (no
// branches, no table lookups, no FPU rounding). A "code" is the format's bit pattern,
// sign in bit E+M, held in a uint32_t; for the 8-bit formats it is the byte that is stored.
#pragma once
#include <cstdint>
#include <cstring>

// Forced inlining: these are the bodies of vectorized loops (including the target_clones
// copies, into which GCC's heuristics would otherwise not always inline them).
#if defined(__GNUC__)
#define DSV3_FP8_INLINE inline __attribute__((always_inline))
#else
#define DSV3_FP8_INLINE inline
#endif

namespace dsv3::fp8_detail {

DSV3_FP8_INLINE uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
DSV3_FP8_INLINE float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// E exponent bits, M mantissa bits, exponent bias B; `ieee` = all-ones exponent is inf/NaN
// (otherwise only S.1..1.1..1 is NaN and there is no inf: the "fn" formats).
template <int E, int M, int B, bool IEEE>
struct Traits {
  static constexpr int kE = E, kM = M, kBias = B;
  static constexpr bool kIeee = IEEE;
  static constexpr int kEmin = 1 - B;                            // smallest normal exponent
  static constexpr uint32_t kMagMask = (1u << (E + M)) - 1;
  static constexpr uint32_t kSign = 1u << (E + M);
  static constexpr uint32_t kExpOnes = (1u << E) - 1;
  // largest finite magnitude code; the code of an overflow when not saturating; the NaN code
  static constexpr uint32_t kMaxCode = IEEE ? ((kExpOnes << M) - 1) : (kMagMask - 1);
  static constexpr uint32_t kInfCode = IEEE ? (kExpOnes << M) : kMagMask;  // fn: NaN
  static constexpr uint32_t kNanCode = kMagMask;  // S.1..1.1..1 in every format
  static constexpr uint32_t kRebias = uint32_t(127 - B) << 23;  // fp32 exponent -> ours
};

using E4M3 = Traits<4, 3, 7, false>;
using E5M2 = Traits<5, 2, 15, true>;
using BF16 = Traits<8, 7, 127, true>;
using E5M6 = Traits<5, 6, 15, true>;

// v / 2^s rounded to nearest, ties to even (0 < s < 32, v < 2^31).
DSV3_FP8_INLINE uint32_t rne_shift(uint32_t v, uint32_t s) {
  const uint32_t half_minus_one = (1u << (s - 1)) - 1;
  return (v + half_minus_one + ((v >> s) & 1u)) >> s;
}

// fp32 bits -> code, round to nearest even. Overflow (a rounded magnitude above the largest
// finite value, or an infinite input) gives ±max when `saturate`, else the overflow code
// (±inf, or NaN for the fn formats). NaN gives a NaN code of the same sign.
template <class F>
DSV3_FP8_INLINE uint32_t encode_bits(uint32_t u, bool saturate) {
  const uint32_t sign = (u >> 31) ? F::kSign : 0u;
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t fexp = a >> 23;  // fp32 biased exponent (0 for zeros and subnormals)
  // Normal in the target: rebias the exponent and round the fp32 mantissa off; a mantissa
  // carry moves into the exponent field on its own. (Wraps when not normal: unused then.)
  const uint32_t normal = rne_shift(a - F::kRebias, 23 - F::kM);
  // Subnormal in the target: the significand (implicit bit included) counted in units of
  // the format's smallest subnormal 2^(emin-M), shifted by 23-M + (emin - exponent).
  const uint32_t sig = (a & 0x7fffffu) | (fexp ? 0x800000u : 0u);
  const int32_t e = fexp ? (int32_t)fexp - 127 : -126;
  int32_t shift = (23 - F::kM) + (F::kEmin - e);
  shift = shift > 31 ? 31 : (shift < 1 ? 1 : shift);
  const uint32_t sub = rne_shift(sig, (uint32_t)shift);
  uint32_t code = (int32_t)fexp - 127 >= F::kEmin ? normal : sub;
  const uint32_t over = saturate ? F::kMaxCode : F::kInfCode;
  code = code > F::kMaxCode ? over : code;  // also catches fp32 inf (rounds past max)
  code = a > 0x7f800000u ? F::kNanCode : code;
  return code | sign;
}

// code -> fp32 bits (exact: every value of these formats is an fp32 value).
template <class F>
DSV3_FP8_INLINE uint32_t decode_bits(uint32_t code) {
  const uint32_t sign = (code & F::kSign) ? 0x80000000u : 0u;
  const uint32_t mag = code & F::kMagMask;
  const uint32_t e = mag >> F::kM, m = mag & ((1u << F::kM) - 1);
  uint32_t out;
  if constexpr (F::kE == 8) {  // bf16: the top half of an fp32
    out = mag << 16;
  } else {
    const uint32_t normal = (mag << (23 - F::kM)) + F::kRebias;
    // Subnormal m * 2^(emin-M) = 1.f * 2^(p + emin - M) with p the position of m's leading
    // bit. Integer only: a float multiply here would be kept behind a branch (it may trap),
    // which stops the loops from vectorizing.
    uint32_t p = 0;
    for (int j = 1; j < F::kM; ++j) p += (uint32_t)(m >= (1u << j));
    uint32_t sub = ((uint32_t)(127 + F::kEmin - F::kM) + p) << 23 | ((m << (23 - p)) & 0x7fffffu);
    sub = m ? sub : 0u;
    out = e ? normal : sub;
    if constexpr (F::kIeee)
      out = e == F::kExpOnes ? (0x7f800000u | (m << (23 - F::kM))) : out;
    else
      out = mag == F::kMagMask ? 0x7fc00000u : out;
  }
  return out | sign;
}

// Round to the format and back: the fp32 value the format would hold. NaN inputs are
// returned unchanged (payload and sign kept).
template <class F>
DSV3_FP8_INLINE float cast_value(float x, bool saturate) {
  const uint32_t u = bits_of(x);
  const uint32_t r = decode_bits<F>(encode_bits<F>(u, saturate));
  return float_of((u & 0x7fffffffu) > 0x7f800000u ? u : r);
}

}  // namespace dsv3::fp8_detail
