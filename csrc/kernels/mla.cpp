#include "kernels/mla.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/bf16.h"
#include "core/blas.h"
#include "core/check.h"
#include "core/memory.h"
#include "core/parallel.h"
#include "core/small_gemm.h"
#include "kernels/attention.h"
#include "kernels/nn.h"
#include "kernels/precision.h"
#include "kernels/softmax.h"

namespace dsv3 {

void mla_check_dims(const MlaDims& d) {
  DSV3_CHECK(d.D >= 1 && d.H >= 1 && d.Dq >= 0 && d.Dc >= 1 && d.Dn >= 1 && d.Dr >= 2 &&
                 d.Dv >= 1,
             "[mla] invalid dims (D=", d.D, ", H=", d.H, ", Dq=", d.Dq, ", Dc=", d.Dc, ", Dn=",
             d.Dn, ", Dr=", d.Dr, ", Dv=", d.Dv, ")");
  DSV3_CHECK(d.Dr % 2 == 0, "[mla] qk_rope_head_dim must be even, got ", d.Dr);
  DSV3_CHECK((int64_t)d.rope.inv_freq.size() == d.Dr / 2, "[mla] rope table has ",
             d.rope.inv_freq.size(), " frequencies, expected qk_rope_head_dim/2 = ", d.Dr / 2);
}

void mla_check_params(const MlaParams& p, const MlaDims& d) {
  if (d.Dq > 0)
    DSV3_CHECK(p.q_a_proj.data && p.q_a_layernorm && p.q_b_proj.data,
               "[mla] q_lora_rank > 0 needs q_a_proj, q_a_layernorm and q_b_proj");
  else
    DSV3_CHECK(p.q_proj.data, "[mla] q_lora_rank == 0 needs q_proj");
  DSV3_CHECK(p.kv_a_proj_with_mqa.data && p.kv_a_layernorm && p.kv_b_proj && p.o_proj.data,
             "[mla] kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj and o_proj are required");
}

namespace {

// q [R, H, Dn+Dr] with q_pe roped; saves the q_lora intermediates when given buffers.
void project_q(float* q, FVec* qa, FVec* qa_rstd, FVec* qa_n, const float* x,
               const MlaParams& p, const MlaDims& d,
               const int64_t* pos, int64_t R) {
  const int64_t Q = d.H * d.dqk();
  if (d.Dq > 0) {
    FVec a_local, r_local, n_local;
    FVec& a = qa ? *qa : a_local;
    FVec& r = qa_rstd ? *qa_rstd : r_local;
    FVec& n = qa_n ? *qa_n : n_local;
    a.resize(R * d.Dq);
    r.resize(R);
    n.resize(R * d.Dq);
    linear_forward(a.data(), x, p.q_a_proj, R, d.D, d.Dq, p.precision);
    rmsnorm_forward(n.data(), r.data(), a.data(), p.q_a_layernorm, R, d.Dq, d.eps);
    linear_forward(q, n.data(), p.q_b_proj, R, d.Dq, Q, p.precision);
  } else {
    linear_forward(q, x, p.q_proj, R, d.D, Q, p.precision);
  }
  rope_forward(q + d.Dn, Q, d.dqk(), q + d.Dn, Q, d.dqk(), pos, R, d.H, d.rope);
}

// ckv [R, Dc] raw c_kv; c [R, Dc] normalised latent; kpe [R, Dr] roped.
void project_latent(float* ckv, float* c_rstd, float* c, float* kpe, const float* x,
                    const MlaParams& p, const MlaDims& d, const int64_t* pos, int64_t R) {
  const int64_t W = d.Dc + d.Dr;
  Buf kva = buf(R * W);
  linear_forward(kva.get(), x, p.kv_a_proj_with_mqa, R, d.D, W, p.precision);
  copy_rows(ckv, d.Dc, kva.get(), W, R, d.Dc);
  rmsnorm_forward(c, c_rstd, ckv, p.kv_a_layernorm, R, d.Dc, d.eps);
  rope_forward(kpe, d.Dr, 0, kva.get() + d.Dc, W, 0, pos, R, 1, d.rope);
}

// Row stride of the kv_b_proj output and of its gradient: 16 floats of padding, so the rows
// of one head's v are not a multiple of 4 KiB apart (they would share a few L1 sets).
int64_t kv_ld(const MlaDims& d) { return d.H * (d.Dn + d.Dv) + 16; }

// kv [L, kv_ld] = kv_b_proj(c) (c with row stride ldc): per head [k_nope | v], both read in
// place by the attention (see kv_shape).
void decompress(float* kv, const float* c, int64_t ldc, const MlaParams& p, const MlaDims& d,
                int64_t L) {
  const int64_t KV = d.H * (d.Dn + d.Dv), ld = kv_ld(d);
  if (p.precision != GemmPrecision::fp32) {  // bf16/fp8 training: kv_b_proj is a linear
    Buf cc = buf(L * d.Dc), out = buf(L * KV);
    copy_rows(cc.get(), d.Dc, c, ldc, L, d.Dc);
    linear_forward(out.get(), cc.get(), p.kv_b_proj, L, d.Dc, KV, p.precision);
    copy_rows(kv, ld, out.get(), KV, L, KV);
  } else {
    sgemm(false, true, L, KV, d.Dc, 1.f, c, ldc, p.kv_b_proj, d.Dc, 0.f, kv, ld);
  }
}

// dc = dkv kv_b_proj (overwritten), d kv_b_proj += dkv^T c; dkv rows kv_ld apart.
void decompress_backward(float* dc, float* g_kv_b, const float* dkv, const float* c,
                         const MlaParams& p, const MlaDims& d, int64_t R) {
  const int64_t KV = d.H * (d.Dn + d.Dv), ld = kv_ld(d);
  if (p.precision != GemmPrecision::fp32) {
    Buf dense = buf(R * KV);
    copy_rows(dense.get(), KV, dkv, ld, R, KV);
    linear_backward(dc, g_kv_b, dense.get(), c, p.kv_b_proj, R, d.Dc, KV, p.precision, true);
    return;
  }
  sgemm(false, false, R, d.Dc, KV, 1.f, dkv, ld, p.kv_b_proj, d.Dc, 0.f, dc, d.Dc);
  if (g_kv_b) sgemm(true, false, KV, d.Dc, R, 1.f, dkv, ld, c, d.Dc, 1.f, g_kv_b, d.Dc);
}

// The attention shape over the decompressed latents: k_nope and v (and their gradients)
// strided inside kv, k_pe one shared array (row stride kpe_row).
AttnShape kv_shape(const MlaDims& d, int64_t B, int64_t Tq, int64_t Tk, int64_t start_pos,
                   int64_t kpe_row) {
  AttnShape s{B, Tq, Tk, d.H, d.H, d.dqk(), d.Dv, start_pos, d.scale};
  s.v_row = s.k_row = kv_ld(d);
  s.v_head = s.k_head = d.Dn + d.Dv;
  s.k_shared = d.Dr;
  s.kr_row = kpe_row;
  return s;
}

}  // namespace

void mla_forward(float* out, MlaActs& a, const float* x, const MlaParams& p, const MlaDims& d,
                 int64_t B, int64_t T, int64_t start_pos) {
  mla_check_dims(d);
  mla_check_params(p, d);
  DSV3_CHECK(B >= 1 && T >= 1, "[mla] batch and tokens must be >= 1, got B=", B, ", T=", T);
  DSV3_CHECK(start_pos >= 0, "[mla] start_pos must be >= 0, got ", start_pos);
  const int64_t R = B * T;
  a.B = B;
  a.T = T;
  a.pos = row_positions(B, T, start_pos);
  a.q.resize(R * d.H * d.dqk());
  project_q(a.q.data(), &a.qa, &a.qa_rstd, &a.qa_n, x, p, d, a.pos.data(), R);
  a.ckv.resize(R * d.Dc);
  a.c_rstd.resize(R);
  a.c.resize(R * d.Dc);
  a.kpe.resize(R * d.Dr);
  project_latent(a.ckv.data(), a.c_rstd.data(), a.c.data(), a.kpe.data(), x, p, d, a.pos.data(),
                 R);
  a.kv.resize(R * kv_ld(d));
  decompress(a.kv.data(), a.c.data(), d.Dc, p, d, R);
  a.o.resize(R * d.H * d.Dv);
  a.lse.resize(B * d.H * T);
  const AttnShape s = kv_shape(d, B, T, T, 0, d.Dr);
  a.probs.prepare(s, a.keep_probs);
  attention_forward(a.o.data(), a.lse.data(),
                    {a.q.data(), a.kv.data(), a.kv.data() + d.Dn, a.kpe.data()}, s, a.probs.get());
  linear_forward(out, a.o.data(), p.o_proj, R, d.H * d.Dv, d.D, p.precision);
}

// The gradient buffers below are fresh: each is overwritten by the first product written
// into it (set), or zeroed where it is summed into (dkpe, the d k_pe columns of dkva).
void mla_backward(float* dx, const MlaGrads& g, const float* d_out, const MlaActs& a,
                  const float* x, const MlaParams& p, const MlaDims& d, bool set_dx) {
  const int64_t B = a.B, T = a.T, R = B * T, Q = d.H * d.dqk(), W = d.Dc + d.Dr;
  DSV3_ASSERT(R > 0 && (int64_t)a.o.size() == R * d.H * d.Dv, "mla_backward without forward");
  Buf d_o = buf(R * d.H * d.Dv);
  linear_backward(d_o.get(), g.o_proj, d_out, a.o.data(), p.o_proj, R, d.H * d.Dv, d.D, p.precision, true);
  // dk_nope and dv land in their places in dkv (the layout of kv); each head's d k_pe in dkr
  Buf dq = buf(R * Q), dkv = buf(R * kv_ld(d)), dkr = buf(R * d.H * d.Dr);
  attention_backward({dq.get(), dkv.get(), dkv.get() + d.Dn, dkr.get(), /*set=*/true},
                     d_o.get(), {a.o.data(), a.lse.data(), a.probs.get()},
                     {a.q.data(), a.kv.data(), a.kv.data() + d.Dn, a.kpe.data()},
                     kv_shape(d, B, T, T, 0, d.Dr));
  // d k_pe summed over heads (in head order), then written as [d c_kv | d k_pe] rows of dkva
  // after the rotation is undone
  Buf dkpe = buf(R * d.Dr), dkva = buf(R * W);
  parallel_for(R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* sum = dkpe.get() + r * d.Dr;
      std::fill_n(sum, d.Dr, 0.f);
      for (int64_t h = 0; h < d.H; ++h) {
        const float* part = dkr.get() + (r * d.H + h) * d.Dr;
        for (int64_t j = 0; j < d.Dr; ++j) sum[j] += part[j];
      }
      std::fill_n(dkva.get() + r * W + d.Dc, d.Dr, 0.f);
    }
  });
  Buf dc = buf(R * d.Dc), dckv = buf(R * d.Dc);
  decompress_backward(dc.get(), g.kv_b_proj, dkv.get(), a.c.data(), p, d, R);
  rmsnorm_backward(dckv.get(), g.kv_a_layernorm, dc.get(), a.c_rstd.data(), a.ckv.data(),
                   p.kv_a_layernorm, R, d.Dc, true);
  copy_rows(dkva.get(), W, dckv.get(), d.Dc, R, d.Dc);
  rope_backward(dkva.get() + d.Dc, W, 0, dkpe.get(), d.Dr, 0, a.pos.data(), R, 1, d.rope);
  linear_backward(dx, g.kv_a_proj_with_mqa, dkva.get(), x, p.kv_a_proj_with_mqa, R, d.D, W, p.precision,
                  set_dx);  // the first product into dx
  // back through the query path: un-rotate the q_pe gradient in place
  rope_heads_backward(dq.get(), d.H, d.Dn, d.Dr, a.pos.data(), R, d.rope);
  if (d.Dq > 0) {
    Buf dqa_n = buf(R * d.Dq), dqa = buf(R * d.Dq);
    linear_backward(dqa_n.get(), g.q_b_proj, dq.get(), a.qa_n.data(), p.q_b_proj, R, d.Dq, Q, p.precision,
                    true);
    rmsnorm_backward(dqa.get(), g.q_a_layernorm, dqa_n.get(), a.qa_rstd.data(), a.qa.data(),
                     p.q_a_layernorm, R, d.Dq, true);
    linear_backward(dx, g.q_a_proj, dqa.get(), x, p.q_a_proj, R, d.D, d.Dq, p.precision);
  } else {
    linear_backward(dx, g.q_proj, dq.get(), x, p.q_proj, R, d.D, Q, p.precision);
  }
}

