#include "core/lowp_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "core/blas.h"
#include "core/lowp_gemm_amx.h"
#include "core/parallel.h"
#include "core/simd.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DSV3_LOWP_X86 1
#include <immintrin.h>
#endif

namespace dsv3 {

namespace {

using lowp::kNR;               // columns per packed B panel (4 zmm)
using lowp::packed_k;
constexpr int kMR = 6;        // rows per register tile
constexpr int64_t kMB = 96;   // about this many rows of A per task (16 tiles; A block in L2)
// unscaled mode: K per pass over a B sub-panel (64 KiB, from L2; the up to 16 tiles of a row
// block reuse it). Each pass ends in a load-add-store of the C tile: 512 against 128 took the
// kernel from 0.88 to 0.95 of torch's bf16 matmul at 4096 x 2048 x 2048 (Zen 5; 192 / 256 /
// 1024 were within noise of 512).
constexpr int64_t kKC = 512;

// ---- tier --------------------------------------------------------------------------------------

struct TierInfo {
  LowpTier tier = LowpTier::fp32;
  lowp::AmxMode amx = lowp::AmxMode::off;
  std::string reason;
};

// DSV3_ISA caps the tier: amx* -> amx-bf16, avx512* -> avx512-bf16, anything naming a lower
// ISA (avx2, fp32, sse2, baseline, default) -> fp32. An unrecognised value also gives fp32
// (the safe side), and the reason says so.
int isa_cap(const char* isa, std::string& note) {
  if (!isa || !*isa) return 2;
  const std::string s(isa);
  note = std::string("DSV3_ISA=") + s;
  if (s.rfind("amx", 0) == 0) return 2;
  if (s.rfind("avx512", 0) == 0) return 1;
  if (s == "avx2" || s == "fp32" || s == "sse2" || s == "baseline" || s == "default") return 0;
  note += " (not one of amx, avx512, avx2, fp32)";
  return 0;
}

TierInfo detect() {
  TierInfo t;
  std::string note;
  const int cap = isa_cap(std::getenv("DSV3_ISA"), note);
#if DSV3_LOWP_X86
  __builtin_cpu_init();
  // __builtin_cpu_supports checks XCR0 too: the OS must save the zmm state.
  const bool bf16 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#else
  const bool bf16 = false;
#endif
  if (!bf16) {
    t.reason = "fp32 fallback: the CPU has no AVX512-BF16 (vdpbf16ps)";
  } else if (cap == 0) {
    t.reason = "fp32 fallback: forced by " + note;
  } else {
    t.tier = LowpTier::avx512_bf16;
    t.reason = "avx512-bf16: vdpbf16ps register tiles";
    std::string why;
    if (cap == 2) t.amx = lowp::amx_detect(why);
    if (t.amx != lowp::AmxMode::off) {
      t.tier = LowpTier::amx_bf16;
      t.reason = "amx-bf16: " + why;
    } else if (!why.empty()) {
      t.reason += "; AMX-BF16 not used: " + why;
    }
    if (!note.empty()) t.reason += " (" + note + ")";
  }
  return t;
}

const TierInfo& tier_info() {
  static const TierInfo t = detect();
  return t;
}

// ---- packing ----------------------------------------------------------------------------------

inline uint16_t fetch(const Bf16Src& s, int64_t i, int64_t k) {
  const int64_t o = i * s.rs + k * s.cs;
  return s.f32 ? bf16_encode(s.f32[o]) : s.table[s.codes[o]];
}

DSV3_SIMD_CLONES void round_contiguous(uint16_t* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_encode(src[i]);
}

// One k pair of a B panel from a transposed fp32 source (lanes contiguous): word pair l =
// (round(r0[l]), round(r1[l])) for l < w, zeros beyond (and r1 null: K odd, zero high half)
DSV3_SIMD_CLONES void pack_pair_f32(uint16_t* __restrict__ dst, const float* __restrict__ r0,
                                    const float* __restrict__ r1, int64_t w, int64_t lanes) {
  for (int64_t l = 0; l < w; ++l) {
    dst[2 * l] = bf16_encode(r0[l]);
    dst[2 * l + 1] = r1 ? bf16_encode(r1[l]) : 0;
  }
  for (int64_t l = 2 * w; l < 2 * lanes; ++l) dst[l] = 0;
}

// ---- codes -> bf16 with AVX-512BW (Bf16Src::signed_table) ------------------------------------
// The 128 magnitudes of the table sit in four zmm of 32 words; vpermt2w looks up 32 codes in
// two of them (index bits 0-5), bit 6 picks the pair, bit 7 is the sign (ORed into bit 15).
#if DSV3_LOWP_X86
#define DSV3_BW __attribute__((target("avx512f,avx512bw,avx512vl")))
struct CodeLut {
  __m512i t[4];
};
DSV3_BW inline CodeLut code_lut(const uint16_t* table) {
  CodeLut l;
  for (int i = 0; i < 4; ++i) l.t[i] = _mm512_loadu_si512(table + 32 * i);
  return l;
}
// c: 32 codes zero-extended to words
DSV3_BW inline __m512i decode32(__m512i c, const CodeLut& l) {
  const __m512i lo = _mm512_permutex2var_epi16(l.t[0], c, l.t[1]);
  const __m512i hi = _mm512_permutex2var_epi16(l.t[2], c, l.t[3]);
  const __m512i mag = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(c, _mm512_set1_epi16(0x40)), lo, hi);
  return _mm512_or_si512(mag, _mm512_slli_epi16(_mm512_and_si512(c, _mm512_set1_epi16(0x80)), 8));
}
DSV3_BW inline __m512i load_codes(const uint8_t* p, int64_t n) {  // n in [0, 32]; zeros past n
  const __mmask32 m = n >= 32 ? ~(__mmask32)0 : (__mmask32)((1u << n) - 1u);
  return _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(m, p));
}
DSV3_BW void decode_run_bw(uint16_t* dst, const uint8_t* src, int64_t n, const uint16_t* table) {
  const CodeLut l = code_lut(table);
  for (int64_t i = 0; i < n; i += 32) {
    const int64_t w = std::min<int64_t>(32, n - i);
    const __mmask32 m = w == 32 ? ~(__mmask32)0 : (__mmask32)((1u << w) - 1u);
    _mm512_mask_storeu_epi16(dst + i, m, decode32(load_codes(src + i, w), l));
  }
}
// One k pair of a B panel from a transposed code source: out[2l + h] = decode(rh[l]) for the
// first w of 64 lanes (zeros beyond, and for h = 1 when r1 is null: K odd).
DSV3_BW void pack_pair_bw(uint16_t* out, const uint8_t* r0, const uint8_t* r1, int64_t w,
                          const uint16_t* table) {
  const CodeLut l = code_lut(table);
  alignas(64) static const uint16_t kIdx[2][32] = {
      {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
       8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47},
      {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
       24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63}};
  const __m512i ilo = _mm512_load_si512(kIdx[0]), ihi = _mm512_load_si512(kIdx[1]);
  for (int64_t h = 0; h < 64; h += 32) {  // lanes h .. h+31
    const int64_t n = std::max<int64_t>(0, std::min<int64_t>(32, w - h));
    const __mmask32 m = n >= 32 ? ~(__mmask32)0 : (__mmask32)((1u << n) - 1u);
    const __m512i a = _mm512_maskz_mov_epi16(m, decode32(load_codes(r0 + h, n), l));
    const __m512i b = r1 ? _mm512_maskz_mov_epi16(m, decode32(load_codes(r1 + h, n), l))
                         : _mm512_setzero_si512();
    _mm512_storeu_si512(out + 2 * h, _mm512_permutex2var_epi16(a, ilo, b));
    _mm512_storeu_si512(out + 2 * h + 32, _mm512_permutex2var_epi16(a, ihi, b));
  }
}
#undef DSV3_BW
#endif

