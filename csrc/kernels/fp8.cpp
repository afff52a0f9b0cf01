#include "kernels/fp8.h"

#include <algorithm>
#include <array>
#include <vector>

#include "core/check.h"
#include "core/parallel.h"
#include "core/simd.h"
#include "kernels/fp8_codec.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

// This file's 64-byte vector helpers are always inlined (see fp8_codec.h): no ABI concern, so
// GCC's note about passing such vectors is silenced here, not in every includer of the header.
#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace dsv3 {

using namespace fp8_detail;

namespace {

constexpr int64_t kGrain = 1 << 14;       // elements per task, below which threads do not pay
constexpr int64_t kFusedBlock = 1 << 18;  // elements of a scale block quantized in one visit
                                          // (1 MB of fp32: stays in L2 between the passes)

// ---- elementwise loops, one set per format, each cloned for AVX-512 / AVX2 / baseline ----
// A 16-lane vector body and a scalar tail running the same codec (fp8_codec.h).
template <class F>
DSV3_FP8_INLINE void cast_loop(float* __restrict out, const float* __restrict x, int64_t a,
                               int64_t b, bool sat) {
  int64_t i = a;
#if DSV3_FP8_VECTOR
  for (; i + kLanes <= b; i += kLanes) {
    VecU u;
    std::memcpy(&u, x + i, sizeof u);
    const VecU r = cast_bits<F>(u, sat);
    std::memcpy(out + i, &r, sizeof r);
  }
#endif
  for (; i < b; ++i) out[i] = float_of(cast_bits<F>(bits_of(x[i]), sat));
}
// scaled: the quantizers' x / scale, always saturating and finite (encode_finite_sat; `sat`
// is then not read)
template <class F>
DSV3_FP8_INLINE void encode_loop(uint8_t* __restrict codes, const float* __restrict x,
                                 int64_t a, int64_t b, bool sat, float scale = 1.f,
                                 bool scaled = false) {
  int64_t i = a;
#if DSV3_FP8_VECTOR
  for (; i + kLanes <= b; i += kLanes) {
    VecF v;
    std::memcpy(&v, x + i, sizeof v);
    if (scaled) v = v / scale;
    const VecU e = scaled ? encode_finite_sat<F>((VecU)v) : encode_bits<F>((VecU)v, sat);
    const VecU8 c = __builtin_convertvector(e, VecU8);
    std::memcpy(codes + i, &c, sizeof c);
  }
#endif
  for (; i < b; ++i)
    codes[i] = (uint8_t)(scaled ? encode_finite_sat<F>(bits_of(x[i] / scale))
                                : encode_bits<F>(bits_of(x[i]), sat));
}
// Decoding is a table lookup: 256 entries made once per format by decode_bits (so exactly
// the codec's values); a load per element beats the ~20 vector ops of the formula and the
// byte-to-lane widening, which GCC 12 compiles poorly inside target clones.
template <class F>
const float* decode_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (uint32_t c = 0; c < 256; ++c) t[c] = float_of(decode_bits<F>(c));
    return t;
  }();
  return table.data();
}
template <class F>
DSV3_FP8_INLINE void decode_loop(float* __restrict out, const uint8_t* __restrict codes,
                                 int64_t a, int64_t b, float scale = 1.f, bool scaled = false) {
  const float* lut = decode_table<F>();
  if (scaled)
    for (int64_t i = a; i < b; ++i) out[i] = lut[codes[i]] * scale;
  else
    for (int64_t i = a; i < b; ++i) out[i] = lut[codes[i]];
}
#if DSV3_FP8_VECTOR
// The largest lane, by halving (extracts and compares, not 16 scalar steps): per 128-block
// this reduction is as long as the block's own loop.
DSV3_FP8_INLINE uint32_t hmax(VecU v) {
  typedef uint32_t V8 __attribute__((vector_size(32)));
  typedef uint32_t V4 __attribute__((vector_size(16)));
  V8 a, b;
  std::memcpy(&a, &v, sizeof a);
  std::memcpy(&b, reinterpret_cast<const char*>(&v) + sizeof a, sizeof b);
  a = a > b ? a : b;
  V4 c, d;
  std::memcpy(&c, &a, sizeof c);
  std::memcpy(&d, reinterpret_cast<const char*>(&a) + sizeof c, sizeof d);
  c = c > d ? c : d;
  const uint32_t x = c[0] > c[1] ? c[0] : c[1], y = c[2] > c[3] ? c[2] : c[3];
  return x > y ? x : y;
}
#endif

