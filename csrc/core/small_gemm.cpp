#include "core/small_gemm.h"

#include "core/env.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "core/blas.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DSV3_SMALL_GEMM_AVX512 1
#include <immintrin.h>
#endif

namespace dsv3 {

#if DSV3_SMALL_GEMM_AVX512
namespace {

// The tile loops must be unrolled completely, or GCC keeps the accumulators in memory.
#define DSV3_UNROLL _Pragma("GCC unroll 16")

constexpr int kMR = 8;       // rows of C per tile
constexpr int kNV = 2;       // 16-float vectors of C per tile row
constexpr int kNR = 16 * kNV;
constexpr int64_t kPackMaxK = 1024;  // B panels of up to 1024 rows are packed (see below)

// C[0:MR, 0:16*NV] (+)= alpha * sum_p A[r*a_rs + p*a_cs] * B[p*ldb + 0:16*NV]; the last vector
// of each row is restricted to `mask` (masked loads never touch the lanes left out).
template <int MR, int NV>
__attribute__((target("avx512f"))) void tile(int64_t K, const float* A, int64_t a_rs,
                                             int64_t a_cs, const float* B, int64_t ldb, float* C,
                                             int64_t ldc, float alpha, bool accumulate,
                                             __mmask16 mask) {
  __m512 c[MR][NV];
  DSV3_UNROLL
  for (int r = 0; r < MR; ++r)
    DSV3_UNROLL
    for (int v = 0; v < NV; ++v) c[r][v] = _mm512_setzero_ps();
  const float* ar[MR];
  DSV3_UNROLL
  for (int r = 0; r < MR; ++r) ar[r] = A + r * a_rs;
  for (int64_t p = 0; p < K; ++p) {
    const float* bp = B + p * ldb;
    __m512 b[NV];
    DSV3_UNROLL
    for (int v = 0; v < NV - 1; ++v) b[v] = _mm512_loadu_ps(bp + 16 * v);
    b[NV - 1] = _mm512_maskz_loadu_ps(mask, bp + 16 * (NV - 1));
    const int64_t off = p * a_cs;
    DSV3_UNROLL
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(ar[r][off]);
      DSV3_UNROLL
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
    }
  }
  const __m512 al = _mm512_set1_ps(alpha);
  DSV3_UNROLL
  for (int r = 0; r < MR; ++r)
    DSV3_UNROLL
    for (int v = 0; v < NV; ++v) {
      float* dst = C + r * ldc + 16 * v;
      const __mmask16 m = v == NV - 1 ? mask : (__mmask16)0xFFFF;
      const __m512 x = accumulate ? _mm512_fmadd_ps(c[r][v], al, _mm512_maskz_loadu_ps(m, dst))
                                  : _mm512_mul_ps(c[r][v], al);
      _mm512_mask_storeu_ps(dst, m, x);
    }
}

using TileFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*,
                        int64_t, float, bool, __mmask16);

TileFn tile_fn(int mr, int nv) {  // mr in 1..kMR rows, nv in 1..kNV vectors
  static const TileFn table[kMR][kNV] = {
      {tile<1, 1>, tile<1, 2>}, {tile<2, 1>, tile<2, 2>}, {tile<3, 1>, tile<3, 2>},
      {tile<4, 1>, tile<4, 2>}, {tile<5, 1>, tile<5, 2>}, {tile<6, 1>, tile<6, 2>},
      {tile<7, 1>, tile<7, 2>}, {tile<8, 1>, tile<8, 2>}};
  return table[mr - 1][nv - 1];
}

// Wider tiles when N is a multiple of a head width (64 or 96 columns, never a partial
// vector): each broadcast of A then feeds 4 or 6 FMAs instead of 2; 24 accumulators each.
TileFn wide_tile_fn(int mr, int nv) {
  static const TileFn w4[6] = {tile<1, 4>, tile<2, 4>, tile<3, 4>, tile<4, 4>, tile<5, 4>,
                               tile<6, 4>};
  static const TileFn w6[4] = {tile<1, 6>, tile<2, 6>, tile<3, 6>, tile<4, 6>};
  return nv == 4 ? w4[mr - 1] : w6[mr - 1];
}

