// FP8 emulation: formats, casts and fine-grained quantization (semantics §2.6).
//
// The scheme. DeepSeek-V3 trains its linear layers with 8-bit floating-point operands. An
// 8-bit float has so little range (E4M3: ±448, smallest subnormal 2^-9) that a tensor cannot
// be cast as is: it is first divided by a scale. One scale per tensor lets a single outlier
// push everything else into the subnormals, so the recipe scales small groups instead —
// activations (and gradients) per 1×128 tile along the GEMM's inner dimension, weights per
// 128×128 block — with scale = max(amax, 1e-4) / 448, optionally rounded up to a power of two
// (a UE8M0 exponent). With every group using the full E4M3 range, E4M3 (more mantissa) is
// used everywhere instead of E5M2 (more range) for gradients.
//
// The scales belong to a chunk of the inner dimension, so a GEMM cannot fold them into one
// long dot product: the tensor core sums each 128-wide chunk, and the partial result is
// multiplied by the two scales and added to an fp32 accumulator on the CUDA cores
// ("promotion"). Promotion also fixes a second problem: the tensor core keeps only ~14 bits
// of the running sum (the report measured a max relative error near 2% at K = 4096);
// restarting the limited sum every 128 products bounds that error. fp8_gemm.h emulates both.
//
// On a CPU there is no FP8 hardware, so every value here is stored as fp32 or as its code
// (uint8 for the 8-bit formats) and rounding is done by integer bit manipulation: results do
// not depend on the FPU's rounding mode or flush-to-zero settings, and they are bit-exact to
// the format definitions:
//   e4m3 ("fn")  1+4+3 bits, bias 7, max 448, no inf, NaN = S.1111.111, subnormals to 2^-9
//   e5m2         1+5+2 bits, bias 15, max 57344, IEEE inf/NaN, subnormals to 2^-16
//   bf16         1+8+7 bits, the top half of an fp32 (cast only)
//   e5m6         1+5+6 bits, bias 15, IEEE-like, subnormals to 2^-20 (dsv3's definition; the
//                report names the format without publishing one) (cast only)
// Rounding is to nearest, ties to even. An overflow (a rounded magnitude above max, or ±inf)
// saturates to ±max by default; without saturation e4m3 gives NaN and the IEEE formats ±inf
// (the OCP non-saturating mode). NaN stays NaN (encoded S.1..1.1..1); -0 keeps its sign.
//
// Legend:  F elements of an elementwise op   R rows   C columns   br × bc a scale block
//          Rb = ceil(R/br), Cb = ceil(C/bc) scale-grid shape
#pragma once
#include <cstdint>
#include <string>

namespace dsv3 {

enum class Fp8Format : int { e4m3 = 0, e5m2 = 1, bf16 = 2, e5m6 = 3 };

struct Fp8FormatInfo {
  const char* name;
  int exponent_bits, mantissa_bits, bias;
  bool ieee;        // inf and NaN in the all-ones exponent (else "fn": NaN only)
  bool byte_codes;  // 8-bit format: encode/decode/quantize/gemm accept it
  float max;        // largest finite value
  float min_subnormal;
};

const Fp8FormatInfo& fp8_format_info(Fp8Format fmt);
// "e4m3" (also "e4m3fn", "float8_e4m3fn"), "e5m2" ("float8_e5m2"), "bf16" ("bfloat16"),
// "e5m6"; anything else -> std::invalid_argument "[fp8.<op>] fmt must be one of ...".
Fp8Format fp8_parse_format(const std::string& name, const char* op);

// out[i] = x[i] rounded to fmt, as fp32                         x[F] out[F]  (any format)
void fp8_cast(float* out, const float* x, int64_t F, Fp8Format fmt, bool saturate);
// codes[i] = the fmt byte of x[i]                               x[F] codes[F] (8-bit formats)
void fp8_encode(uint8_t* codes, const float* x, int64_t F, Fp8Format fmt, bool saturate);
// out[i] = the value of codes[i]                                codes[F] out[F] (8-bit formats)
void fp8_decode(float* out, const uint8_t* codes, int64_t F, Fp8Format fmt);

// A scale block: br rows × bc columns (both >= 1). {1, 128} activation tiles, {128, 128}
// weight blocks, {R, C} one scale per tensor.
struct Fp8Block {
  int64_t rows = 1, cols = 128;
};

// Block quantization (edges behave as if zero-padded to whole blocks; codes keep x's shape):
//   amax[i,j]   = max |x| over block (i,j)
//   scales[i,j] = max(amax[i,j], 1e-4) / fmt.max       (fp32; with pow2_scale rounded up to
//                                                       2^ceil(log2(scale)))
//   codes[r,c]  = encode(x[r,c] / scales[r/br, c/bc])   (fp32 division, saturating)
//                                      x[R,C]  codes[R,C] uint8  scales[Rb,Cb]
// x must be finite: a NaN/Inf would make its whole block's scale NaN/Inf, so it is rejected
// with std::invalid_argument naming x and the block (codes/scales are then unspecified).
// Blocks of up to 2^18 elements are quantized in one visit each (amax, then encode while the
// block is in cache), larger ones in two passes over x.
void fp8_quantize(uint8_t* codes, float* scales, const float* x, int64_t R, int64_t C,
                  Fp8Block block, Fp8Format fmt, bool pow2_scale);

// The quantization of x^T in tiles 1 x bt along R, without forming x^T: each scale covers bt
// consecutive rows of one column of x. Equals fp8_quantize(x^T, {1, bt}) bit for bit (same
// blocks, same amax, same division), including its NonFiniteError (block indices and rows /
// columns named in x^T's coordinates).     x[R,C]  codes_t[C,R] uint8  scales_t[C, ceil(R/bt)]
// The weight-gradient GEMM's operands dy^T and x^T (fp8_linear.h) are made this way: one pass
// over x, codes written transposed (bytes, not fp32).
void fp8_quantize_transposed(uint8_t* codes_t, float* scales_t, const float* x, int64_t R,
                             int64_t C, int64_t bt, Fp8Format fmt, bool pow2_scale);

// out[r,c] = decode(codes[r,c]) * scales[r/br, c/bc]      (fp32)
//                                      codes[R,C]  scales[Rb,Cb]  out[R,C]
void fp8_dequantize(float* out, const uint8_t* codes, const float* scales, int64_t R, int64_t C,
                    Fp8Block block, Fp8Format fmt);

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols: a byte transpose, in
// 16 x 16 blocks of SSE2 unpacks on x86-64 (scalar elsewhere and at ragged edges).
void fp8_transpose_bytes(uint8_t* dst, int64_t ld_dst, const uint8_t* src, int64_t ld_src,
                         int64_t rows, int64_t cols);

// Scale-grid shape helpers: ceil(R/br), ceil(C/bc).
inline int64_t fp8_blocks(int64_t n, int64_t b) { return (n + b - 1) / b; }

}  // namespace dsv3
