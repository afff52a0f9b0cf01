#include "kernels/fp8_linear.h"

#include <algorithm>
#include <memory>
#include <vector>

#include "core/check.h"
#include "core/memory.h"
#include "core/parallel.h"

namespace dsv3 {

namespace {

constexpr int64_t kTile = 128;  // the recipe's tile / block edge

// dst[C,R] = src[R,C]^T for bytes, in bands of 64 rows
void transpose_bytes(uint8_t* dst, const uint8_t* src, int64_t R, int64_t C) {
  constexpr int64_t T = 64;
  parallel_for(fp8_blocks(R, T), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * T;
      fp8_transpose_bytes(dst + r0, R, src + r0 * C, C, std::min(T, R - r0), C);
    }
  });
}

// A quantized [rows, cols] operand that owns its buffers.
struct Quantized {
  // every code and scale is written by the quantizer: no zeroing first
  std::vector<uint8_t, DefaultInitAllocator<uint8_t>> codes;
  FVec scales;
  Fp8Operand op;  // points into codes / scales (moves keep the buffers; no copies)
  Quantized(const Quantized&) = delete;
  Quantized(Quantized&&) = default;
  Quantized(const float* x, int64_t rows, int64_t cols, Fp8Block block, Fp8Format fmt,
            bool pow2)
      : codes((size_t)(rows * cols)),
        scales((size_t)(fp8_blocks(rows, block.rows) * fp8_blocks(cols, block.cols))) {
    fp8_quantize(codes.data(), scales.data(), x, rows, cols, block, fmt, pow2);
    point(block, fmt);
  }
  // Q(x^T) in tiles 1 x kTile along R, from x[R,C] itself (fp8_quantize_transposed)
  Quantized(const float* x, int64_t R, int64_t C, Fp8Format fmt, bool pow2)
      : codes((size_t)(R * C)), scales((size_t)(C * fp8_blocks(R, kTile))) {
    fp8_quantize_transposed(codes.data(), scales.data(), x, R, C, kTile, fmt, pow2);
    point({1, kTile}, fmt);
  }
  // Q(W^T) in 128x128 blocks from Q(W): a block of W^T holds the elements of the transposed
  // block of W, so its amax, scale and codes are those of W's block, transposed (bit for bit
  // what quantizing the transposed fp32 matrix gives, at a byte transpose's cost).
  static Quantized transposed(const Quantized& q, int64_t rows, int64_t cols) {
    Quantized t;
    const int64_t rb = fp8_blocks(rows, kTile), cb = fp8_blocks(cols, kTile);
    t.codes.resize(q.codes.size());
    t.scales.resize(q.scales.size());
    transpose_bytes(t.codes.data(), q.codes.data(), rows, cols);
    for (int64_t i = 0; i < rb; ++i)
      for (int64_t j = 0; j < cb; ++j) t.scales[(size_t)(j * rb + i)] = q.scales[(size_t)(i * cb + j)];
    t.point(q.op.block, q.op.fmt);
    return t;
  }

 private:
  Quantized() = default;
  void point(Fp8Block block, Fp8Format fmt) {
    op.codes = codes.data();
    op.scales = scales.data();
    op.block = block;
    op.fmt = fmt;
  }
};

void check_sizes(int64_t R, int64_t K, int64_t O, const char* op) {
  DSV3_CHECK(R >= 0 && K >= 0 && O >= 0, "[fp8.", op, "] negative size R=", R, " K=", K,
             " O=", O);
}

// The cache applies to the training step's recipe (lowp_weights.h); other options (the
// research knobs of dsv3.fp8.linear) prepare per call.
bool cacheable(const Fp8LinearOptions& o, int64_t K) {
  return o.weight_fmt == LowpWeightCache::kFormat && !o.pow2_scale &&
         fp8_gemm_packable(K, o.gemm);
}

}  // namespace

void fp8_linear_forward(float* y, const float* x, const float* w, int64_t R, int64_t K,
                        int64_t O, const Fp8LinearOptions& opts, LowpWeightCache* weights) {
  check_sizes(R, K, O, "linear");
  if (R == 0 || O == 0) return;
  Quantized qx(x, R, K, {1, kTile}, opts.act_fmt, opts.pow2_scale);
  if (weights && cacheable(opts, K)) {
    const Fp8PreparedWeight& pw = weights->fp8(w, O, K);
    const Fp8Operand b{pw.codes.data(), pw.scales.data(), {kTile, kTile}, Fp8Format::e4m3};
    if (pw.panels.N == O && pw.panels.K == K) {  // kept for the step's micro-batches
      fp8_gemm(y, qx.op, b, pw.panels, R, O, K, opts.gemm, false);
    } else {
      Bf16PackedB panels;
      fp8_pack_b(panels, pw.codes.data(), LowpWeightCache::kFormat, O, K, false);
      fp8_gemm(y, qx.op, b, panels, R, O, K, opts.gemm, false);
    }
    return;
  }
  Quantized qw(w, O, K, {kTile, kTile}, opts.weight_fmt, opts.pow2_scale);
  fp8_gemm(y, qx.op, qw.op, R, O, K, opts.gemm, false);
}

void fp8_linear_backward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                         int64_t R, int64_t K, int64_t O, const Fp8LinearOptions& opts,
                         LowpWeightCache* weights) {
  check_sizes(R, K, O, "linear_backward");
  if (dx && R > 0 && K > 0) {  // dx[R,K] += dy[R,O] @ W[O,K]: inner dimension O
    const Quantized qdy(dy, R, O, {1, kTile}, opts.grad_fmt, opts.pow2_scale);
    if (fp8_gemm_packable(O, opts.gemm)) {
      // Q(W^T)'s panels straight from Q(W)'s codes read transposed; its scales transposed
      std::unique_ptr<Quantized> own;
      const uint8_t* codes;
      const float* scales;
      if (weights && cacheable(opts, O)) {
        const Fp8PreparedWeight& pw = weights->fp8(w, O, K);
        codes = pw.codes.data();
        scales = pw.scales.data();
      } else {
        own = std::make_unique<Quantized>(w, O, K, Fp8Block{kTile, kTile}, opts.weight_fmt,
                                          opts.pow2_scale);
        codes = own->op.codes;
        scales = own->op.scales;
      }
      const int64_t ob = fp8_blocks(O, kTile), kb = fp8_blocks(K, kTile);
      std::vector<float> st((size_t)(ob * kb));
      for (int64_t i = 0; i < ob; ++i)
        for (int64_t j = 0; j < kb; ++j) st[(size_t)(j * ob + i)] = scales[i * kb + j];
      Bf16PackedB panels;
      fp8_pack_b(panels, codes, opts.weight_fmt, K, O, true);
      const Fp8Operand b{codes, st.data(), {kTile, kTile}, opts.weight_fmt};
      fp8_gemm(dx, qdy.op, b, panels, R, K, O, opts.gemm, true);
    } else {
      const Quantized qwt = Quantized::transposed(
          Quantized(w, O, K, {kTile, kTile}, opts.weight_fmt, opts.pow2_scale), O, K);
      fp8_gemm(dx, qdy.op, qwt.op, R, K, O, opts.gemm, true);
    }
  }
  if (dw && O > 0 && K > 0) {  // dW[O,K] += dy^T[O,R] @ x[R,K]: inner dimension R
    const Quantized qdyt(dy, R, O, opts.grad_fmt, opts.pow2_scale);
    const Quantized qxt(x, R, K, opts.act_fmt, opts.pow2_scale);
    fp8_gemm(dw, qdyt.op, qxt.op, O, K, R, opts.gemm, true);
  }
}

}  // namespace dsv3
