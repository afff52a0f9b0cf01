// Multi-head Latent Attention (semantics §2.2): the training (naive) form with its backward, and
// cached decoding in the absorbed form.
//
// Legend:  B batch  T tokens (S tokens in a decode call)  R = B*T rows  D hidden
//          H heads  Dq q_lora_rank (0: a single q_proj)  Dc kv_lora_rank
//          Dn qk_nope_head_dim  Dr qk_rope_head_dim  Dv v_head_dim  L cached tokens
//
// Naive form, per token (x [D]):
//   q    = q_b_proj(rmsnorm_q(q_a_proj(x)))  or  q_proj(x)         [H, Dn+Dr]
//   q_pe = rope(q[:, Dn:])                                           per head
//   kva  = kv_a_proj_with_mqa(x) = [c_kv (Dc) | k_pe_raw (Dr)]
//   c    = kv_a_layernorm(c_kv)   k_pe = rope(k_pe_raw)              ONE k_pe for all heads
//   kv   = kv_b_proj(c)           = per head [k_nope (Dn) | v (Dv)]  [H, Dn+Dv]
//   o_h  = causal softmax(scale * (q_nope_h.k_nope_h + q_pe_h.k_pe)) @ v_h
//   out  = o_proj(concat_h o_h)
// Absorbed form (decoding): the cache holds only c and k_pe per token; per head
//   q_abs_h = q_nope_h @ W_UK_h (W_UK_h = kv_b rows of k_nope_h, [Dn, Dc])  -> [Dc]
//   scores  = scale * (q_abs_h.c_j + q_pe_h.k_pe_j)      (the same scale as the naive form)
//   x_h     = softmax @ c  (context in latent space, [Dc]);  o_h = W_UV_h x_h ([Dv, Dc])
// All heads share the same keys, so scores for every head and query come from ONE product
// against the cache: the cache is read once per call, not once per head.
#pragma once
#include <cstdint>
#include <vector>

#include "core/memory.h"
#include "kernels/precision.h"
#include "kernels/attention.h"
#include "kernels/rope.h"
#include "kernels/wlinear.h"

namespace dsv3 {

struct MlaDims {
  int64_t D, H, Dq, Dc, Dn, Dr, Dv;
  float eps;        // rms_norm_eps of q_a_layernorm and kv_a_layernorm
  float scale;      // softmax scale (YaRN mscale^2 included)
  RopeTable rope;
  int64_t dqk() const { return Dn + Dr; }
};
void mla_check_dims(const MlaDims& d);

// Weights, Hugging Face names and shapes ([out, in]). With Dq == 0 use q_proj; else q_a_proj,
// q_a_layernorm, q_b_proj. The projections are weight views (kernels/wlinear.h: fp32, or a
// resident bf16 / fp8 inference weight); the norms and kv_b_proj are fp32 pointers. kv_b_proj
// stays fp32 because the absorbed decode slices it per head (W_UK_h, W_UV_h) into its own
// products; a resident model holds it dequantized (as DeepSeek's inference code does for the
// absorbed form) and, when its checkpoint stored it in bf16 / fp8, also that stored form as
// kv_b_view: the absorbed decode then reads the 1-2 byte weights instead of streaming 4 bytes
// per weight, with kv_b_proj's exact values (the same dequantization, kernels/wlinear.h):
// W_UK through wlinear_rows_product, W_UV's bf16 rows through the GEMV in place, fp8 ones
// (and a prefill's heads) dequantized a head at a time into a per-task fp32 buffer.
struct MlaParams {
  WeightView q_a_proj;                        // [Dq, D]
  const float* q_a_layernorm = nullptr;       // [Dq]
  WeightView q_b_proj;                        // [H*(Dn+Dr), Dq]
  WeightView q_proj;                          // [H*(Dn+Dr), D]
  WeightView kv_a_proj_with_mqa;              // [Dc+Dr, D]
  const float* kv_a_layernorm = nullptr;      // [Dc]
  const float* kv_b_proj = nullptr;           // [H*(Dn+Dv), Dc]
  WeightView o_proj;                          // [D, H*Dv]
  WeightView kv_b_view;  // optional (after the layout's eight, aggregate-initialised in order):
                         // kv_b_proj as stored, bf16 / fp8
  LinearMode precision = LinearMode();  // of every projection (kernels/precision.h)
};
void mla_check_params(const MlaParams& p, const MlaDims& d);  // the weights d needs are set
struct MlaGrads {  // same layout; accumulated into
  float *q_a_proj = nullptr, *q_a_layernorm = nullptr, *q_b_proj = nullptr, *q_proj = nullptr,
        *kv_a_proj_with_mqa = nullptr, *kv_a_layernorm = nullptr, *kv_b_proj = nullptr,
        *o_proj = nullptr;
};

// What the forward saves for the backward (owned buffers, resized by the forward).
struct MlaActs {
  int64_t B = 0, T = 0;
  std::vector<int64_t> pos;  // [R] absolute positions
  FVec qa, qa_rstd, qa_n;    // [R,Dq] [R] [R,Dq]  (q_lora path)
  FVec q;                    // [R, H, Dn+Dr]  q_pe already roped
  FVec ckv;                  // [R, Dc]        c_kv before kv_a_layernorm
  FVec c_rstd, c;            // [R] [R, Dc]    normalised latent
  FVec kpe;                  // [R, Dr]        roped k_pe, shared by every head
  FVec kv;                   // [R, kv_ld]     kv_b_proj output, rows [H, Dn+Dv] + 16 unused
                             //                floats; k_nope and v are read from it in place
  FVec o, lse;               // [R, H*Dv]  [B, H, T]
  bool keep_probs = false;    // set by callers that run the backward: keep the attention
  AttnProbs probs;            // probabilities (when attention_keep_probs allows)
};

// out[B,T,D] = MLA(x[B,T,D]) at positions start_pos + t (naive form; saves acts).
void mla_forward(float* out, MlaActs& acts, const float* x, const MlaParams& p,
                 const MlaDims& d, int64_t B, int64_t T, int64_t start_pos);
// dx += ..., grads += ...   (acts from mla_forward on the same x; set_dx: dx = ...)
void mla_backward(float* dx, const MlaGrads& g, const float* d_out, const MlaActs& acts,
                  const float* x, const MlaParams& p, const MlaDims& d, bool set_dx = false);

// Latent cache of one layer: [B, max_len, Dc+Dr] rows = [c | k_pe], fp32.
struct LatentCacheView {
  float* data;
  int64_t max_len;
  bool round_bf16 = false;  // the cache stores bf16: write the new rows rounded to bf16
};

// Cached decoding, absorbed form. x[B,S,D] are the tokens at positions start_pos..start_pos+S-1
// of every sequence; their c and k_pe are written to the cache rows [start_pos, start_pos+S)
// and the queries attend to rows [0, start_pos + s] (the full S x (start_pos+S) causal mask).
void mla_decode_absorbed(float* out, const float* x, const MlaParams& p, const MlaDims& d,
                         const LatentCacheView& cache, int64_t B, int64_t S, int64_t start_pos);
// The same computation in the naive form over the same cache (k_nope and v decompressed from
// the cached latents at every call): the reference the absorbed form must match, and the
// "naive MLA" decode baseline.
void mla_decode_naive(float* out, const float* x, const MlaParams& p, const MlaDims& d,
                      const LatentCacheView& cache, int64_t B, int64_t S, int64_t start_pos);

}  // namespace dsv3
