// Bit-level codecs behind fp8.h (internal: included by fp8.cpp and fp8_gemm.cpp only).
//
// A format is a compile-time description (Traits) so that every constant folds. The codec
// functions are templates on the lane type U: uint32_t for one element, or VecU — 16 lanes
// in a GCC/Clang vector, one zmm register in the AVX-512 clone of a loop (two ymm or four
// xmm in the others). The same source then serves scalar tails and the vector body, and the
// body is straight-line integer code: no branches, no tables, no FPU rounding. Conditions
// are written as `cond ? a : b`, which is a lane-wise select on vectors.
// A "code" is the format's bit pattern, sign in bit E+M; for the 8-bit formats it is the byte
// that is stored.
#pragma once
// 64-byte vectors passed by value exist only inside always-inlined code: no ABI concern, so the
// note GCC prints about their ABI is silenced for this header's definitions only.
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#include <cstdint>
#include <cstring>

// Forced inlining: these are the bodies of vectorized loops (including the target_clones
// copies, into which GCC's heuristics would otherwise not always inline them).
#if defined(__GNUC__)
#define DSV3_FP8_INLINE inline __attribute__((always_inline))
#define DSV3_FP8_VECTOR 1
#else
#define DSV3_FP8_INLINE inline
#define DSV3_FP8_VECTOR 0
#endif

