// The model configuration as the engine sees it: the fields of dsv3.Config (Hugging Face
// DeepseekV3Config names in comments), already validated on the Python side and checked
// again here for what the engine relies on.
#pragma once
#include <cstdint>
#include <string>

#include "kernels/rope.h"

namespace dsv3 {

struct ModelConfig {
  int64_t V = 0;            // vocab_size
  int64_t D = 0;            // hidden_size
  int64_t inter = 0;        // intermediate_size (dense SwiGLU)
  int64_t moe_inter = 0;    // moe_intermediate_size
  int64_t layers = 0;       // num_hidden_layers
  int64_t mtp = 0;          // num_nextn_predict_layers
  int64_t H = 0;            // num_attention_heads
  int64_t Hkv = 0;          // key/value heads of the built attention (mha: H; gqa: num_key_value_heads)
  int64_t Dq = 0;           // q_lora_rank (0: q_proj)
  int64_t Dc = 0;           // kv_lora_rank
  int64_t Dn = 0, Dr = 0, Dv = 0;  // qk_nope_head_dim, qk_rope_head_dim, v_head_dim
  int64_t E = 0;            // n_routed_experts (0: every layer dense)
  int64_t n_shared = 0;     // n_shared_experts
  int64_t K = 0;            // num_experts_per_tok
  int64_t n_group = 1, topk_group = 1;
  std::string topk_method = "noaux_tc", scoring_func = "sigmoid";
  bool norm_topk_prob = true;
  float routed_scaling_factor = 1.f;
  int64_t first_k_dense = 0, moe_layer_freq = 1;
  float eps = 1e-6f;        // rms_norm_eps
  RopeParams rope;          // rope_theta, rope_scaling
  float softmax_scale = 0;  // (Dn+Dr)^-0.5 * mscale^2
  bool tie_embeddings = false;
  float init_range = 0.02f; // initializer_range
  std::string attention = "mla";  // attention_type

  bool is_moe_layer(int64_t i) const {
    return E > 0 && i >= first_k_dense && i % moe_layer_freq == 0;
  }
  int64_t blocks() const { return layers + mtp; }  // main layers then MTP blocks
};

void model_config_check(const ModelConfig& c);

}  // namespace dsv3
