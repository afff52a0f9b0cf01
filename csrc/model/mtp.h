// One Multi-Token Prediction module (docs/semantics.md §2.5). Training and drafting share the
// input projection (mtp_input_forward) and the output norm (mtp_output); the block between
// them is block_forward in training and the cached block_decode when drafting:
//   h'_i   = eh_proj([enorm(Emb(t_i)) | hnorm(h_prev_i)])      EMBEDDING FIRST (the order of
//            the released weights, the reverse of the paper's notation)
//   h^k_i  = Block_k(h')                                        a full (MoE) block
//   out_i  = shared_head.norm(h^k_i)                            the caller applies the shared
//                                                               lm_head (head(out) predicts
//                                                               the token after t_i)
// Module k reads h_prev = h^{k-1} (h^0: the main model's hidden state after model.norm) and
// t_i = the token k positions ahead of the main model's input at row i.
//
// Legend:  B sequences   L rows per sequence   R = B*L   D hidden   V vocabulary
//          ld: rows per sequence of a strided input (>= L); row i of sequence b is b*ld + i
#pragma once
#include <cstdint>
#include <vector>

#include "core/memory.h"
#include "model/block.h"

namespace dsv3 {

struct MtpParams {  // embed_tokens and eh_proj are weight views (kernels/wlinear.h)
  WeightView embed_tokens;                  // [V, D], the main model's (shared)
  const float* enorm = nullptr;             // [D]
  const float* hnorm = nullptr;             // [D]
  WeightView eh_proj;                       // [D, 2D]
  const float* shared_head_norm = nullptr;  // [D]
  BlockParams block;
  LinearMode precision = LinearMode();  // of eh_proj (the block's are in block)
};
struct MtpGrads {  // accumulated into; embed_tokens is the main model's gradient
  float* embed_tokens = nullptr;
  float* enorm = nullptr;
  float* hnorm = nullptr;
  float* eh_proj = nullptr;
  float* shared_head_norm = nullptr;
  BlockGrads block;
};

// What the input half keeps (for its backward); the drafting path discards it.
struct MtpInputActs {
  std::vector<int64_t> tok;            // [R]
  FVec h_prev, e, en, rstd_e, hpn, rstd_h, cat;  // [R,D] [R,D] [R,D] [R] [R,D] [R] [R,2D]
};
struct MtpActs {
  int64_t B = 0, L = 0;
  MtpInputActs in;
  FVec h_prime, hk, out, rstd_out;  // [R,D] [R,D] [R,D] [R]
  BlockActs block;
};

// h_prime[R,D] = eh_proj([enorm(Emb(tok)) | hnorm(h_prev)]): the one place the two halves are
// concatenated. tok [B, ld_tok] and h_prev [B, ld_h, D]: the first L rows of each sequence.
void mtp_input_forward(float* h_prime, MtpInputActs& a, const float* h_prev, int64_t ld_h,
                       const int64_t* tok, int64_t ld_tok, const MtpParams& p, int64_t V,
                       int64_t D, float eps, int64_t B, int64_t L);
// dh_prev[B, ld_h, D] (first L rows) += ..., grads += ...   from dh_prime[R,D]
void mtp_input_backward(float* dh_prev, int64_t ld_h, const MtpGrads& g, const float* dh_prime,
                        const MtpInputActs& a, const MtpParams& p, int64_t V, int64_t D,
                        int64_t B, int64_t L);

// out[R,D] = shared_head.norm(hk); rstd[R] (may be null) is kept for the backward.
void mtp_output(float* out, float* rstd, const float* hk, const MtpParams& p, int64_t R,
                int64_t D, float eps);

// Training form: a.hk = h^k, a.out = shared_head.norm(h^k) (both [B*L, D]). keep: a backward
// follows (the block keeps what makes it cheaper).
void mtp_forward(MtpActs& a, const float* h_prev, int64_t ld_h, const int64_t* tok,
                 int64_t ld_tok, const MtpParams& p, const BlockDims& d, int64_t V, int64_t B,
                 int64_t L, bool keep);
// dh_prev (first L rows of [B, ld_h, D]) += ..., grads += ...
// d_out [R,D]: gradient of a.out; d_hk [R,D] (may be null): extra gradient of h^k (from
// module k+1); d_scores_extra [R,E] (may be null): the balance loss's gate-score gradient.
void mtp_backward(float* dh_prev, int64_t ld_h, const MtpGrads& g, const float* d_out,
                  const float* d_hk, const float* d_scores_extra, const MtpActs& a,
                  const MtpParams& p, const BlockDims& d, int64_t V);

}  // namespace dsv3