namespace dsv3::fp8_detail {

constexpr int kLanes = 16;
#if DSV3_FP8_VECTOR
typedef uint32_t VecU __attribute__((vector_size(4 * kLanes)));
typedef int32_t VecI __attribute__((vector_size(4 * kLanes)));
typedef float VecF __attribute__((vector_size(4 * kLanes)));
typedef uint8_t VecU8 __attribute__((vector_size(kLanes)));
#endif

template <class U> struct SignedOf { using type = int32_t; };
#if DSV3_FP8_VECTOR
template <> struct SignedOf<VecU> { using type = VecI; };
#endif

// c in every lane (U{} is zero, and scalar + vector broadcasts)
template <class U>
DSV3_FP8_INLINE U splat(uint32_t c) {
  return U{} + c;
}

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

// bits of (the float with bits a) + c, lane-wise
DSV3_FP8_INLINE uint32_t add_float(uint32_t a, float c) { return bits_of(float_of(a) + c); }
#if DSV3_FP8_VECTOR
DSV3_FP8_INLINE VecU add_float(VecU a, float c) { return (VecU)((VecF)a + c); }
#endif

// E exponent bits, M mantissa bits, exponent bias B; `ieee` = all-ones exponent is inf/NaN
// (otherwise only S.1..1.1..1 is NaN and there is no inf: the "fn" formats).
template <int E, int M, int B, bool IEEE>
struct Traits {
  static constexpr int kE = E, kM = M, kBias = B;
  static constexpr bool kIeee = IEEE;
  static constexpr int kEmin = 1 - B;                            // smallest normal exponent
  static constexpr uint32_t kMagMask = (1u << (E + M)) - 1;
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
template <class U, class S>
DSV3_FP8_INLINE U rne_shift(U v, S s) {
  const U half_minus_one = (splat<U>(1u) << (s - 1u)) - 1u;
  return (U)(v + half_minus_one + ((v >> s) & 1u)) >> s;
}

// fp32 bits -> code, round to nearest even. Overflow (a rounded magnitude above the largest
// finite value, or an infinite input) gives ±max when `saturate`, else the overflow code
// (±inf, or NaN for the fn formats). NaN gives the NaN code with the input's sign.
template <class F, class U>
DSV3_FP8_INLINE U encode_bits(U u, bool saturate) {
  using I = typename SignedOf<U>::type;
  const U sign = (u >> 31) << (F::kE + F::kM);
  const U a = u & 0x7fffffffu;
  U code;
  if constexpr (F::kE == 8) {  // bf16 shares fp32's exponent range: drop 16 bits
    code = rne_shift(a, 16u);
  } else {
    // et: the exponent field the value would have in the format (<= 0: subnormal there).
    // With the field clamped to 1 and d = 1 - et extra shift, subnormals round with the
    // same expression as normals; a mantissa carry moves into the exponent on its own.
    // (fp32 zeros/subnormals get an implicit bit here, but shift past every bit: code 0.)
    const I et = (I)(a >> 23) + (F::kBias - 127);
    const I et1 = et < 1 ? 1 : et;
    const U v = ((U)et1 << 23) | (a & 0x7fffffu);
    I shift = (1 + (23 - F::kM)) - et;  // 23 - M + d when et < 1
    shift = et < 1 ? shift : 23 - F::kM;
    shift = shift > 31 ? 31 : shift;
    code = rne_shift(v, (U)shift);
  }
  const uint32_t over = saturate ? F::kMaxCode : F::kInfCode;
  code = (I)code > (int32_t)F::kMaxCode ? over : code;  // also catches fp32 inf
  code = (I)a > 0x7f800000 ? F::kNanCode : code;
  return code | sign;
}

// encode_bits(u, saturate=true) for a finite u, in fewer operations (the quantizers' path:
// their x / scale is finite, or its block is reported as non-finite and its codes unused).
// Normals: rebias the exponent, round the mantissa to M bits (RNE) by an integer shift.
// Subnormals of the format (|u| below its smallest normal): |u| + 1.5 * 2^(23 + emin - M)
// is an fp32 add whose ulp is the format's subnormal step, so the rounding (RNE, the FPU's
// default mode, as every other fp32 operation here assumes) leaves the code in the low bits;
// a value rounding up to the smallest normal gives its code (2^M) the same way.
template <class F, class U>
DSV3_FP8_INLINE U encode_finite_sat(U u) {
  static_assert(F::kE < 8, "bf16 has its own path");
  using I = typename SignedOf<U>::type;
  constexpr int kShift = 23 - F::kM;
  constexpr uint32_t kMinNormal = uint32_t(127 + F::kEmin) << 23;
  constexpr uint32_t kMagic = (uint32_t(127 + 23 + F::kEmin - F::kM) << 23) | 0x400000u;
  const U sign = (u >> 31) << (F::kE + F::kM);
  const U a = u & 0x7fffffffu;
  const U normal = (a - F::kRebias + ((1u << (kShift - 1)) - 1u) + ((a >> kShift) & 1u)) >> kShift;
  const U sub = add_float(a, float_of(kMagic)) - kMagic;
  U code = (I)a < (int32_t)kMinNormal ? sub : normal;
  code = (I)code > (int32_t)F::kMaxCode ? splat<U>(F::kMaxCode) : code;
  return code | sign;
}

// code -> fp32 bits (exact: every value of these formats is an fp32 value).
template <class F, class U>
DSV3_FP8_INLINE U decode_bits(U code) {
  using I = typename SignedOf<U>::type;
  const U sign = ((code >> (F::kE + F::kM)) & 1u) << 31;
  const U mag = code & F::kMagMask;
  U out;
  if constexpr (F::kE == 8) {  // bf16: the top half of an fp32
    out = mag << 16;
  } else {
    const U e = mag >> F::kM, m = mag & ((1u << F::kM) - 1);
    const U normal = (mag << (23 - F::kM)) + F::kRebias;
    // Subnormal m * 2^(emin-M) = 1.f * 2^(p + emin - M), p the position of m's leading bit.
    U p = m & 0u;
    for (int j = 1; j < F::kM; ++j) p += (I)m >= (int32_t)(1u << j) ? 1u : 0u;
    U sub = ((p + (uint32_t)(127 + F::kEmin - F::kM)) << 23) | ((m << (23u - p)) & 0x7fffffu);
    sub = (I)m == 0 ? 0u : sub;
    out = (I)e == 0 ? sub : normal;
    if constexpr (F::kIeee)
      out = (I)e == (int32_t)F::kExpOnes ? (U)((m << (23 - F::kM)) | 0x7f800000u) : out;
    else
      out = (I)mag == (int32_t)F::kMagMask ? 0x7fc00000u : out;
  }
  return out | sign;
}

// Round to the format and back: the fp32 bits of the value the format would hold. NaN
// inputs are returned unchanged (payload and sign kept).
template <class F, class U>
DSV3_FP8_INLINE U cast_bits(U u, bool saturate) {
  using I = typename SignedOf<U>::type;
  const U r = decode_bits<F>(encode_bits<F>(u, saturate));
  return (I)(u & 0x7fffffffu) > 0x7f800000 ? u : r;
}

}  // namespace dsv3::fp8_detail

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
