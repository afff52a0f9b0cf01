#include "kernels/fp8_gemm.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/blas.h"
#include "core/lowp_gemm.h"
#include "core/check.h"
#include "core/parallel.h"
#include "core/simd.h"
#include "kernels/fp8_codec.h"

// This file's 64-byte vector helpers are always inlined (see fp8_codec.h): no ABI concern, so
// GCC's note about passing such vectors is silenced here, not in every includer of the header.
#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace dsv3 {

using namespace fp8_detail;

namespace {

constexpr int kMR = 8;       // rows of A per register tile of the emulated kernel
constexpr int kNL = kLanes;  // columns of B per register tile: one 16-lane vector
                             // (VecF/VecI of fp8_codec.h: a zmm in the AVX-512 clone)

// s <- trunc_k(s + p), lane-wise. r = fl(s + p) and e = (s + p) - r exactly (TwoSum). If r has
// bits below the k-bit grid, the exact sum truncates like r (no grid point lies within half
// an fp32 ulp of r); if r is on the grid and the exact sum is slightly smaller in magnitude (e
// nonzero, of the other sign), the answer is the grid point below r. Both cases are
// (bits(r) - [e points toward zero]) & mask: decrementing an off-grid r only touches bits the
// mask drops. Sums of fp8 products are never fp32 subnormal, so the k-bit grid is a fixed
// mantissa mask.
DSV3_FP8_INLINE VecF trunc_add(VecF s, VecF p, VecI mask) {
  const VecF r = s + p;
  const VecF bp = r - s;
  const VecF e = (s - (r - bp)) + (p - bp);
  const VecI rb = (VecI)r, eb = (VecI)e;
  // -1 where e != 0 and sign(e) != sign(r), else 0, with shifts (GCC 12 scalarized the
  // AND of two vector comparisons here)
  const VecI e_mag = eb & 0x7fffffff;
  const VecI toward_zero = ((eb ^ rb) >> 31) & ((e_mag | -e_mag) >> 31);
  return (VecF)((rb + toward_zero) & mask);
}

struct EmulatedArgs {
  const float* A;    // [M,K] decoded, unscaled
  const float* Bp;   // [ceil(N/kNL), K, kNL] decoded, unscaled, zero-padded lanes
  const float* zero_row;  // K zeros (rows of A past M)
  const Fp8Operand* a;
  const Fp8Operand* b;
  int64_t M, N, K, P, Ka, Kb;
  uint32_t mask;
  float* C;
  bool accumulate;
};

// One kMR x kNL tile of C: limited sums per interval, promoted into fp32 accumulators.
DSV3_SIMD_CLONES void emulated_tile(const EmulatedArgs& g, int64_t m0, int64_t grp) {
  const int64_t K = g.K, n0 = grp * kNL;
  const float* arow[kMR];
  for (int r = 0; r < kMR; ++r) arow[r] = m0 + r < g.M ? g.A + (m0 + r) * K : g.zero_row;
  VecF acc[kMR];
  for (int r = 0; r < kMR; ++r) acc[r] = VecF{};
  VecI mask;
  for (int l = 0; l < kNL; ++l) mask[l] = (int32_t)g.mask;
  for (int64_t p0 = 0; p0 < K; p0 += g.P) {
    const int64_t p1 = std::min(K, p0 + g.P);
    VecF s[kMR];
    for (int r = 0; r < kMR; ++r) s[r] = VecF{};
    for (int64_t k = p0; k < p1; ++k) {
      VecF bk;
      std::memcpy(&bk, g.Bp + (grp * K + k) * kNL, sizeof bk);
      for (int r = 0; r < kMR; ++r)
        s[r] = trunc_add(s[r], arow[r][k] * bk, mask);  // products exact: fp8 x fp8 fits fp32
    }
    // promotion: C += partial * sa * sb, in fp32
    const int64_t ca = p0 / g.a->block.cols, cb = p0 / g.b->block.cols;
    VecF sb;
    for (int l = 0; l < kNL; ++l) {
      const int64_t n = std::min(n0 + l, g.N - 1);
      sb[l] = g.b->scales[(n / g.b->block.rows) * g.Kb + cb];
    }
    for (int r = 0; r < kMR; ++r) {
      const int64_t m = std::min(m0 + r, g.M - 1);
      const float sa = g.a->scales[(m / g.a->block.rows) * g.Ka + ca];
      acc[r] += (s[r] * sa) * sb;
    }
  }
  for (int r = 0; r < kMR && m0 + r < g.M; ++r)
    for (int l = 0; l < kNL && n0 + l < g.N; ++l) {
      float& c = g.C[(m0 + r) * g.N + n0 + l];
      c = g.accumulate ? c + acc[r][l] : acc[r][l];
    }
}

void emulated_gemm(float* C, const Fp8Operand& a, const Fp8Operand& b, int64_t M, int64_t N,
                   int64_t K, const Fp8GemmOptions& opts, bool accumulate) {
  std::vector<float> A((size_t)(M * K));
  fp8_decode(A.data(), a.codes, M * K, a.fmt);
  const int64_t groups = fp8_blocks(N, kNL);
  std::vector<float> Bp((size_t)(groups * K * kNL), 0.f), zero((size_t)K, 0.f);
  {  // decode B into kNL-wide panels, k-major inside a panel
    std::vector<float> Bd((size_t)(N * K));
    fp8_decode(Bd.data(), b.codes, N * K, b.fmt);
    parallel_for(groups, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g)
        for (int64_t l = 0; l < kNL && g * kNL + l < N; ++l) {
          const float* src = Bd.data() + (g * kNL + l) * K;
          float* dst = Bp.data() + g * K * kNL + l;
          for (int64_t k = 0; k < K; ++k) dst[k * kNL] = src[k];
        }
    });
  }
  EmulatedArgs g;
  g.A = A.data();
  g.Bp = Bp.data();
  g.zero_row = zero.data();
  g.a = &a;
  g.b = &b;
  g.M = M;
  g.N = N;
  g.K = K;
  g.P = opts.promotion_interval == 0 ? K : opts.promotion_interval;
  g.Ka = fp8_blocks(K, a.block.cols);
  g.Kb = fp8_blocks(K, b.block.cols);
  g.mask = ~((1u << (24 - opts.accumulator_bits)) - 1u);
  g.C = C;
  g.accumulate = accumulate;
  const int64_t mtiles = fp8_blocks(M, kMR);
  parallel_for(mtiles * groups, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) emulated_tile(g, (t / groups) * kMR, t % groups);
  });
}