// max |x| over [a, b) as fp32 bits: for non-negative floats the bit patterns order like the
// values, so an integer max is exact, order-free and vectorizes; NaN (bits > inf) wins.
DSV3_FP8_INLINE uint32_t amax_bits(const float* x, int64_t a, int64_t b) {
  uint32_t m = 0;
  int64_t i = a;
#if DSV3_FP8_VECTOR
  VecU mv = {};
  for (; i + kLanes <= b; i += kLanes) {
    VecU u;
    std::memcpy(&u, x + i, sizeof u);
    u &= 0x7fffffffu;
    mv = u > mv ? u : mv;
  }
  m = hmax(mv);
#endif
  for (; i < b; ++i) {
    const uint32_t v = bits_of(x[i]) & 0x7fffffffu;
    m = v > m ? v : m;
  }
  return m;
}

#define DSV3_FP8_CAST(NAME, F)                                                                \
  DSV3_SIMD_CLONES void cast_##NAME(float* out, const float* x, int64_t a, int64_t b,          \
                                    bool sat) {                                                \
    cast_loop<F>(out, x, a, b, sat);                                                           \
  }
#define DSV3_FP8_BYTES(NAME, F)                                                               \
  DSV3_SIMD_CLONES void encode_##NAME(uint8_t* c, const float* x, int64_t a, int64_t b,        \
                                      bool sat) {                                              \
    encode_loop<F>(c, x, a, b, sat);                                                           \
  }                                                                                            \
  DSV3_SIMD_CLONES void decode_##NAME(float* out, const uint8_t* c, int64_t a, int64_t b) {    \
    decode_loop<F>(out, c, a, b);                                                              \
  }                                                                                            \
  DSV3_SIMD_CLONES void encode_scaled_##NAME(uint8_t* c, const float* x, int64_t n, float s) { \
    encode_loop<F>(c, x, 0, n, true, s, true);                                                 \
  }                                                                                            \
  DSV3_SIMD_CLONES void decode_scaled_##NAME(float* out, const uint8_t* c, int64_t n,          \
                                             float s) {                                        \
    decode_loop<F>(out, c, 0, n, s, true);                                                     \
  }

DSV3_FP8_CAST(e4m3, E4M3)
DSV3_FP8_CAST(e5m2, E5M2)
DSV3_FP8_CAST(bf16, BF16)
DSV3_FP8_CAST(e5m6, E5M6)
DSV3_FP8_BYTES(e4m3, E4M3)
DSV3_FP8_BYTES(e5m2, E5M2)

DSV3_SIMD_CLONES uint32_t amax_range(const float* x, int64_t a, int64_t b) {
  return amax_bits(x, a, b);
}

// scale = max(amax, 1e-4) / fmt_max, optionally rounded up to a power of two. The scale is
// always an fp32 normal (>= 1e-4 / 57344), so the power-of-two rounding is a bit operation.
DSV3_FP8_INLINE float block_scale(uint32_t amax, float fmt_max, bool pow2) {
  float s = std::max(float_of(amax), 1e-4f) / fmt_max;
  if (pow2) {
    uint32_t u = bits_of(s);
    if (u & 0x7fffffu) u = (u & 0x7f800000u) + 0x800000u;
    s = float_of(u);
  }
  return s;
}

constexpr float kNanScale = __builtin_nanf("");  // a non-finite block's scale, reported later

