#include "kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/blas.h"
#include "core/check.h"
#include "core/env.h"
#include "core/mathfn.h"
#include "core/parallel.h"
#include "core/simd.h"
#include "core/small_gemm.h"
#include "kernels/softmax.h"

namespace dsv3 {

namespace {

constexpr int64_t kBlock = 32;  // query rows per block (32 wastes half as much of the causal
                                // mask as 64 on the diagonal blocks; measured best at T 512)

// Row stride of a transposed [D, n] key block: not a multiple of 4 KiB apart, so a column
// panel's rows do not all fall into the same L1 sets.
inline int64_t padded_ld(int64_t n) { return (n + 15) / 16 * 16 + 16; }

// Queries per head below which the keys are not transposed for small_gemm: a transposed copy
// costs a pass over the keys, as much as the products of ~8 query rows (cached decoding
// attends with 1..few queries to thousands of keys). Without the AVX-512 product, sgemm
// reads the keys as they are.
constexpr int64_t kTransposeMinRows = 16;

// One head's keys (or values) as product operands: `own` dims at row stride ld_own, then
// `shared` dims (MLA's k_pe) at row stride ld_shared.
struct Keys {
  const float* own;
  int64_t ld_own, d_own;
  const float* shared = nullptr;
  int64_t ld_shared = 0, d_shared = 0;
};

// C[m, n] = alpha * A[m, D] keys^T: from the transposed copy bt (row stride ldt) when there is
// one, else by sgemm on the keys themselves.
inline void scores(int64_t m, int64_t n, float alpha, const float* a, int64_t lda,
                   const Keys& k, const float* bt, int64_t ldt, float* c) {
  if (bt) {
    small_gemm(false, m, n, k.d_own + k.d_shared, alpha, a, lda, bt, ldt, false, c, n);
    return;
  }
  sgemm(false, true, m, n, k.d_own, alpha, a, lda, k.own, k.ld_own, 0.f, c, n);
  if (k.d_shared)
    sgemm(false, true, m, n, k.d_shared, alpha, a + k.d_own, lda, k.shared, k.ld_shared, 1.f, c,
          n);
}

// kt [D, ldt] <- the keys' first nk rows, transposed.
inline void transpose_keys(float* kt, int64_t ldt, const Keys& k, int64_t nk) {
  transpose_rows(kt, ldt, k.own, k.ld_own, nk, k.d_own);
  if (k.d_shared) transpose_rows(kt + k.d_own * ldt, ldt, k.shared, k.ld_shared, nk, k.d_shared);
}

// Visible keys for query row i: [0, n).
inline int64_t visible(const AttnShape& s, int64_t i) {
  return std::min(s.Tk, s.start_pos + i + 1);
}

// A dS row of the backward, in place in dp: dS = P * (dP - delta), delta = o . dO of the row.
// Here P = exp(S - lse) is formed in p from the scores (0 beyond the visible n) ...
DSV3_SIMD_CLONES void softmax_back_row(float* p, float* dp, float lse, const float* o,
                                       const float* d_o, int64_t Dv, int64_t n, int64_t width) {
  const float delta = dot_lanes(o, d_o, Dv);
  for (int64_t j = 0; j < n; ++j) {
    p[j] = exp_f32(p[j] - lse);
    dp[j] = p[j] * (dp[j] - delta);
  }
  for (int64_t j = n; j < width; ++j) p[j] = dp[j] = 0.f;
}

// ... and here P = p * inv from the kept unnormalised exps p.
DSV3_SIMD_CLONES void softmax_back_kept(const float* p, float inv, float* dp, const float* o,
                                        const float* d_o, int64_t Dv, int64_t n, int64_t width) {
  const float delta = dot_lanes(o, d_o, Dv);
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * inv * (dp[j] - delta);
  for (int64_t j = n; j < width; ++j) dp[j] = 0.f;
}

// One block of m query rows (row stride ldq) against the first n keys: P = exp(scale q k^T -
// row max) in P (m x n: scratch, or the kept probabilities), o rows (stride ldo) = P v / sum.
// Row i sees min(n, vis0 + i * vis_step) keys; row i's 1/sum goes to inv[i], its log-sum-exp
// to lse[i] (when lse is given).
void attend_block(const AttnShape& s, int64_t m, int64_t n, int64_t vis0, int64_t vis_step,
                  const float* q, int64_t ldq, const Keys& kb, const float* kt, int64_t ldt,
                  const float* v, int64_t ldv, float* o, int64_t ldo, float* P, float* inv,
                  float* lse) {
  scores(m, n, s.scale, q, ldq, kb, kt, ldt, P);
  for (int64_t i = 0; i < m; ++i) {
    const SoftmaxPiece p = softmax_piece(P + i * n, std::min(n, vis0 + i * vis_step), n);
    inv[i] = 1.f / p.sum;
    if (lse) lse[i] = p.max + std::log(p.sum);
  }
  // the 1/sum goes on the m x Dv output rows instead of the m x n probabilities
  small_gemm(false, m, s.Dv, n, 1.f, P, n, v, ldv, false, o, ldo);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < s.Dv; ++j) o[i * ldo + j] *= inv[i];
}

// Kept probabilities of one head: 1/sum of every query row (Tq floats), then the unnormalised
// exps of the query blocks one after another, each m x n (the keys its last row sees). The
// forward walks the blocks first to last, the backward last to first. Floats per head:
int64_t probs_per_head(const AttnShape& s) {
  int64_t off = s.Tq;
  for (int64_t r = 0; r < s.Tq; r += kBlock) {
    const int64_t m = std::min(kBlock, s.Tq - r);
    off += m * visible(s, r + m - 1);
  }
  return off;
}

}  // namespace

