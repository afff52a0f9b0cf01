// Inference linear layers over RESIDENT weights in their storage format (fp32, bf16, or FP8
// E4M3 with DeepSeek's 128x128 block scales), dequantized on the fly inside the kernel: the
// weights never exist as an fp32 copy. Activations and outputs are fp32.
//
// Legend:  R rows (tokens)   K in-features   O out-features   Bk = 128 (scale block edge)
//          code[o,k] uint8 E4M3 bit pattern   sinv[ob, kb] = weight_scale_inv, float32,
//          [ceil(O/Bk), ceil(K/Bk)] row-major (ld = ceil(K/Bk))
//
//   fp32   w[o,k] = f32[o*K + k]
//   bf16   w[o,k] = bf16_decode(bits[o*K + k])                                   (exact)
//   fp8    w[o,k] = e4m3(code[o*K + k]) * sinv[o/Bk, k/Bk]          (DeepSeek's FP8 weights)
//
//   y[r,o] = sum_k x[r,k] w[o,k]          x[R,K]  y[R,O]   (overwrites y)
//
// For fp8 the sum is taken per K block: y[r,o] = sum_kb sinv[o/Bk,kb] * (sum_{k in kb}
// x[r,k] e4m3(code[o,k])), i.e. the exact value up to fp32 reassociation (and the scale's
// rounding: one fp32 multiplication per block instead of one per element). Against the fp32
// linear of the dequantized weight the difference is within the fp32 reassociation bound
// gamma_{K+2} * sum_k |x w|.
// Decode (R <= 16; bf16 weights R <= 64) streams the weight bytes once per call: GEMV-shaped,
// memory-bound; prefill (R larger) dequantizes panels of W into thread-local fp32 buffers and
// multiplies them there (vector tiers: register tiles on the transposed panel; scalar: sgemm).
// Deterministic: each y element is summed by one thread in an order fixed by (R, K, O) and the
// ISA tier, independent of the thread count.
#pragma once
#include <cstdint>
#include <string>

namespace dsv3 {

enum class WeightFormat : int { fp32 = 0, bf16 = 1, fp8_e4m3 = 2 };

const char* weight_format_name(WeightFormat f);    // "fp32" | "bf16" | "fp8"
WeightFormat parse_weight_format(const char* s);   // the names above, else std::invalid_argument
int64_t weight_format_bytes(WeightFormat f, int64_t O, int64_t K);  // resident bytes incl. scales

// A read-only view of one [O,K] weight in its storage format (memory owned elsewhere: the
// model's slab, or arrays / memory maps kept alive by the Python Model).
struct WeightView {
  WeightFormat fmt = WeightFormat::fp32;
  const void* data = nullptr;         // float* | uint16_t* (bf16 bits) | uint8_t* (E4M3 codes)
  const float* scale_inv = nullptr;   // fp8 only: [ceil(O/128), ceil(K/128)]
  int64_t O = 0, K = 0;
  // fp8: the codes were checked once to hold no NaN code (0x7f / 0xff; fp8_codes_nan_free),
  // so the GEMV skips its own check of each row group (a second read of every code). Views of
  // resident weights are checked when made; a view left false is checked on every use.
  bool nan_free = false;

  static WeightView f32(const float* w, int64_t O, int64_t K) {
    return {WeightFormat::fp32, w, nullptr, O, K};
  }
  const float* as_f32() const { return fmt == WeightFormat::fp32 ? (const float*)data : nullptr; }
};

// True when no code of the n at `codes` is an E4M3 NaN (0x7f / 0xff); parallel, one read.
bool fp8_codes_nan_free(const uint8_t* codes, int64_t n);

// y[R,O] = x[R,K] W^T (overwrites). Throws std::invalid_argument on a null / inconsistent view.
void wlinear_forward(float* y, const float* x, const WeightView& w, int64_t R);

// Several independent linears in one pass: jobs[i].y = jobs[i].x W_i^T. The decode-shaped ones
// (R <= 16, bf16 R <= 64: the GEMV) share one parallel pass over all their weights (one pool
// dispatch instead of one per matrix: the experts of a decoded token, or projections of the
// same input); the others run one after another. Every y is bit-identical to wlinear_forward's.
struct WlinearJob {
  float* y;
  const float* x;
  WeightView w;
  int64_t R;
};
void wlinear_forward_many(const WlinearJob* jobs, int64_t n);

// out[r,:] = W[ids[r],:] as fp32 (embedding rows of a resident matrix; ids in [0, O)).
void wlinear_rows(float* out, const int64_t* ids, const WeightView& w, int64_t R);

// y[r, :] = x[r, 0:n] @ W[r0 : r0 + n, :] for r < R: rows of a resident weight as the right
// factor (MLA's absorbed query, q_nope_h W_UK_h); x rows ldx apart, y rows (K wide) ldy apart,
// overwritten. Each element is one fused multiply-add chain over i in order on W's fp32
// values (as wlinear_rows gives them; the scalar tier rounds product and sum apart), so a
// weight and its fp32 dequantized copy give the same bits; single-threaded (callers split
// heads over the pool). Throws std::invalid_argument / out_of_range on a bad view or rows.
void wlinear_rows_product(float* y, int64_t ldy, const float* x, int64_t ldx,
                          const WeightView& w, int64_t r0, int64_t n, int64_t R);

// True when the tier multiplies prefills (R above the GEMV's rows) in register tiles (the
// vector tiers), false when it hands them to sgemm (scalar). linear_forward takes this path for
// fp32 weights too.
bool wlinear_prefill_tiles();

// The kernel tier in use ("avx512" | "avx2" | "scalar": CPU features capped by DSV3_ISA; or
// "avx512-gfni" when DSV3_ISA=avx512-gfni asks for it; chosen once per process) and why
// (build_info's "wlinear_tier").
const char* wlinear_tier_name();
const std::string& wlinear_tier_reason();

}  // namespace dsv3