// One task of fp8_quantize's one-visit path: blocks [b0, b1) of the block grid in row-major
// order, each read twice while in cache (amax, then encode). A non-finite block gets the NaN
// scale and no codes.
struct BlockTask {
  uint8_t* codes;
  float* scales;
  const float* x;
  int64_t R, C, br, bc, Cb;
  float fmax;
  bool pow2;
};
template <class F>
DSV3_FP8_INLINE void quantize_blocks_loop(const BlockTask& t, int64_t b0, int64_t b1) {
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t r0 = (blk / t.Cb) * t.br, r1 = std::min(t.R, r0 + t.br);
    const int64_t c0 = (blk % t.Cb) * t.bc, n = std::min(t.bc, t.C - c0);
    uint32_t amax = 0;
    for (int64_t r = r0; r < r1; ++r) amax = std::max(amax, amax_bits(t.x + r * t.C + c0, 0, n));
    if (amax >= 0x7f800000u) {
      t.scales[blk] = kNanScale;
      continue;
    }
    const float sc = block_scale(amax, t.fmax, t.pow2);
    t.scales[blk] = sc;
    for (int64_t r = r0; r < r1; ++r)
      encode_loop<F>(t.codes + r * t.C + c0, t.x + r * t.C + c0, 0, n, true, sc, true);
  }
}
DSV3_SIMD_CLONES void quantize_blocks_e4m3(const BlockTask& t, int64_t b0, int64_t b1) {
  quantize_blocks_loop<E4M3>(t, b0, b1);
}
DSV3_SIMD_CLONES void quantize_blocks_e5m2(const BlockTask& t, int64_t b0, int64_t b1) {
  quantize_blocks_loop<E5M2>(t, b0, b1);
}

// One tile of fp8_quantize_transposed: rows x n (n <= kTileCols) of x (row stride C), each
// column one scale block. Writes the n scales to s and the codes, row by row, to tile (row
// stride kTileCols); a non-finite column gets the NaN scale (its codes are unused).
constexpr int64_t kTileCols = 64;
template <class F>
DSV3_FP8_INLINE void quantize_tile_loop(uint8_t* __restrict tile, float* __restrict s,
                                        const float* __restrict x, int64_t C, int64_t rows,
                                        int64_t n, float fmax, bool pow2) {
  uint32_t amax[kTileCols] = {};
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t v = bits_of(x[r * C + j]) & 0x7fffffffu;
      amax[j] = v > amax[j] ? v : amax[j];
    }
  for (int64_t j = 0; j < n; ++j)
    s[j] = amax[j] >= 0x7f800000u ? kNanScale : block_scale(amax[j], fmax, pow2);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * C;
    uint8_t* out = tile + r * kTileCols;
    int64_t j = 0;
#if DSV3_FP8_VECTOR
    for (; j + kLanes <= n; j += kLanes) {
      VecF v, d;
      std::memcpy(&v, xr + j, sizeof v);
      std::memcpy(&d, s + j, sizeof d);
      const VecU8 c = __builtin_convertvector(encode_finite_sat<F>((VecU)(v / d)), VecU8);
      std::memcpy(out + j, &c, sizeof c);
    }
#endif
    for (; j < n; ++j) out[j] = (uint8_t)encode_finite_sat<F>(bits_of(xr[j] / s[j]));
  }
}
DSV3_SIMD_CLONES void quantize_tile_e4m3(uint8_t* tile, float* s, const float* x, int64_t C,
                                         int64_t rows, int64_t n, float fmax, bool pow2) {
  quantize_tile_loop<E4M3>(tile, s, x, C, rows, n, fmax, pow2);
}
DSV3_SIMD_CLONES void quantize_tile_e5m2(uint8_t* tile, float* s, const float* x, int64_t C,
                                         int64_t rows, int64_t n, float fmax, bool pow2) {
  quantize_tile_loop<E5M2>(tile, s, x, C, rows, n, fmax, pow2);
}

using EncodeScaledFn = void (*)(uint8_t*, const float*, int64_t, float);
using DecodeScaledFn = void (*)(float*, const uint8_t*, int64_t, float);

EncodeScaledFn encode_scaled_fn(Fp8Format f) {
  return f == Fp8Format::e4m3 ? encode_scaled_e4m3 : encode_scaled_e5m2;
}
DecodeScaledFn decode_scaled_fn(Fp8Format f) {
  return f == Fp8Format::e4m3 ? decode_scaled_e4m3 : decode_scaled_e5m2;
}