bool have_bw() {
#if DSV3_LOWP_X86
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  }();
  return ok;
#else
  return false;
#endif
}

// dst[0:n] = elements (i, k0 .. k0+n) of s; along_i: elements (k0 .. k0+n, i) instead (a run
// down a column: contiguous when rs == 1)
void convert_run(uint16_t* dst, const Bf16Src& s, int64_t i, int64_t k0, int64_t n,
                 bool along_i = false) {
  const int64_t o = along_i ? k0 * s.rs + i * s.cs : i * s.rs + k0 * s.cs;
  const int64_t step = along_i ? s.rs : s.cs;
  if (s.f32 && step == 1) return round_contiguous(dst, s.f32 + o, n);
#if DSV3_LOWP_X86
  if (!s.f32 && step == 1 && s.signed_table && have_bw())
    return decode_run_bw(dst, s.codes + o, n, s.table);
#endif
  if (s.f32)
    for (int64_t k = 0; k < n; ++k) dst[k] = bf16_encode(s.f32[o + k * step]);
  else
    for (int64_t k = 0; k < n; ++k) dst[k] = s.table[s.codes[o + k * step]];
}

void check_src(const Bf16Src& s) {
  if (!s.f32 && !(s.codes && s.table))
    throw std::runtime_error("[lowp_gemm] operand has neither fp32 values nor codes + table");
}

}  // namespace