// The exact mode on a bf16 tier (lowp_gemm.h): codes decoded to bf16 through a 256-entry table
// (every E4M3/E5M2 value is a bf16 value), products exact, a fresh fp32 sum per promotion
// chunk, promoted C += (partial * sa) * sb. Needs an even chunk (bf16 pairs) unless one chunk
// covers K.
const uint16_t* bf16_table(Fp8Format fmt) {
  static const auto make = [](Fp8Format f) {
    std::vector<uint16_t> t(256);
    uint8_t codes[256];
    float vals[256];
    for (int i = 0; i < 256; ++i) codes[i] = (uint8_t)i;
    fp8_decode(vals, codes, 256, f);
    for (int i = 0; i < 256; ++i) t[i] = bf16_encode(vals[i]);
    return t;
  };
  static const std::vector<uint16_t> e4m3 = make(Fp8Format::e4m3), e5m2 = make(Fp8Format::e5m2);
  return fmt == Fp8Format::e5m2 ? e5m2.data() : e4m3.data();
}

// table[c | 0x80] == table[c] | 0x8000: true of both formats (sign-magnitude codes, NaN kept
// with its sign); checked once per table rather than assumed
bool table_is_signed(const uint16_t* t) {
  static const auto check = [](const uint16_t* u) {
    for (int c = 0; c < 128; ++c)
      if (u[c | 0x80] != (uint16_t)(u[c] | 0x8000)) return false;
    return true;
  };
  static const bool e4m3 = check(bf16_table(Fp8Format::e4m3)),
                    e5m2 = check(bf16_table(Fp8Format::e5m2));
  return t == bf16_table(Fp8Format::e4m3) ? e4m3 : t == bf16_table(Fp8Format::e5m2) ? e5m2 : check(t);
}

Bf16Src code_src(const uint8_t* codes, Fp8Format fmt, int64_t rs, int64_t cs) {
  Bf16Src s;
  s.codes = codes;
  s.table = bf16_table(fmt);
  s.signed_table = table_is_signed(s.table);
  s.rs = rs;
  s.cs = cs;
  return s;
}

LowpScales lowp_scales(const Fp8Operand& a, const Fp8Operand& b, int64_t K,
                       const Fp8GemmOptions& opts) {
  LowpScales s;
  s.a = a.scales;
  s.a_rows = a.block.rows;
  s.a_cols = a.block.cols;
  s.a_ld = fp8_blocks(K, a.block.cols);
  s.b = b.scales;
  s.b_rows = b.block.rows;
  s.b_cols = b.block.cols;
  s.b_ld = fp8_blocks(K, b.block.cols);
  s.P = opts.promotion_interval == 0 ? K : opts.promotion_interval;
  return s;
}