// Column panels outside, row tiles inside: a K x NR panel of B is reused by every row tile.
void small_gemm_avx512(bool trans_a, int64_t M, int64_t N, int64_t K, float alpha,
                       const float* A, int64_t lda, const float* B, int64_t ldb, bool accumulate,
                       float* C, int64_t ldc) {
  const int64_t a_rs = trans_a ? 1 : lda, a_cs = trans_a ? lda : 1;
  // (measured on the attention shapes: wider tiles win for op(A) = A^T, whose broadcasts
  // come from one row of A, and lose where B is a long panel streamed from L2)
  const int wide_nv = !trans_a ? 0 : N % 96 == 0 ? 6 : N % 64 == 0 ? 4 : 0;
  const int64_t NR = wide_nv ? 16 * wide_nv : kNR;
  const int MR = wide_nv == 6 ? 4 : wide_nv == 4 ? 6 : kMR;
  // A panel used by several row tiles is first copied to contiguous rows: B's own rows are
  // often a power of two apart (a head's rows in [T, H, D] activations), and then the panel
  // does not stay in L1 between tiles.
  const bool pack = M > 8 * MR && K <= kPackMaxK;
  thread_local std::vector<float> panel;
  if (pack && panel.size() < (size_t)(kPackMaxK * NR)) panel.resize((size_t)(kPackMaxK * NR));
  for (int64_t j0 = 0; j0 < N; j0 += NR) {
    const int64_t w = std::min<int64_t>(NR, N - j0);
    const int nv = (int)((w + 15) / 16);
    const int tail = (int)(w - 16 * (nv - 1));  // 1..16 columns in the last vector
    const __mmask16 mask = (__mmask16)(tail == 16 ? 0xFFFF : (1u << tail) - 1);
    const float* bp = B + j0;
    int64_t ldp = ldb;
    if (pack) {
      for (int64_t p = 0; p < K; ++p) std::copy_n(B + p * ldb + j0, w, panel.data() + p * NR);
      bp = panel.data();
      ldp = NR;
    }
    for (int64_t i0 = 0; i0 < M; i0 += MR) {
      const int mr = (int)std::min<int64_t>(MR, M - i0);
      const TileFn fn = wide_nv ? wide_tile_fn(mr, wide_nv) : tile_fn(mr, nv);
      fn(K, A + i0 * a_rs, a_rs, a_cs, bp, ldp, C + i0 * ldc + j0, ldc, alpha, accumulate, mask);
    }
  }
}

// GCC 12's intrinsics headers trip -Wmaybe-uninitialized on the shuffles below (their
// _mm512_undefined_ps); nothing here reads an uninitialised value.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// 16 x 16 blocks transposed in registers (unpack, then shuffles within and across 128-bit
// lanes): c[j] <- column j of the rows r[0..16).
__attribute__((target("avx512f"))) inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + j], 128-bit lane k: rows 4i..4i+3 of column 4k + j
    u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 a = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88);
    const __m512 b = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xDD);
    const __m512 c = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
    const __m512 d = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xDD);
    r[j] = _mm512_shuffle_f32x4(a, c, 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(a, c, 0xDD);
    r[4 + j] = _mm512_shuffle_f32x4(b, d, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(b, d, 0xDD);
  }
}

__attribute__((target("avx512f"))) void transpose_rows_avx512(float* dst, int64_t ldd,
                                                              const float* src, int64_t lds,
                                                              int64_t n, int64_t K) {
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t w = std::min<int64_t>(16, n - j0);
    const __mmask16 wm = (__mmask16)(w == 16 ? 0xFFFF : (1u << w) - 1);
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
      const int64_t h = std::min<int64_t>(16, K - k0);
      const __mmask16 hm = (__mmask16)(h == 16 ? 0xFFFF : (1u << h) - 1);
      __m512 r[16];
      for (int64_t i = 0; i < 16; ++i)
        r[i] = i < w ? _mm512_maskz_loadu_ps(hm, src + (j0 + i) * lds + k0) : _mm512_setzero_ps();
      transpose16(r);
      for (int64_t c = 0; c < h; ++c) _mm512_mask_storeu_ps(dst + (k0 + c) * ldd + j0, wm, r[c]);
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

bool detect() {
  if (!env_settings().small_gemm) return false;  // DSV3_SMALL_GEMM=0: always sgemm
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}

}  // namespace
#endif

bool small_gemm_vectorized() {
#if DSV3_SMALL_GEMM_AVX512
  static const bool on = detect();
  return on;
#else
  return false;
#endif
}

void small_gemm(bool trans_a, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                int64_t lda, const float* B, int64_t ldb, bool accumulate, float* C,
                int64_t ldc) {
  if (M <= 0 || N <= 0) return;
#if DSV3_SMALL_GEMM_AVX512
  if (small_gemm_vectorized())
    return small_gemm_avx512(trans_a, M, N, K, alpha, A, lda, B, ldb, accumulate, C, ldc);
#endif
  sgemm(trans_a, false, M, N, K, alpha, A, lda, B, ldb, accumulate ? 1.f : 0.f, C, ldc);
}

void transpose_rows(float* dst, int64_t ldd, const float* src, int64_t lds, int64_t n,
                    int64_t K) {
#if DSV3_SMALL_GEMM_AVX512
  if (small_gemm_vectorized()) return transpose_rows_avx512(dst, ldd, src, lds, n, K);
#endif
  constexpr int64_t J = 16;  // rows of src per pass: each dst write is J contiguous floats
  for (int64_t j0 = 0; j0 < n; j0 += J) {
    const int64_t w = std::min(J, n - j0);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < w; ++j) dst[k * ldd + j0 + j] = src[(j0 + j) * lds + k];
  }
}

}  // namespace dsv3
