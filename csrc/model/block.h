// One transformer block (semantics §2.1), pre-norm:
//   h_mid = h + attn(rmsnorm(h));   h_out = h_mid + ffn(rmsnorm(h_mid))
// attn is MLA (or the MHA/GQA baseline); ffn is the dense SwiGLU MLP for layers before
// first_k_dense_replace, DeepSeekMoE after. MTP modules reuse the same block.
//
// Legend:  B sequences   T tokens   R = B*T rows   D hidden
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/mha.h"
#include "kernels/mla.h"
#include "kernels/mlp.h"
#include "kernels/moe.h"
#include "model/config.h"

namespace dsv3 {

// Everything a block needs besides its weights: the attention and MoE dims of the model.
struct BlockDims {
  bool mla = true;
  MlaDims mla_dims;
  MhaDims mha_dims;
  MoeConfig moe;
  int64_t D = 0, inter = 0;
  float eps = 1e-6f;
};
BlockDims block_dims(const ModelConfig& c);

struct BlockParams {
  const float* input_layernorm = nullptr;           // [D]
  const float* post_attention_layernorm = nullptr;  // [D]
  MlaParams mla;
  MhaParams mha;
  bool moe = false;
  SwiGluParams mlp;  // dense layers
  MoeParams experts; // MoE layers (gate, bias, experts, shared_experts)
};
// The GEMM precision of every projection of the block (attention, dense MLP or experts).
inline void set_precision(BlockParams& b, const LinearMode& p) {
  b.mla.precision = b.mha.precision = b.mlp.precision = b.experts.precision = p;
}
struct BlockGrads {
  float* input_layernorm = nullptr;
  float* post_attention_layernorm = nullptr;
  MlaGrads mla;
  MhaGrads mha;
  SwiGluGrads mlp;
  MoeGrads experts;
};

struct BlockActs {
  int64_t B = 0, T = 0;
  FVec ln1, rstd1, h_mid, ln2, rstd2;  // [R,D] [R] [R,D] [R,D] [R]
  MlaActs mla;
  MhaActs mha;
  MlpActs mlp;
  std::vector<float> moe_f;      // MoE saved floats (moe_acts_size)
  std::vector<int64_t> moe_i;    // MoE saved ints
  MoeActs moe;                   // views into moe_f / moe_i
  MoeEpState moe_ep;             // expert-parallel training: the owner's rows (moe_ep.h)
  // before a forward whose backward will run: keep what makes the backward cheaper
  void keep_for_backward() { mla.keep_probs = mha.keep_probs = true; }
};

// h_out[R,D] = block(h_in[R,D]) at positions start_pos + t; saves acts for the backward.
void block_forward(float* h_out, BlockActs& a, const float* h_in, const BlockParams& p,
                   const BlockDims& d, int64_t B, int64_t T, int64_t start_pos);
// dh_in += ..., grads += ... ; d_scores_extra [R,E] (MoE layers, may be null) is an extra
// gradient on the gate scores (the balance loss).
void block_backward(float* dh_in, const BlockGrads& g, const float* dh_out,
                    const float* d_scores_extra, const BlockActs& a, const float* h_in,
                    const BlockParams& p, const BlockDims& d);

}  // namespace dsv3