namespace {

struct DecodeStep {
  std::vector<int64_t> pos;
  std::vector<float> q;  // [R, H, Dn+Dr]
};

// Shared by both decode forms: checks, q projection, and the new tokens' c | k_pe written to
// the cache (only after every check has passed, so a failed call leaves the cache unchanged).
DecodeStep decode_prologue(const float* x, const MlaParams& p, const MlaDims& d,
                           const LatentCacheView& cache, int64_t B, int64_t S,
                           int64_t start_pos) {
  mla_check_dims(d);
  mla_check_params(p, d);
  DSV3_CHECK(B >= 1 && S >= 1, "[mla_decode] batch and tokens must be >= 1, got B=", B,
             ", S=", S);
  DSV3_CHECK(start_pos >= 0 && start_pos + S <= cache.max_len, "[mla_decode] start_pos (",
             start_pos, ") + tokens (", S, ") exceeds the cache capacity (", cache.max_len, ")");
  const int64_t R = B * S, W = d.Dc + d.Dr;
  DecodeStep st{row_positions(B, S, start_pos), std::vector<float>((size_t)(R * d.H * d.dqk()))};
  project_q(st.q.data(), nullptr, nullptr, nullptr, x, p, d, st.pos.data(), R);
  std::vector<float> ckv((size_t)(R * d.Dc)), rstd((size_t)R), c((size_t)(R * d.Dc)),
      kpe((size_t)(R * d.Dr));
  project_latent(ckv.data(), rstd.data(), c.data(), kpe.data(), x, p, d, st.pos.data(), R);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) {
      float* row = cache.data + (b * cache.max_len + start_pos + s) * W;
      std::memcpy(row, c.data() + (b * S + s) * d.Dc, sizeof(float) * d.Dc);
      std::memcpy(row + d.Dc, kpe.data() + (b * S + s) * d.Dr, sizeof(float) * d.Dr);
      if (cache.round_bf16)
        for (int64_t j = 0; j < W; ++j) row[j] = bf16_decode(bf16_encode(row[j]));
    }
  return st;
}