void check_operand(const Fp8Operand& o, int64_t rows, int64_t K, const char* name) {
  DSV3_CHECK(fp8_format_info(o.fmt).byte_codes, "[fp8.gemm] ", name, " format must be \"e4m3\" ",
             "or \"e5m2\", got \"", fp8_format_info(o.fmt).name, "\"");
  DSV3_CHECK(o.block.rows >= 1 && o.block.cols >= 1, "[fp8.gemm] ", name,
             " scale block sizes must be >= 1, got (", o.block.rows, ", ", o.block.cols, ")");
  DSV3_CHECK(rows * K == 0 || (o.codes && o.scales), "[fp8.gemm] ", name, " codes/scales missing");
}

}  // namespace

void fp8_gemm_check(const Fp8Operand& a, const Fp8Operand& b, int64_t M, int64_t N, int64_t K,
                    const Fp8GemmOptions& opts) {
  DSV3_CHECK(M >= 0 && N >= 0 && K >= 0, "[fp8.gemm] negative size M=", M, " N=", N, " K=", K);
  check_operand(a, M, K, "a");
  check_operand(b, N, K, "b");
  DSV3_CHECK(opts.accumulator_bits >= 0 && opts.accumulator_bits <= 24, "[fp8.gemm] ",
             "accumulator_bits must be in [1, 24] (fp32 keeps 24) or None, got ",
             opts.accumulator_bits);
  DSV3_CHECK(opts.promotion_interval >= 0, "[fp8.gemm] promotion_interval must be a positive ",
             "integer or None, got ", opts.promotion_interval);
  const int64_t P = opts.promotion_interval == 0 ? K : opts.promotion_interval;
  for (const Fp8Operand* o : {&a, &b}) {
    const int64_t kb = o->block.cols;
    DSV3_CHECK(K <= kb || (P > 0 && kb % P == 0), "[fp8.gemm] promotion_interval=",
               opts.promotion_interval == 0 ? std::string("None") : std::to_string(P),
               " does not fit the scales of ", o == &a ? "a" : "b", ": their chunks are ", kb,
               " wide along K=", K, ", and each promotion interval must lie in one chunk (an ",
               "interval that divides ", kb, "; promotion_interval=None needs one scale along ",
               "K, i.e. per-tensor scales)");
  }
}

void fp8_gemm(float* C, const Fp8Operand& a, const Fp8Operand& b, int64_t M, int64_t N,
              int64_t K, const Fp8GemmOptions& opts, bool accumulate) {
  fp8_gemm_check(a, b, M, N, K, opts);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate) std::fill(C, C + M * N, 0.f);
    return;
  }
  if (opts.accumulator_bits != 0) {
    emulated_gemm(C, a, b, M, N, K, opts, accumulate);
    return;
  }
  if (fp8_gemm_packable(K, opts)) {
    Bf16PackedB pb;
    fp8_pack_b(pb, b.codes, b.fmt, N, K, false);
    fp8_gemm(C, a, b, pb, M, N, K, opts, accumulate);
    return;
  }
  std::vector<float> A((size_t)(M * K)), B((size_t)(N * K));
  fp8_dequantize(A.data(), a.codes, a.scales, M, K, a.block, a.fmt);
  fp8_dequantize(B.data(), b.codes, b.scales, N, K, b.block, b.fmt);
  sgemm(false, true, M, N, K, 1.f, A.data(), K, B.data(), K, accumulate ? 1.f : 0.f, C, N);
}

bool fp8_gemm_packable(int64_t K, const Fp8GemmOptions& opts) {
  const int64_t P = opts.promotion_interval == 0 ? K : opts.promotion_interval;
  return opts.accumulator_bits == 0 && lowp_tier() != LowpTier::fp32 && (P % 2 == 0 || P >= K);
}

void fp8_pack_b(Bf16PackedB& out, const uint8_t* codes, Fp8Format fmt, int64_t N, int64_t K,
                bool transposed) {
  bf16_pack_b(out, transposed ? code_src(codes, fmt, 1, N) : code_src(codes, fmt, K, 1), N, K);
}

void fp8_gemm(float* C, const Fp8Operand& a, const Fp8Operand& b, const Bf16PackedB& b_panels,
              int64_t M, int64_t N, int64_t K, const Fp8GemmOptions& opts, bool accumulate) {
  fp8_gemm_check(a, b, M, N, K, opts);
  DSV3_CHECK(fp8_gemm_packable(K, opts) && b_panels.N == N && b_panels.K == K,
             "[fp8.gemm] packed B of ", b_panels.N, "x", b_panels.K, " used for ", N, "x", K,
             " or outside the packable case");
  if (M == 0 || N == 0) return;
  Bf16Buf pa;
  bf16_pack_a(pa, code_src(a.codes, a.fmt, K, 1), M, K);
  const LowpScales s = lowp_scales(a, b, K, opts);
  bf16_gemm_packed(C, N, pa.data(), M, b_panels, &s, accumulate);
}

}  // namespace dsv3