LowpTier lowp_tier() { return tier_info().tier; }
const std::string& lowp_tier_reason() { return tier_info().reason; }
const char* lowp_tier_name(LowpTier t) {
  return t == LowpTier::amx_bf16 ? "amx-bf16" : t == LowpTier::avx512_bf16 ? "avx512-bf16" : "fp32";
}

// Blocks of 16 rows x 64 k: reads are contiguous in either layout of the source (rows when
// cs = 1, the 16 rows' column when rs = 1), writes sequential per row. The pad (k >= K, rows
// >= M: lowp_gemm_amx.h) is written as zeros: `out` may hold an earlier product's values.
void bf16_pack_a(Bf16Buf& out, const Bf16Src& a, int64_t M, int64_t K) {
  check_src(a);
  const int64_t Kp = packed_k(K), Mp = lowp::packed_rows(M);
  out.resize((size_t)(Mp * Kp));
  uint16_t* o = out.data();
  std::fill(o + M * Kp, o + Mp * Kp, uint16_t(0));
  if (a.cs == 1 || a.rs != 1) {  // rows are runs: convert row by row
    parallel_for(M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        convert_run(o + m * Kp, a, m, 0, K);
        std::fill(o + m * Kp + K, o + (m + 1) * Kp, uint16_t(0));
      }
    });
    return;
  }
  constexpr int64_t RB = 16, KB = 64;  // columns are runs (a transposed view)
  const int64_t rb = (M + RB - 1) / RB, kb = (K + KB - 1) / KB;
  parallel_for(rb * kb, 4, [&](int64_t t0, int64_t t1) {
    uint16_t tmp[KB * RB];  // the block converted column by column (contiguous runs), then
                            // transposed as words
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = (t / kb) * RB, k0 = (t % kb) * KB;
      const int64_t m1 = std::min(M, m0 + RB), k1 = std::min(K, k0 + KB);
      for (int64_t k = k0; k < k1; ++k) convert_run(tmp + (k - k0) * RB, a, k, m0, m1 - m0, true);
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t k = k0; k < k1; ++k) o[m * Kp + k] = tmp[(k - k0) * RB + (m - m0)];
      if (k1 == K)
        for (int64_t m = m0; m < m1; ++m) std::fill(o + m * Kp + K, o + (m + 1) * Kp, uint16_t(0));
    }
  });
}