int64_t attention_probs_per_batch(const AttnShape& s) { return s.H * probs_per_head(s); }

void AttnProbs::prepare(const AttnShape& s, bool keep) {
  if (!keep || !attention_keep_probs(s)) {
    batch.clear();
    ptr.clear();
    return;
  }
  batch.resize((size_t)s.B);
  ptr.resize((size_t)s.B);
  for (int64_t b = 0; b < s.B; ++b) {
    batch[b].resize((size_t)attention_probs_per_batch(s));
    ptr[b] = batch[b].data();
  }
}

bool attention_keep_probs(const AttnShape& s) {
  const bool allowed = env_settings().keep_attn_probs;  // DSV3_KEEP_ATTN_PROBS=0: recompute
  // and one sequence's buffer under malloc's 32 MiB mmap threshold (see attention.h)
  return allowed && s.H * s.Tk <= 8192 && attention_probs_per_batch(s) <= (8 << 20);
}

void attention_check(const AttnShape& s) {
  DSV3_CHECK(s.B >= 1 && s.Tq >= 1 && s.Tk >= 1 && s.H >= 1 && s.Hkv >= 1 && s.Dk >= 1 &&
                 s.Dv >= 1,
             "[attention] every dimension must be >= 1 (B=", s.B, ", Tq=", s.Tq, ", Tk=", s.Tk,
             ", H=", s.H, ", Hkv=", s.Hkv, ", Dk=", s.Dk, ", Dv=", s.Dv, ")");
  DSV3_CHECK(s.H % s.Hkv == 0, "[attention] query heads (", s.H,
             ") must be a multiple of key/value heads (", s.Hkv, ")");
  DSV3_CHECK(s.start_pos >= 0, "[attention] start_pos must be >= 0, got ", s.start_pos);
  DSV3_CHECK(s.Tk >= s.start_pos + s.Tq, "[attention] k/v hold ", s.Tk,
             " tokens but start_pos + Tq = ", s.start_pos + s.Tq, " are needed");
  DSV3_CHECK(std::isfinite(s.scale), "[attention] scale must be finite, got ", s.scale);
  DSV3_CHECK(s.hsv() >= s.Dv && s.ldv() >= (s.Hkv - 1) * s.hsv() + s.Dv,
             "[attention] v strides (row ", s.ldv(), ", head ", s.hsv(), ") overlap its heads");
  const int64_t own = s.Dk - s.k_shared;
  DSV3_CHECK(s.k_shared >= 0 && own >= 1 && s.hsk() >= own &&
                 s.ldk() >= (s.Hkv - 1) * s.hsk() + own && s.ldkr() >= s.k_shared,
             "[attention] k split (shared ", s.k_shared, " of ", s.Dk, " dims, row ", s.ldk(),
             ", head ", s.hsk(), ") is inconsistent");
}

