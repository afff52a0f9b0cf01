// The parameter slab: every weight of the model in one float32 buffer, laid out in a fixed
// order under its Hugging Face name. Gradients and AdamW moments use slabs of the same layout.
//
//   model.embed_tokens.weight                      [V, D]
//   model.layers.{i}.input_layernorm.weight        [D]
//   model.layers.{i}.self_attn.*                   MLA: q_a_proj, q_a_layernorm, q_b_proj |
//                                                  q_proj; kv_a_proj_with_mqa, kv_a_layernorm,
//                                                  kv_b_proj, o_proj   (MHA/GQA: q/k/v/o_proj)
//   model.layers.{i}.post_attention_layernorm.weight [D]
//   model.layers.{i}.mlp.{gate,up,down}_proj.weight                      (dense layers)
//   model.layers.{i}.mlp.gate.weight [E, D], .gate.e_score_correction_bias [E] (noaux_tc),
//   model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight, .shared_experts.*  (MoE)
//   MTP module k at i = num_hidden_layers + k: enorm, hnorm [D], eh_proj [D, 2D],
//   shared_head.norm [D], and a full block as above (its embedding and head are the main ones)
//   model.norm.weight [D];  lm_head.weight [V, D] (absent when tied)
#pragma once
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "model/config.h"

namespace dsv3 {

struct ParamEntry {
  enum Init { Normal, Ones, Zeros };
  std::string name;
  std::vector<int64_t> shape;
  int64_t offset = 0, size = 0;
  Init init = Normal;
  bool decay = false;      // AdamW weight decay applies (matrices)
  bool trainable = true;   // false for e_score_correction_bias (moved by the balancer)
};

struct ParamLayout {
  std::vector<ParamEntry> entries;
  std::unordered_map<std::string, size_t> index;
  int64_t total = 0;

  const ParamEntry& at(const std::string& name) const;  // throws std::out_of_range
  bool has(const std::string& name) const { return index.count(name) != 0; }
  float* ptr(float* slab, const std::string& name) const { return slab + at(name).offset; }
  const float* ptr(const float* slab, const std::string& name) const {
    return slab + at(name).offset;
  }
};

ParamLayout build_layout(const ModelConfig& c);

// Normal(0, init_range) for matrices, ones for norms, zeros for biases; entry e draws from
// its own counter stream (hash of its name), so the values depend only on (seed, name).
void init_params(float* slab, const ParamLayout& layout, uint64_t seed, float init_range);

}  // namespace dsv3