void bf16_pack_b(Bf16PackedB& out, const Bf16Src& b, int64_t N, int64_t K) {
  check_src(b);
  // pairs: the panel's pair rows (K padded, lowp_gemm_amx.h); the tasks fill the first
  // `filled` (k < K), the rest are zeroed here
  const int64_t panels = (N + kNR - 1) / kNR, pairs = packed_k(K) / 2, filled = (K + 1) / 2;
  out.N = N;
  out.K = K;
  out.data.resize((size_t)(panels * pairs * kNR * 2));
  for (int64_t j = 0; j < panels; ++j)
    std::fill(out.data.begin() + (j * pairs + filled) * kNR * 2,
              out.data.begin() + (j + 1) * pairs * kNR * 2, uint16_t(0));
  constexpr int64_t QB = 32;  // pairs per task
  const int64_t qb = (filled + QB - 1) / QB;
  parallel_for(panels * qb, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j = t / qb, q0 = (t % qb) * QB, q1 = std::min(filled, q0 + QB);
      uint16_t* panel = out.data.data() + j * pairs * kNR * 2;
      if (b.cs == 1 || b.rs != 1) {  // rows of B are runs: convert a run, scatter its pairs
        uint16_t run[2 * QB];
        for (int64_t l = 0; l < kNR; ++l) {
          const int64_t n = j * kNR + l, k0 = 2 * q0, len = std::min(K, 2 * q1) - k0;
          if (n < N) convert_run(run, b, n, k0, len);
          for (int64_t i = n < N ? len : 0; i < 2 * (q1 - q0); ++i) run[i] = 0;
          for (int64_t q = q0; q < q1; ++q)
            std::memcpy(panel + (q * kNR + l) * 2, run + 2 * (q - q0), 4);
        }
      } else if (!b.f32 && b.signed_table && have_bw()) {  // B^T codes: vector pairs
#if DSV3_LOWP_X86
        const int64_t w = std::min(kNR, N - j * kNR);
        for (int64_t q = q0; q < q1; ++q) {
          const uint8_t* r0 = b.codes + j * kNR + 2 * q * b.cs;
          pack_pair_bw(panel + q * kNR * 2, r0, 2 * q + 1 < K ? r0 + b.cs : nullptr, w, b.table);
        }
#endif
      } else if (b.f32) {  // B^T fp32: vector pairs
        const int64_t w = std::max<int64_t>(0, std::min(kNR, N - j * kNR));
        for (int64_t q = q0; q < q1; ++q) {
          const float* r0 = b.f32 + j * kNR + 2 * q * b.cs;
          pack_pair_f32(panel + q * kNR * 2, r0, 2 * q + 1 < K ? r0 + b.cs : nullptr, w, kNR);
        }
      } else {  // B^T is stored (rs == 1): lanes are contiguous in the source
        for (int64_t q = q0; q < q1; ++q)
          for (int64_t h = 0; h < 2; ++h)
            for (int64_t l = 0; l < kNR; ++l) {
              const int64_t n = j * kNR + l, k = 2 * q + h;
              panel[(q * kNR + l) * 2 + h] = n < N && k < K ? fetch(b, n, k) : 0;
            }
      }
    }
  });
}

// ---- the avx512-bf16 microkernel ---------------------------------------------------------------
#if DSV3_LOWP_X86
namespace {

#define DSV3_UNROLL _Pragma("GCC unroll 16")

// C[0:MR, 0:16*NV] over bf16 pairs [q0, q1): acc = sum a*b (vdpbf16ps), then
//   Scaled: r = (acc * sa[row]) * sb[col];  unscaled: r = acc
//   C = r (overwrite) or C + r. The last vector of each row is stored under `mask`.
template <int MR, int NV, bool Scaled>
__attribute__((target("avx512f,avx512bf16"))) void tile(const uint16_t* A, int64_t lda,
                                                        const uint16_t* Bp, int64_t q0,
                                                        int64_t q1, float* C, int64_t ldc,
                                                        const float* sa, const float* sb,
                                                        bool overwrite, __mmask16 mask) {
  __m512 c[MR][NV];
  DSV3_UNROLL
  for (int r = 0; r < MR; ++r)
    DSV3_UNROLL
    for (int v = 0; v < NV; ++v) c[r][v] = _mm512_setzero_ps();
  for (int64_t q = q0; q < q1; ++q) {
    const uint16_t* bq = Bp + q * kNR * 2;
    __m512bh b[NV];
    DSV3_UNROLL
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(bq + 32 * v);
    DSV3_UNROLL
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + 2 * q, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      DSV3_UNROLL
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], a, b[v]);
    }
  }
  DSV3_UNROLL
  for (int r = 0; r < MR; ++r) {
    const __m512 s = Scaled ? _mm512_set1_ps(sa[r]) : _mm512_setzero_ps();
    DSV3_UNROLL
    for (int v = 0; v < NV; ++v) {
      float* dst = C + r * ldc + 16 * v;
      const __mmask16 m = v == NV - 1 ? mask : (__mmask16)0xFFFF;
      __m512 x = c[r][v];
      if (Scaled) x = _mm512_mul_ps(_mm512_mul_ps(x, s), _mm512_loadu_ps(sb + 16 * v));
      if (!overwrite) x = _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst), x);
      _mm512_mask_storeu_ps(dst, m, x);
    }
  }
}

using TileFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, float*,
                        int64_t, const float*, const float*, bool, __mmask16);

template <bool S>
TileFn tile_fn(int mr, int nv) {  // mr in 1..kMR, nv in 1..4
  static const TileFn t[kMR][4] = {
      {tile<1, 1, S>, tile<1, 2, S>, tile<1, 3, S>, tile<1, 4, S>},
      {tile<2, 1, S>, tile<2, 2, S>, tile<2, 3, S>, tile<2, 4, S>},
      {tile<3, 1, S>, tile<3, 2, S>, tile<3, 3, S>, tile<3, 4, S>},
      {tile<4, 1, S>, tile<4, 2, S>, tile<4, 3, S>, tile<4, 4, S>},
      {tile<5, 1, S>, tile<5, 2, S>, tile<5, 3, S>, tile<5, 4, S>},
      {tile<6, 1, S>, tile<6, 2, S>, tile<6, 3, S>, tile<6, 4, S>}};
  return t[mr - 1][nv - 1];
}

// One task: rows [i0, i1) x panel j, every K chunk in order (chunk loop outside the row
// tiles, so the chunk's B sub-panel stays in cache for all of them). Scaled mode: the scale
// rows of the task's A rows and B lanes are looked up once (integer divisions by the block
// sizes per chunk and tile were 10% of a 512 x 1024 x 512 FP8 GEMM), their columns per chunk.
void gemm_task(float* C, int64_t ldc, const uint16_t* A, int64_t i0, int64_t i1,
               const Bf16PackedB& B, int64_t j, const LowpScales* s, bool accumulate) {
  const int64_t N = B.N, K = B.K, Kp = packed_k(K), pairs = Kp / 2;
  const int64_t n0 = j * kNR, w = std::min(kNR, N - n0);
  const int nv = (int)((w + 15) / 16);
  const int tail = (int)(w - 16 * (nv - 1));
  const __mmask16 mask = (__mmask16)(tail == 16 ? 0xFFFF : (1u << tail) - 1);
  const uint16_t* panel = B.data.data() + j * pairs * kNR * 2;
  const int64_t chunk = s ? std::min(s->P, K) : kKC;
  float sb[kNR], sa[kMR];
  int64_t rb[kNR];            // scaled: offset of lane l's scale row in s->b
  std::vector<int64_t> ra;    // scaled: offset of row i0 + i's scale row in s->a
  if (s) {
    for (int64_t l = 0; l < 16 * nv; ++l) rb[l] = (std::min(n0 + l, N - 1) / s->b_rows) * s->b_ld;
    ra.resize((size_t)(i1 - i0));
    for (int64_t m = i0; m < i1; ++m) ra[(size_t)(m - i0)] = (m / s->a_rows) * s->a_ld;
  }
  for (int64_t k0 = 0; k0 < K; k0 += chunk) {
    const int64_t q0 = k0 / 2, q1 = (std::min(K, k0 + chunk) + 1) / 2;
    const int64_t ca = s ? k0 / s->a_cols : 0, cb = s ? k0 / s->b_cols : 0;
    if (s)
      for (int64_t l = 0; l < 16 * nv; ++l) sb[l] = s->b[rb[l] + cb];
    const bool overwrite = k0 == 0 && !accumulate;
    for (int64_t m = i0; m < i1; m += kMR) {
      const int mr = (int)std::min<int64_t>(kMR, i1 - m);
      if (s)
        for (int r = 0; r < mr; ++r) sa[r] = s->a[ra[(size_t)(m - i0 + r)] + ca];
      const TileFn fn = s ? tile_fn<true>(mr, nv) : tile_fn<false>(mr, nv);
      fn(A + m * Kp, Kp, panel, q0, q1, C + m * ldc + n0, ldc, sa, sb, overwrite, mask);
    }
  }
}

}  // namespace
#endif