void attention_forward(float* o, float* lse, const AttnInputs& in, const AttnShape& s,
                       float* const* probs) {
  const float *q = in.q, *k = in.k, *v = in.v, *kr = in.kr;
  attention_check(s);
  DSV3_CHECK(!s.k_shared || kr, "[attention] split keys need the shared part");
  const int64_t ldq = s.H * s.Dk, ldk = s.ldk(), ldv = s.ldv(), ldo = s.H * s.Dv;
  const int64_t ks = s.k_shared, ldr = s.ldkr();
  const int64_t group = s.H / s.Hkv;
  if (s.Tq == 1 && group > 1 && !probs && s.B * s.Hkv >= num_threads()) {
    // One decoded token of GQA: the group's query heads are the rows of one product, so each
    // kv head's keys and values are read once per token, not once per query head.
    const int64_t n = visible(s, 0);
    parallel_for(s.B * s.Hkv, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> S((size_t)(group * n)), inv((size_t)group);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / s.Hkv, hk = t % s.Hkv, h0 = hk * group;
        const Keys kb{k + b * s.Tk * ldk + hk * s.hsk(), ldk, s.Dk - ks,
                      ks ? kr + b * s.Tk * ldr : nullptr, ldr, ks};
        // the group's rows: Dk apart in q, Dv apart in o, consecutive in lse
        attend_block(s, group, n, n, 0, q + b * ldq + h0 * s.Dk, s.Dk, kb, nullptr, 0,
                     v + b * s.Tk * ldv + hk * s.hsv(), ldv, o + b * ldo + h0 * s.Dv, s.Dv,
                     S.data(), inv.data(), lse ? lse + b * s.H + h0 : nullptr);
      }
    });
    return;
  }
  const int64_t nk = visible(s, s.Tq - 1), ldt = padded_ld(nk);  // keys any query sees
  const bool tr = small_gemm_vectorized() && s.Tq >= kTransposeMinRows;
  const int64_t per_head = probs ? probs_per_head(s) : 0;
  parallel_for(s.B * s.H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> S(probs ? 0 : (size_t)(kBlock * nk)), inv(kBlock),
        kt(tr ? (size_t)(s.Dk * ldt) : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / s.H, h = t % s.H, hk = h / group;
      const float* qb = q + b * s.Tq * ldq + h * s.Dk;
      const Keys kb{k + b * s.Tk * ldk + hk * s.hsk(), ldk, s.Dk - ks,
                    ks ? kr + b * s.Tk * ldr : nullptr, ldr, ks};
      const float* vb = v + b * s.Tk * ldv + hk * s.hsv();
      float* ob = o + b * s.Tq * ldo + h * s.Dv;
      float* pinv = probs ? probs[b] + h * per_head : nullptr;  // this head's kept 1/sums
      float* pk = probs ? pinv + s.Tq : nullptr;                // and blocks
      if (tr) transpose_keys(kt.data(), ldt, kb, nk);
      for (int64_t i0 = 0; i0 < s.Tq; i0 += kBlock) {
        const int64_t m = std::min(kBlock, s.Tq - i0);
        const int64_t n = visible(s, i0 + m - 1);  // keys any row of the block can see
        float* P = pk ? pk : S.data();  // the kept unnormalised exps, or scratch
        attend_block(s, m, n, s.start_pos + i0 + 1, 1, qb + i0 * ldq, ldq, kb,
                     tr ? kt.data() : nullptr, ldt, vb, ldv, ob + i0 * ldo, ldo, P, inv.data(),
                     lse ? lse + (b * s.H + h) * s.Tq + i0 : nullptr);
        if (pinv) std::copy_n(inv.data(), m, pinv + i0);
        if (pk) pk += m * n;
      }
    }
  });
}