// kv_b_proj as a weight view: the stored bf16 / fp8 weight (kv_b_view), else the slab's fp32
WeightView kv_b_weight(const MlaParams& p, const MlaDims& d) {
  return p.kv_b_view.data ? p.kv_b_view : WeightView::f32(p.kv_b_proj, d.H * (d.Dn + d.Dv), d.Dc);
}

// Rows [r0, r0 + n) of an fp32 / bf16 view as a view of their own (no scales to offset)
WeightView rows_view(const WeightView& w, int64_t r0, int64_t n) {
  const int64_t row_bytes = weight_format_bytes(w.fmt, 1, w.K);
  return {w.fmt, (const char*)w.data + r0 * row_bytes, nullptr, n, w.K};
}

// Rows [r0, r0 + n) of kv_b_proj as fp32: the slab's rows, or (kv_b_view set) those rows of
// the stored bf16 / fp8 weight dequantized into buf (bit-identical to the slab's values).
const float* kv_b_rows(const MlaParams& p, const MlaDims& d, int64_t r0, int64_t n,
                       std::vector<float>& buf) {
  if (!p.kv_b_view.data) return p.kv_b_proj + r0 * d.Dc;
  std::vector<int64_t> ids((size_t)n);
  for (int64_t i = 0; i < n; ++i) ids[i] = r0 + i;
  buf.resize((size_t)(n * d.Dc));
  wlinear_rows(buf.data(), ids.data(), p.kv_b_view, n);
  return buf.data();
}

}  // namespace