void bf16_gemm_packed(float* C, int64_t ldc, const uint16_t* A, int64_t M, const Bf16PackedB& B,
                      const LowpScales* scales, bool accumulate) {
  const int64_t N = B.N, K = B.K;
  if (M <= 0 || N <= 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0.f);
    return;
  }
  if (scales && scales->P < K && scales->P % 2 != 0)
    throw std::runtime_error("[lowp_gemm] promotion chunk must be even or cover K");
#if DSV3_LOWP_X86
  if (lowp_tier() == LowpTier::amx_bf16 && lowp::amx_takes(M, K, scales))
    return lowp::amx_gemm(C, ldc, A, M, B, scales, accumulate, tier_info().amx);
  if (lowp_tier() != LowpTier::fp32) {
    // Row blocks of about kMB rows, whole register tiles spread evenly. parallel_for cuts the
    // tasks into num_threads() contiguous chunks; with at least nt blocks their count is
    // rounded up to a multiple of nt so that equal chunks hold equal rows (M = 512 on 2
    // threads in kMB blocks split 288 / 224 rows). Fewer rows than nt blocks: one block, the
    // chunks split the panels (each thread streams its part of B only). Nested calls run
    // inline: nt = 1. The blocks only group whole tiles: no C element's arithmetic depends on
    // them.
    const int64_t tiles = (M + kMR - 1) / kMR, panels = (N + kNR - 1) / kNR;
    const int64_t nt = in_parallel() ? 1 : std::max<int64_t>(1, num_threads());
    int64_t mb = (M + kMB - 1) / kMB;
    if (mb >= nt) mb = std::min(tiles, (mb + nt - 1) / nt * nt);
    // row block outer, panel inner: a thread's consecutive tasks share one A block
    parallel_for(mb * panels, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / panels;
        const int64_t i0 = kMR * (b * tiles / mb), i1 = std::min(M, kMR * ((b + 1) * tiles / mb));
        gemm_task(C, ldc, A, i0, i1, B, t % panels, scales, accumulate);
      }
    });
    return;
  }
#endif
  throw std::runtime_error("[lowp_gemm] bf16_gemm_packed called on the fp32 tier");
}

void bf16_gemm(float* C, int64_t ldc, const Bf16Src& a, const Bf16Src& b, int64_t M, int64_t N,
               int64_t K, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (lowp_tier() != LowpTier::fp32) {
    Bf16Buf pa;
    Bf16PackedB pb;
    bf16_pack_a(pa, a, M, K);
    bf16_pack_b(pb, b, N, K);
    bf16_gemm_packed(C, ldc, pa.data(), M, pb, nullptr, accumulate);
    return;
  }
  // fp32 tier: the operands rounded to bf16 (exactly representable in fp32), then sgemm
  std::vector<float> fa((size_t)(M * K)), fb((size_t)(N * K));
  const auto widen = bf16_decode;
  parallel_for(M, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i)
      for (int64_t k = 0; k < K; ++k) fa[i * K + k] = widen(fetch(a, i, k));
  });
  parallel_for(N, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i)
      for (int64_t k = 0; k < K; ++k) fb[i * K + k] = widen(fetch(b, i, k));
  });
  sgemm(false, true, M, N, K, 1.f, fa.data(), K, fb.data(), K, accumulate ? 1.f : 0.f, C, ldc);
}

}  // namespace dsv3