// ~100 lines: one parallel task per (batch, kv head) whose per-block body shares its buffers
// and layout variables (split keys, kept probabilities, transposed panels); split, it would
// pass a dozen of them between pieces. The hot loop is measured as it stands.
void attention_backward(const AttnGrads& g, const float* d_o, const AttnSaved& saved,
                        const AttnInputs& in, const AttnShape& s) {
  float *dq = g.dq, *dk = g.dk, *dv = g.dv, *dkr = g.dkr;
  const bool set = g.set;
  const float *o = saved.o, *lse = saved.lse;
  const float* const* probs = saved.probs;
  const float *q = in.q, *k = in.k, *v = in.v, *kr = in.kr;
  attention_check(s);
  DSV3_CHECK(!s.k_shared || kr, "[attention] split keys need the shared part");
  const int64_t ldq = s.H * s.Dk, ldk = s.ldk(), ldv = s.ldv(), ldo = s.H * s.Dv;
  const int64_t ks = s.k_shared, ko = s.Dk - ks, ldr = s.ldkr();
  const int64_t group = s.H / s.Hkv;
  const int64_t last = (s.Tq - 1) / kBlock * kBlock;  // first row of the last query block
  // One task per (batch, kv head): the heads of a group accumulate into the same dk/dv rows,
  // so they run in order inside the task (deterministic, no races). Blocks run last to first:
  // the last block sees the most keys, so with `set` its products overwrite dk/dv rows
  // [0, n) and only the keys no query sees are zeroed explicitly.
  const int64_t nk = visible(s, s.Tq - 1), ldt = padded_ld(nk);
  const bool tr = small_gemm_vectorized() && s.Tq * group >= kTransposeMinRows;
  const bool trk = tr && !probs;  // kept probabilities: no q k^T, no transposed keys
  const int64_t per_head = probs ? probs_per_head(s) : 0;
  parallel_for(s.B * s.Hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> P(probs ? 0 : (size_t)(kBlock * nk)), dP((size_t)(kBlock * nk)),
        dOs(probs ? (size_t)(kBlock * s.Dv) : 0),
        kt(trk ? (size_t)(s.Dk * ldt) : 0), vt(tr ? (size_t)(s.Dv * ldt) : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / s.Hkv, hk = t % s.Hkv;
      const Keys kb{k + b * s.Tk * ldk + hk * s.hsk(), ldk, ko,
                    ks ? kr + b * s.Tk * ldr : nullptr, ldr, ks};
      const Keys vk{v + b * s.Tk * ldv + hk * s.hsv(), ldv, s.Dv};
      float* dkb = dk ? dk + b * s.Tk * ldk + hk * s.hsk() : nullptr;
      float* dvb = dv ? dv + b * s.Tk * ldv + hk * s.hsv() : nullptr;
      float* dkrb = ks && dkr ? dkr + b * s.Tk * s.H * ks : nullptr;  // [Tk, H, ks]
      if (trk) transpose_keys(kt.data(), ldt, kb, nk);
      if (tr) transpose_keys(vt.data(), ldt, vk, nk);
      bool first = set;  // the next dk/dv product overwrites
      if (set)
        for (int64_t j = nk; j < s.Tk; ++j) {
          if (dkb) std::fill_n(dkb + j * ldk, ko, 0.f);
          if (dvb) std::fill_n(dvb + j * ldv, s.Dv, 0.f);
          if (dkrb) std::fill_n(dkrb + (j * s.H + hk * group) * ks, group * ks, 0.f);
        }
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const float* qb = q + b * s.Tq * ldq + h * s.Dk;
        const float* ob = o + b * s.Tq * ldo + h * s.Dv;
        const float* dob = d_o + b * s.Tq * ldo + h * s.Dv;
        const float* lb = lse + (b * s.H + h) * s.Tq;
        bool first_r = set;  // this head's dkr slots: the next product overwrites
        const float* pinv = probs ? probs[b] + h * per_head : nullptr;  // kept 1/sums
        int64_t kept_end = per_head;  // the kept blocks end here; walked back block by block
        for (int64_t i0 = last; i0 >= 0; i0 -= kBlock) {
          const int64_t m = std::min(kBlock, s.Tq - i0);
          const int64_t n = visible(s, i0 + m - 1);
          kept_end -= m * n;
          // P <- the kept probabilities, or scale * q k^T (softmax applied below); dP <- dO v^T
          const float* pb = probs ? pinv + kept_end : P.data();
          if (!probs)
            scores(m, n, s.scale, qb + i0 * ldq, ldq, kb, trk ? kt.data() : nullptr, ldt,
                   P.data());
          scores(m, n, 1.f, dob + i0 * ldo, ldo, vk, tr ? vt.data() : nullptr, ldt, dP.data());
          for (int64_t i = 0; i < m; ++i) {
            const float *orow = ob + (i0 + i) * ldo, *dorow = dob + (i0 + i) * ldo;
            if (probs)
              softmax_back_kept(pb + i * n, pinv[i0 + i], dP.data() + i * n, orow, dorow, s.Dv,
                                visible(s, i0 + i), n);
            else
              softmax_back_row(P.data() + i * n, dP.data() + i * n, lb[i0 + i], orow, dorow,
                               s.Dv, visible(s, i0 + i), n);
          }
          // dv += P^T dO ; dq += scale * dS k ; dk += scale * dS^T q  (with set: the first
          // product into a row overwrites it)
          const bool acc_kv = !first;
          first = false;
          if (dvb && probs) {  // P^T dO = P_unnormalised^T (dO rows times their 1/sum)
            for (int64_t i = 0; i < m; ++i)
              for (int64_t d = 0; d < s.Dv; ++d)
                dOs[i * s.Dv + d] = dob[(i0 + i) * ldo + d] * pinv[i0 + i];
            small_gemm(true, n, s.Dv, m, 1.f, pb, n, dOs.data(), s.Dv, acc_kv, dvb, ldv);
          } else if (dvb) {
            small_gemm(true, n, s.Dv, m, 1.f, pb, n, dob + i0 * ldo, ldo, acc_kv, dvb, ldv);
          }
          if (dq) {
            float* dqb = dq + b * s.Tq * ldq + h * s.Dk + i0 * ldq;
            small_gemm(false, m, ko, n, s.scale, dP.data(), n, kb.own, ldk, !set, dqb, ldq);
            if (ks)
              small_gemm(false, m, ks, n, s.scale, dP.data(), n, kb.shared, ldr, !set, dqb + ko,
                         ldq);
          }
          if (dkb)
            small_gemm(true, n, ko, m, s.scale, dP.data(), n, qb + i0 * ldq, ldq, acc_kv, dkb,
                       ldk);
          if (dkrb) {
            small_gemm(true, n, ks, m, s.scale, dP.data(), n, qb + i0 * ldq + ko, ldq, !first_r,
                       dkrb + h * ks, s.H * ks);
            first_r = false;
          }
        }
      }
    }
  });
}

}  // namespace dsv3