// Over 80 lines: the absorbed decode is four stages (absorb q into the latent space, chunked
// attention over the cache, the deterministic merge of the chunks, the value up-projection)
// that share the chunking plan and its buffers; it is the hot loop of generation, kept whole.
void mla_decode_absorbed(float* out, const float* x, const MlaParams& p, const MlaDims& d,
                         const LatentCacheView& cache, int64_t B, int64_t S, int64_t start_pos) {
  DecodeStep st = decode_prologue(x, p, d, cache, B, S, start_pos);
  const int64_t R = B * S, W = d.Dc + d.Dr, Q = d.H * d.dqk(), L = start_pos + S;
  // q_abs [R, H, Dc+Dr] = [q_nope_h @ W_UK_h | q_pe_h]
  std::vector<float> qa((size_t)(R * d.H * W));
  const WeightView kv_b = kv_b_weight(p, d);
  // heads per task: ~64K multiply-adds (a quarter MiB of kv_b_proj for one decoded row),
  // enough to pay for waking a thread; decoding's per-head products are memory-bound reads of
  // kv_b_proj, so a layer's 16+ heads must not all run on one thread
  const int64_t head_grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, R * d.Dn * d.Dc));
  parallel_for(d.H, head_grain, [&](int64_t h0, int64_t h1) {
    std::vector<float> wbuf;
    for (int64_t h = h0; h < h1; ++h) {
      // one head's product (R x Dn x Dc): decoding's few rows straight from the stored rows
      // (wlinear_rows_product: W_UK read once in its format, no per-head fp32 copy; a row's
      // value does not depend on R: speculative verification = plain decoding); a prefill on
      // sgemm
      if (R <= kLinearGemvRows)
        wlinear_rows_product(qa.data() + h * W, d.H * W, st.q.data() + h * d.dqk(), Q, kv_b,
                             h * (d.Dn + d.Dv), d.Dn, R);
      else
        sgemm(false, false, R, d.Dc, d.Dn, 1.f, st.q.data() + h * d.dqk(), Q,
              kv_b_rows(p, d, h * (d.Dn + d.Dv), d.Dn, wbuf), d.Dc, 0.f, qa.data() + h * W,
              d.H * W);
      for (int64_t r = 0; r < R; ++r)
        std::memcpy(qa.data() + (r * d.H + h) * W + d.Dc, st.q.data() + r * Q + h * d.dqk() + d.Dn,
                    sizeof(float) * d.Dr);
    }
  });
  // One product per (sequence, block of query rows, chunk of keys) against the cache; rows are
  // (s, h); the softmax pieces of the chunks are merged afterwards in chunk order. Chunks hold
  // at most kChunkKeys cached rows (e.g. 320 KiB at 640 B/row), so a chunk is still in L2 when
  // the context product reads it again after the scores product: the cache comes from memory
  // once, not twice. Shorter contexts are split only to give idle threads work (decoding one
  // sequence).
  // query rows per product: decoding / verification calls (S <= 16) use blocks of the GEMV's
  // 16 rows, so a row's scores do not depend on the call's other rows (speculative
  // verification = plain decoding); a prompt's prefill uses blocks of 64 rows and sgemm
  const int64_t kRows = S <= kLinearGemvRows ? kLinearGemvRows : 64;
  const int64_t M = S * d.H, blocks = (M + kRows - 1) / kRows;
  const int64_t nt = num_threads();
  constexpr int64_t kChunkKeys = 512, kDecodeChunk = 256;
  // Decoding / verification calls (S <= 16) cut the keys at fixed multiples of kDecodeChunk and
  // always merge softmax pieces: a query row's chunks, pieces and merge are then the same
  // whatever the call's length, so speculative verification equals plain decoding at any
  // context. A prefill sizes its chunks by its length and the idle threads.
  const bool decode = S <= kLinearGemvRows;
  int64_t parts = (B * blocks < nt && L >= 512) ? std::min<int64_t>(nt, L / 256) : 1;
  parts = std::max(parts, (L + kChunkKeys - 1) / kChunkKeys);
  if (decode) parts = (L + kDecodeChunk - 1) / kDecodeChunk;
  const int64_t chunk = decode ? kDecodeChunk : (L + parts - 1) / parts;
  const bool pieces = decode || parts > 1;
  std::vector<float> ctx((size_t)(R * d.H * d.Dc));  // [R, H, Dc] latent context
  std::vector<float> pctx(pieces ? (size_t)(parts * R * d.H * d.Dc) : 0);
  std::vector<SoftmaxPiece> piece(pieces ? (size_t)(parts * R * d.H) : 0);
  parallel_for(B * blocks * parts, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> sc((size_t)(kRows * chunk));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t part = t % parts, bb = t / parts;
      const int64_t b = bb / blocks, m0 = (bb % blocks) * kRows, m = std::min(kRows, M - m0);
      const int64_t k0 = part * chunk, n = std::min(L, k0 + chunk) - k0;
      if (n <= 0) continue;
      const float* cb = cache.data + (b * cache.max_len + k0) * W;
      // scores = scale * q_abs c^T: decoding's <= 16-row blocks on the GEMV over the chunk's
      // rows (no BLAS call), a prefill's 64-row blocks on sgemm
      if (kRows <= kLinearGemvRows) {
        linear_forward(sc.data(), qa.data() + (b * M + m0) * W, cb, m, W, n, GemmPrecision::fp32);
        for (int64_t i = 0; i < m * n; ++i) sc[i] *= d.scale;
      } else {
        sgemm(false, true, m, n, W, d.scale, qa.data() + (b * M + m0) * W, W, cb, W, 0.f,
              sc.data(), n);
      }
      for (int64_t i = 0; i < m; ++i) {
        const int64_t s = (m0 + i) / d.H, visible = std::min(n, start_pos + s + 1 - k0);
        if (!pieces)
          softmax_row(sc.data() + i * n, visible, n);
        else
          piece[(part * B * M) + b * M + m0 + i] = softmax_piece(sc.data() + i * n, visible, n);
      }
      float* dst = !pieces ? ctx.data() : pctx.data() + part * R * d.H * d.Dc;
      small_gemm(false, m, d.Dc, n, 1.f, sc.data(), n, cb, W, false, dst + (b * M + m0) * d.Dc,
                 d.Dc);
    }
  });
  if (pieces) {  // merge the pieces in part order (deterministic)
    const int64_t rows = B * M;
    parallel_for(rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float mx = -INFINITY;
        for (int64_t q = 0; q < parts; ++q) mx = std::max(mx, piece[q * rows + r].max);
        float denom = 0.f;
        float* out = ctx.data() + r * d.Dc;
        std::fill_n(out, d.Dc, 0.f);
        for (int64_t q = 0; q < parts; ++q) {
          const SoftmaxPiece pc = piece[q * rows + r];
          if (pc.sum == 0.f) continue;
          const float w = std::exp(pc.max - mx);
          denom += w * pc.sum;
          const float* src = pctx.data() + q * R * d.H * d.Dc + r * d.Dc;
          for (int64_t j = 0; j < d.Dc; ++j) out[j] += w * src[j];
        }
        const float inv = 1.f / denom;
        for (int64_t j = 0; j < d.Dc; ++j) out[j] *= inv;
      }
    });
  }
  // o_h = ctx_h @ W_UV_h^T (the head's rows, one linear: the GEMV for decoding's few rows, no
  // BLAS call per head; fp32 / bf16 rows read in place, fp8 ones dequantized, so that the
  // value equals the fp32 copy's: the GEMV sums fp8 per scale block), then o_proj
  std::vector<float> o((size_t)(R * d.H * d.Dv));
  parallel_for(d.H, head_grain, [&](int64_t h0, int64_t h1) {
    std::vector<float> wbuf;
    if (R > kLinearGemvRows) {  // a prefill: one strided sgemm per head
      for (int64_t h = h0; h < h1; ++h)
        sgemm(false, true, R, d.Dv, d.Dc, 1.f, ctx.data() + h * d.Dc, d.H * d.Dc,
              kv_b_rows(p, d, h * (d.Dn + d.Dv) + d.Dn, d.Dv, wbuf), d.Dc, 0.f,
              o.data() + h * d.Dv, d.H * d.Dv);
      return;
    }
    std::vector<float> xin((size_t)(R * d.Dc)), yout((size_t)(R * d.Dv));
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t r = 0; r < R; ++r)
        std::memcpy(xin.data() + r * d.Dc, ctx.data() + (r * d.H + h) * d.Dc, 4 * d.Dc);
      const int64_t row = h * (d.Dn + d.Dv) + d.Dn;
      if (kv_b.fmt == WeightFormat::fp8_e4m3)
        linear_forward(yout.data(), xin.data(), kv_b_rows(p, d, row, d.Dv, wbuf), R, d.Dc, d.Dv,
                       GemmPrecision::fp32);
      else  // the head's rows as a view of their own
        wlinear_forward(yout.data(), xin.data(), rows_view(kv_b, row, d.Dv), R);
      for (int64_t r = 0; r < R; ++r)
        std::memcpy(o.data() + (r * d.H + h) * d.Dv, yout.data() + r * d.Dv, 4 * d.Dv);
    }
  });
  linear_forward(out, o.data(), p.o_proj, R, d.H * d.Dv, d.D, p.precision);
}

void mla_decode_naive(float* out, const float* x, const MlaParams& p, const MlaDims& d,
                      const LatentCacheView& cache, int64_t B, int64_t S, int64_t start_pos) {
  DecodeStep st = decode_prologue(x, p, d, cache, B, S, start_pos);
  const int64_t W = d.Dc + d.Dr, Q = d.H * d.dqk(), L = start_pos + S;
  std::vector<float> kv((size_t)(L * kv_ld(d))), o((size_t)(B * S * d.H * d.Dv));
  for (int64_t b = 0; b < B; ++b) {
    const float* cb = cache.data + b * cache.max_len * W;
    decompress(kv.data(), cb, W, p, d, L);
    attention_forward(o.data() + b * S * d.H * d.Dv, nullptr,
                      {st.q.data() + b * S * Q, kv.data(), kv.data() + d.Dn, cb + d.Dc},
                      kv_shape(d, 1, S, L, start_pos, W));
  }
  linear_forward(out, o.data(), p.o_proj, B * S, d.H * d.Dv, d.D, p.precision);
}

}  // namespace dsv3