void check_bytes(Fp8Format fmt, const char* op) {
  DSV3_CHECK(fp8_format_info(fmt).byte_codes, "[fp8.", op, "] fmt \"", fp8_format_info(fmt).name,
             "\" has no 8-bit codes (it is cast-only); use \"e4m3\" or \"e5m2\"");
}

void check_block(int64_t R, int64_t C, Fp8Block block, const char* op) {
  DSV3_CHECK(block.rows >= 1 && block.cols >= 1, "[fp8.", op,
             "] block sizes must be >= 1, got block=(", block.rows, ", ", block.cols, ")");
  DSV3_CHECK(R >= 0 && C >= 0, "[fp8.", op, "] negative shape (", R, ", ", C, ")");
}

[[noreturn]] void throw_nonfinite(int64_t bi, int64_t bj, Fp8Block b, int64_t R, int64_t C) {
  throw NonFiniteError(str_cat(
      "[fp8.quantize] x must be finite: scale block (", bi, ", ", bj, ") (rows ", bi * b.rows,
      "..", std::min(R, (bi + 1) * b.rows) - 1, ", columns ", bj * b.cols, "..",
      std::min(C, (bj + 1) * b.cols) - 1, ") contains NaN or Inf"));
}

#if defined(__SSE2__)
// The 16 x 16 byte block at src (row stride ls) written transposed at dst (row stride ld).
// Four rounds of unpacks, each interleaving the registers pairwise (2i, 2i+1) at a doubling
// width (1, 2, 4, 8 bytes), leave column c of the block, in row order, in register
// bitrev4(c) (checked by simulating the rounds on labelled bytes).
inline void transpose16(uint8_t* dst, int64_t ld, const uint8_t* src, int64_t ls) {
  __m128i v[16], t[16];
  for (int r = 0; r < 16; ++r) v[r] = _mm_loadu_si128((const __m128i*)(src + r * ls));
  auto round = [&](auto lo, auto hi) {
    for (int i = 0; i < 8; ++i) {
      t[i] = lo(v[2 * i], v[2 * i + 1]);
      t[i + 8] = hi(v[2 * i], v[2 * i + 1]);
    }
    for (int i = 0; i < 16; ++i) v[i] = t[i];
  };
  round([](__m128i a, __m128i b) { return _mm_unpacklo_epi8(a, b); },
        [](__m128i a, __m128i b) { return _mm_unpackhi_epi8(a, b); });
  round([](__m128i a, __m128i b) { return _mm_unpacklo_epi16(a, b); },
        [](__m128i a, __m128i b) { return _mm_unpackhi_epi16(a, b); });
  round([](__m128i a, __m128i b) { return _mm_unpacklo_epi32(a, b); },
        [](__m128i a, __m128i b) { return _mm_unpackhi_epi32(a, b); });
  round([](__m128i a, __m128i b) { return _mm_unpacklo_epi64(a, b); },
        [](__m128i a, __m128i b) { return _mm_unpackhi_epi64(a, b); });
  static constexpr int kBitrev4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  for (int j = 0; j < 16; ++j) _mm_storeu_si128((__m128i*)(dst + kBitrev4[j] * ld), v[j]);
}
#endif

}  // namespace

void fp8_transpose_bytes(uint8_t* dst, int64_t ld_dst, const uint8_t* src, int64_t ld_src,
                         int64_t rows, int64_t cols) {
  int64_t r16 = 0, c16 = 0;  // the part done in whole 16 x 16 blocks
#if defined(__SSE2__)
  r16 = rows & ~int64_t(15);
  c16 = cols & ~int64_t(15);
  for (int64_t r = 0; r < r16; r += 16)
    for (int64_t c = 0; c < c16; c += 16)
      transpose16(dst + c * ld_dst + r, ld_dst, src + r * ld_src + c, ld_src);
#endif
  for (int64_t c = 0; c < cols; ++c) {  // the ragged edges: columns past c16, rows past r16
    const int64_t r_first = c < c16 ? r16 : 0;
    for (int64_t r = r_first; r < rows; ++r) dst[c * ld_dst + r] = src[r * ld_src + c];
  }
}

