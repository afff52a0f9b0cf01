// Causal softmax attention core (per head), the part shared by MLA, MHA and GQA.
//
// Legend:  B batch   Tq query tokens   Tk key tokens   H query heads   Hkv key/value heads
//          (H % Hkv == 0; head h reads kv head h / (H / Hkv))   Dk q/k head dim   Dv v head dim
// Layouts: q[B,Tq,H,Dk]  k[B,Tk,Hkv,Dk]  v[B,Tk,Hkv,Dv]  o[B,Tq,H,Dv]  lse[B,H,Tq], contiguous
// unless AttnShape says v or k is strided or split.
//
// Query i sits at absolute position start_pos + i and sees keys j <= start_pos + i (and
// j < Tk): prefill is start_pos = 0, Tk = Tq; cached decoding passes the cache's keys with
// Tk >= start_pos + Tq. scores = scale * q.k; softmax in fp32; o = softmax @ v.
// lse[b,h,i] = logsumexp of the masked scores of row i (saved for the backward).
// Rows are processed in blocks of queries, so memory is O(block * Tk), not O(Tq * Tk), unless
// the probabilities are kept for the backward (see attention_forward).
#pragma once
#include <cstdint>
#include <vector>

#include "core/memory.h"

namespace dsv3 {

struct AttnShape {
  int64_t B, Tq, Tk, H, Hkv, Dk, Dv;
  int64_t start_pos;
  float scale;
  // v (and dv) may live inside a wider buffer: row stride v_row and head stride v_head in
  // floats (0: the contiguous layout above, Hkv*Dv and Dv). MLA reads v straight out of the
  // kv_b_proj output [.., H, Dn+Dv] this way.
  int64_t v_row = 0, v_head = 0;
  int64_t ldv() const { return v_row ? v_row : Hkv * Dv; }
  int64_t hsv() const { return v_head ? v_head : Dv; }
  // Keys may be split the same way: the first Dk - k_shared dims of each head come from k
  // (row stride k_row, head stride k_head; 0: contiguous), the last k_shared dims from one
  // array kr [B, Tk, k_shared] (row stride kr_row; 0: k_shared) every head shares: MLA's k_nope
  // read in place from the kv_b_proj output and its single roped k_pe.
  int64_t k_row = 0, k_head = 0, k_shared = 0, kr_row = 0;
  int64_t ldk() const { return k_row ? k_row : Hkv * (Dk - k_shared); }
  int64_t hsk() const { return k_head ? k_head : Dk - k_shared; }
  int64_t ldkr() const { return kr_row ? kr_row : k_shared; }
};

// The kept probabilities of one layer (see attention_forward): one buffer per sequence. Not
// copyable (ptr points into batch); moves keep the buffers.
struct AttnProbs {
  std::vector<FVec> batch;
  std::vector<float*> ptr;
  AttnProbs() = default;
  AttnProbs(AttnProbs&&) = default;
  AttnProbs& operator=(AttnProbs&&) = default;
  AttnProbs(const AttnProbs&) = delete;
  AttnProbs& operator=(const AttnProbs&) = delete;
  // Sizes the buffers for s when keep and attention_keep_probs(s) say so, else empties them.
  void prepare(const AttnShape& s, bool keep);
  float* const* get() const { return ptr.empty() ? nullptr : ptr.data(); }
};

void attention_check(const AttnShape& s);  // throws std::invalid_argument on bad shapes

// The inputs of a call: q, k, v in the layouts above and, with split keys, the shared key
// part kr [B, Tk, k_shared].
struct AttnInputs {
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  const float* kr = nullptr;
};

// o[B,Tq,H,Dv] and lse[B,H,Tq] (lse may be null). probs: when given, the forward also keeps
// the probabilities of every query block (the keys it can see; unnormalised exps and each
// row's 1/sum) for the backward, which then skips recomputing q k^T and all of the backward's
// exps, for about H * (Tk/2 + 17) floats per query token. probs[b] holds batch element b's
// (attention_probs_per_batch(s) floats: one allocation per sequence, kept under malloc's mmap
// threshold by the policy, so a training loop reuses warm pages). attention_keep_probs(s) is
// the policy the layers follow.
void attention_forward(float* o, float* lse, const AttnInputs& in, const AttnShape& s,
                       float* const* probs = nullptr);
int64_t attention_probs_per_batch(const AttnShape& s);
// True when H * Tk <= 8192 (e.g. 8 heads up to 1024 keys: ~16 KiB per query token) and one
// sequence's probabilities fit in 32 MiB; otherwise they are recomputed (memory O(T), not
// O(T^2)). DSV3_KEEP_ATTN_PROBS=0 in the environment (core/env.h) makes it always false.
bool attention_keep_probs(const AttnShape& s);

// What the forward saved: its o and lse, and the kept probabilities (or null: recompute).
struct AttnSaved {
  const float* o = nullptr;
  const float* lse = nullptr;
  const float* const* probs = nullptr;
};
// The gradients (any may be null). Accumulated into, or overwritten when set (then they need
// not be zeroed first). With split keys, dk has k's layout (its own dims) and dkr
// [B, Tk, H, k_shared] gets each query head's gradient of the shared dims (the caller sums
// over heads).
struct AttnGrads {
  float* dq = nullptr;
  float* dk = nullptr;
  float* dv = nullptr;
  float* dkr = nullptr;
  bool set = false;
};
void attention_backward(const AttnGrads& g, const float* d_o, const AttnSaved& saved,
                        const AttnInputs& in, const AttnShape& s);

}  // namespace dsv3
