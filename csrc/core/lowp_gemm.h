// Low-precision GEMM on the CPU's bf16 units: C = A @ B^T with bf16 operands, exact products
// and fp32 accumulation, optionally with block scales promoted per K chunk (the FP8 GEMM of
// semantics §2.6, whose E4M3/E5M2 codes are exactly bf16 values).
//
// Legend:  M rows of A and C   N rows of B (columns of C)   K inner dimension
//          Kp = K rounded up to 32 (lowp_gemm_amx.h: zero pad)   NR = 64 columns per B panel
//          P promotion chunk along K (scaled mode; the FP8 recipe's 128)
//
//   unscaled  C[m,n] (+)= sum_k a[m,k] b[n,k]                       (bf16 GEMM)
//   scaled    for each chunk c of P along K:
//               partial[m,n] = sum_{k in c} a[m,k] b[n,k]             fresh fp32 sum
//               C[m,n]      += (partial[m,n] * sa(m,c)) * sb(n,c)     fp32 "promotion"
//             (the first chunk overwrites C unless accumulating)    (FP8 GEMM)
// a and b are bf16 bit patterns; products of two bf16 values are exact in fp32, so the only
// roundings are the fp32 additions (and the two scale multiplications): against the exact
// value the error is within the fp32 reassociation bound |err| <= gamma_{K'} * sum |a b sa sb|
// with gamma_n = n u / (1 - n u), u = 2^-24, K' = K + 2 (scaled) or K (unscaled).
//
// Tiers (chosen once per process, see lowp_tier; DSV3_ISA lowers it):
//   "amx-bf16"     AMX tiles (tdpbf16ps, lowp_gemm_amx.cpp) for products of >= 32 rows, the
//                  avx512-bf16 kernel below; needs the kernel's tile-data permission and a
//                  passing self-check at start-up, else the tier is avx512-bf16 and the reason
//                  says why. DSV3_AMX_EMULATE=1 runs it with emulated tile instructions (tests).
//   "avx512-bf16"  vdpbf16ps register tiles of 6 x 64 (24 zmm accumulators), A pairs
//                  broadcast, B from panels packed once (bf16_pack_b; cacheable).
//   "fp32"         no bf16 unit: callers keep their fp32 path (operands rounded to bf16 and
//                  given to sgemm), which is the pre-existing code; nothing here runs.
// Denormals on "avx512-bf16" (Intel SDM, VDPBF16PS; checked on this CPU by
// tests/test_lowp_gemm.py): input denormals are treated as zero and denormal results are
// flushed to zero, regardless of MXCSR (which is neither read nor written); rounding is RNE.
// A bf16 operand below 2^-126 in magnitude therefore contributes 0, and so does a product
// below 2^-126 (the fp32 tier keeps both as denormals). FP8 operands never meet this: E4M3 /
// E5M2 values are >= 2^-16 in magnitude, their products >= 2^-32.
// NaN: a NaN operand (or inf * 0) makes its C entries NaN on every tier; an inf operand
// gives inf or NaN as in IEEE arithmetic. Packing keeps NaN a (quiet) NaN.
// Deterministic: each C element is summed by one thread in a fixed order for any thread
// count; the result depends only on the tier.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/bf16.h"
#include "core/memory.h"

namespace dsv3 {

enum class LowpTier : int { fp32 = 0, avx512_bf16 = 1, amx_bf16 = 2 };

LowpTier lowp_tier();               // the active tier (detected once; DSV3_ISA honoured)
const char* lowp_tier_name(LowpTier t);  // "fp32" | "avx512-bf16" | "amx-bf16"
const std::string& lowp_tier_reason();   // why: e.g. "fp32 fallback: DSV3_ISA=avx2"

// An operand's elements: (i, k) at p[i * rs + k * cs] (element strides; either layout).
struct Bf16Src {
  const float* f32 = nullptr;        // fp32 values, rounded RNE, or
  const uint8_t* codes = nullptr;    // 8-bit codes mapped through table
  const uint16_t* table = nullptr;   //   (256 bf16 bit patterns, e.g. an exact fp8 decode)
  bool signed_table = false;         // table[c | 0x80] == table[c] | 0x8000 for c < 128 (a
                                     //   sign-magnitude code, as E4M3/E5M2): lets AVX-512BW
                                     //   decode 32 codes per instruction pair
  int64_t rs = 0, cs = 1;
};

// Packed bf16 words. The packers write every word, pad included, so a resize does not zero
// them first (DefaultInitAllocator).
using Bf16Buf = std::vector<uint16_t, DefaultInitAllocator<uint16_t>>;

// A [M,K] as row-major bf16 [packed_rows(M), Kp] (zero pad; lowp_gemm_amx.h).
void bf16_pack_a(Bf16Buf& out, const Bf16Src& a, int64_t M, int64_t K);

// B [N,K] packed into NR-column panels [ceil(N/NR)][Kp/2][NR][2] (zero pad): the layout the
// kernel streams. Pack once, reuse for every product with the same B.
struct Bf16PackedB {
  int64_t N = 0, K = 0;
  Bf16Buf data;
};
void bf16_pack_b(Bf16PackedB& out, const Bf16Src& b, int64_t N, int64_t K);

// Block scales of the scaled mode: sa(m, c) = a[(m / a_rows) * a_ld + (c*P) / a_cols], and
// likewise for b with n. Each chunk [cP, (c+1)P) must lie inside one scale column of each.
struct LowpScales {
  const float* a = nullptr;
  int64_t a_rows = 1, a_cols = 128, a_ld = 1;
  const float* b = nullptr;
  int64_t b_rows = 128, b_cols = 128, b_ld = 1;
  int64_t P = 128;  // even, or >= K (one chunk)
};

// C[M,N] (row stride ldc) = or += A B^T from packed operands, on the active bf16 tier (the
// caller checks lowp_tier() first; on the fp32 tier this throws std::runtime_error).
// scales == nullptr: unscaled mode.
void bf16_gemm_packed(float* C, int64_t ldc, const uint16_t* A, int64_t M, const Bf16PackedB& B,
                      const LowpScales* scales, bool accumulate);

// Convenience for callers without a cache (the ops binding): C = or += A B^T with A [M,K]
// and B [N,K] fp32 rounded to bf16, on the active tier (fp32 tier: rounded copies + sgemm).
void bf16_gemm(float* C, int64_t ldc, const Bf16Src& a, const Bf16Src& b, int64_t M, int64_t N,
               int64_t K, bool accumulate);

}  // namespace dsv3