const Fp8FormatInfo& fp8_format_info(Fp8Format fmt) {
  static const Fp8FormatInfo table[] = {
      {"e4m3", 4, 3, 7, false, true, 448.f, 0x1p-9f},
      {"e5m2", 5, 2, 15, true, true, 57344.f, 0x1p-16f},
      {"bf16", 8, 7, 127, true, false, 0x1.fep127f, 0x1p-133f},
      {"e5m6", 5, 6, 15, true, false, 65024.f, 0x1p-20f},
  };
  const int i = (int)fmt;
  DSV3_ASSERT(i >= 0 && i < 4, "bad Fp8Format ", i);
  return table[i];
}

Fp8Format fp8_parse_format(const std::string& name, const char* op) {
  if (name == "e4m3" || name == "e4m3fn" || name == "float8_e4m3fn") return Fp8Format::e4m3;
  if (name == "e5m2" || name == "float8_e5m2") return Fp8Format::e5m2;
  if (name == "bf16" || name == "bfloat16") return Fp8Format::bf16;
  if (name == "e5m6") return Fp8Format::e5m6;
  throw std::invalid_argument(str_cat("[fp8.", op, "] fmt must be one of \"e4m3\", \"e5m2\", ",
                                      "\"bf16\", \"e5m6\", got \"", name, "\""));
}

void fp8_cast(float* out, const float* x, int64_t F, Fp8Format fmt, bool saturate) {
  DSV3_CHECK(F >= 0, "[fp8.cast] negative size ", F);
  auto fn = fmt == Fp8Format::e4m3   ? cast_e4m3
            : fmt == Fp8Format::e5m2 ? cast_e5m2
            : fmt == Fp8Format::bf16 ? cast_bf16
                                     : cast_e5m6;
  parallel_for(F, kGrain, [&](int64_t a, int64_t b) { fn(out, x, a, b, saturate); });
}

void fp8_encode(uint8_t* codes, const float* x, int64_t F, Fp8Format fmt, bool saturate) {
  check_bytes(fmt, "encode");
  DSV3_CHECK(F >= 0, "[fp8.encode] negative size ", F);
  auto fn = fmt == Fp8Format::e4m3 ? encode_e4m3 : encode_e5m2;
  parallel_for(F, kGrain, [&](int64_t a, int64_t b) { fn(codes, x, a, b, saturate); });
}

void fp8_decode(float* out, const uint8_t* codes, int64_t F, Fp8Format fmt) {
  check_bytes(fmt, "decode");
  DSV3_CHECK(F >= 0, "[fp8.decode] negative size ", F);
  auto fn = fmt == Fp8Format::e4m3 ? decode_e4m3 : decode_e5m2;
  parallel_for(F, kGrain, [&](int64_t a, int64_t b) { fn(out, codes, a, b); });
}

void fp8_quantize(uint8_t* codes, float* scales, const float* x, int64_t R, int64_t C,
                  Fp8Block block, Fp8Format fmt, bool pow2_scale) {
  check_bytes(fmt, "quantize");
  check_block(R, C, block, "quantize");
  if (R == 0 || C == 0) return;
  const int64_t br = block.rows, bc = block.cols;
  const int64_t Rb = fp8_blocks(R, br), Cb = fp8_blocks(C, bc);
  const float fmax = fp8_format_info(fmt).max;
  const EncodeScaledFn encode = encode_scaled_fn(fmt);

  if (br * bc <= kFusedBlock) {
    // One visit per block while it is in cache (quantize_blocks_loop); a task walks memory
    // forward. A block with NaN/Inf gets a NaN scale there and is reported after the
    // parallel region.
    const BlockTask task{codes, scales, x, R, C, br, bc, Cb, fmax, pow2_scale};
    const auto run = fmt == Fp8Format::e4m3 ? quantize_blocks_e4m3 : quantize_blocks_e5m2;
    parallel_for(Rb * Cb, std::max<int64_t>(1, kGrain / (br * bc)),
                 [&](int64_t b0, int64_t b1) { run(task, b0, b1); });
    for (int64_t blk = 0; blk < Rb * Cb; ++blk)
      if (!(scales[blk] == scales[blk])) throw_nonfinite(blk / Cb, blk % Cb, block, R, C);
    return;
  }

  // Blocks too big for a cache (e.g. one scale per tensor): a pass for per-(row, block)
  // partial amax — parallel even for a single block — reduced per block (max is exact and
  // order-free: deterministic), then an encode pass.
  const int64_t items = R * Cb, grain = std::max<int64_t>(1, kGrain / bc);
  auto item_cols = [&](int64_t it, int64_t& r, int64_t& c0, int64_t& n) {
    r = it / Cb;
    c0 = (it % Cb) * bc;
    n = std::min(bc, C - c0);
  };
  std::vector<uint32_t> row_amax((size_t)items);
  parallel_for(items, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      int64_t r, c0, n;
      item_cols(it, r, c0, n);
      row_amax[(size_t)it] = amax_range(x + r * C + c0, 0, n);
    }
  });
  for (int64_t bi = 0; bi < Rb; ++bi)
    for (int64_t bj = 0; bj < Cb; ++bj) {
      uint32_t m = 0;
      for (int64_t r = bi * br; r < std::min(R, (bi + 1) * br); ++r)
        m = std::max(m, row_amax[(size_t)(r * Cb + bj)]);
      if (m >= 0x7f800000u) throw_nonfinite(bi, bj, block, R, C);
      scales[bi * Cb + bj] = block_scale(m, fmax, pow2_scale);
    }
  parallel_for(items, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      int64_t r, c0, n;
      item_cols(it, r, c0, n);
      encode(codes + r * C + c0, x + r * C + c0, n, scales[(r / br) * Cb + c0 / bc]);
    }
  });
}

void fp8_quantize_transposed(uint8_t* codes_t, float* scales_t, const float* x, int64_t R,
                             int64_t C, int64_t bt, Fp8Format fmt, bool pow2_scale) {
  check_bytes(fmt, "quantize");
  check_block(C, R, Fp8Block{1, bt}, "quantize");
  if (R == 0 || C == 0) return;
  const int64_t Rb = fp8_blocks(R, bt), Cc = fp8_blocks(C, kTileCols);
  const float fmax = fp8_format_info(fmt).max;
  const auto quantize_tile = fmt == Fp8Format::e4m3 ? quantize_tile_e4m3 : quantize_tile_e5m2;
  // One task per (band of bt rows, 64 columns): the band's column amax, the 64 scales and the
  // band's codes, row by row, into a tile (quantize_tile_loop), then the tile transposed.
  parallel_for(Rb * Cc, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> tile((size_t)(bt * kTileCols));
    float s[kTileCols];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t band = t / Cc, r0 = band * bt, rows = std::min(bt, R - r0);
      const int64_t c0 = (t % Cc) * kTileCols, n = std::min(kTileCols, C - c0);
      quantize_tile(tile.data(), s, x + r0 * C + c0, C, rows, n, fmax, pow2_scale);
      for (int64_t j = 0; j < n; ++j) scales_t[(c0 + j) * Rb + band] = s[j];
      fp8_transpose_bytes(codes_t + c0 * R + r0, R, tile.data(), kTileCols, rows, n);
    }
  });
  for (int64_t c = 0; c < C; ++c)
    for (int64_t b = 0; b < Rb; ++b)
      if (!(scales_t[c * Rb + b] == scales_t[c * Rb + b]))
        throw_nonfinite(c, b, Fp8Block{1, bt}, C, R);
}

void fp8_dequantize(float* out, const uint8_t* codes, const float* scales, int64_t R, int64_t C,
                    Fp8Block block, Fp8Format fmt) {
  check_bytes(fmt, "dequantize");
  check_block(R, C, block, "dequantize");
  if (R == 0 || C == 0) return;
  const int64_t br = block.rows, bc = block.cols, Cb = fp8_blocks(C, bc);
  const DecodeScaledFn decode = decode_scaled_fn(fmt);
  parallel_for(R * Cb, std::max<int64_t>(1, kGrain / bc), [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t r = it / Cb, c0 = (it % Cb) * bc, n = std::min(bc, C - c0);
      decode(out + r * C + c0, codes + r * C + c0, n, scales[(r / br) * Cb + c0 / bc]);
    }
  });
}

}  // namespace dsv3
