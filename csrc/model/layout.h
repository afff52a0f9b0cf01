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
//
// This file is the one source of those names: the builders below make the layout, the views of
// each module's weights (model.cpp), the per-layer weight lists of the Python layer ops
// (bindings) and the parameter counts of dsv3.Config.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

#include "kernels/wlinear.h"
#include "model/config.h"
#include "model/mtp.h"

namespace dsv3 {

struct ParamEntry {
  enum Init { Normal, Ones, Zeros };
  std::string name;
  std::vector<int64_t> shape;
  int64_t offset = 0, size = 0;
  Init init = Normal;
  bool decay = false;      // AdamW weight decay applies (matrices)
  bool trainable = true;   // false for e_score_correction_bias (moved by the balancer)
  int64_t block = -1;      // block index (main layers then MTP), -1 outside the blocks
  int64_t expert = -1;     // routed expert index inside an MoE block, else -1
  bool resident = false;   // held outside the slab in its storage format (offset -1, the
                           // entry keeps its shape and size for counting)
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

// Resident weights by full name (a model built from weights held in their storage format,
// model/resident.h): their entries have no slab storage.
using ResidentViews = std::unordered_map<std::string, WeightView>;

ParamLayout build_layout(const ModelConfig& c);
// The same entries with those named in resident marked resident (offset -1) and the others'
// offsets compacted: the slab of a resident model holds only the non-resident weights.
ParamLayout compact_layout(const ParamLayout& L, const ResidentViews& resident);
// Whether a weight may be held resident in bf16 / fp8 (the projection matrices: attention
// q/kv_a/o (MLA) and q/k/v/o (MHA) projections, the dense, routed and shared experts'
// gate/up/down_proj, eh_proj, the embedding and lm_head). Not: norms, biases, router gates,
// kv_b_proj (see kernels/mla.h).
bool resident_capable(const std::string& name);

// Names outside the blocks, and the prefix of block i ("model.layers.{i}.").
namespace hf {
constexpr const char* embed_tokens = "model.embed_tokens.weight";
constexpr const char* norm = "model.norm.weight";
constexpr const char* lm_head = "lm_head.weight";
std::string layer(int64_t i);
std::string expert_bias(int64_t i);  // block i's gate.e_score_correction_bias
}  // namespace hf

// One weight of a module: its name relative to the module, shape, initial value.
struct ParamSpec {
  std::string name;
  std::vector<int64_t> shape;
  ParamEntry::Init init = ParamEntry::Normal;
  bool trainable = true;
  int64_t expert = -1;
};
std::vector<ParamSpec> mla_param_specs(const MlaDims& d);    // relative to "self_attn."
std::vector<ParamSpec> mha_param_specs(const MhaDims& d);    // relative to "self_attn."
std::vector<ParamSpec> moe_param_specs(const MoeConfig& c);  // relative to "mlp."

// One weight found by a lookup: its view (kernels/wlinear.h; data null when absent), which
// converts to what the parameter struct's member is: a WeightView for the projections, an fp32
// pointer for the norms, biases, router gates and kv_b_proj (the conversion refuses a
// resident bf16 / fp8 weight: those members are fp32 in every model).
struct ParamRef {
  WeightView view;
  operator WeightView() const { return view; }
  operator const float*() const;  // std::invalid_argument unless fp32 (or absent: null)
};
// The fp32 view of w with this shape ([n] vectors as [n, 1]); null w gives an absent ref.
ParamRef f32_ref(const float* w, const std::vector<int64_t>& shape);

// Views of one module's weights (or gradients) by relative name: at(name) is the weight, or
// absent (null) when the module has no such weight.
using ParamLookup = std::function<ParamRef(const std::string&)>;
using GradLookup = std::function<float*(const std::string&)>;
MlaParams mla_params(const ParamLookup& at);
MlaGrads mla_grads(const GradLookup& at);
MhaParams mha_params(const ParamLookup& at);
MhaGrads mha_grads(const GradLookup& at);
MoeParams moe_params(const ParamLookup& at, int64_t n_routed_experts);
MoeGrads moe_grads(const GradLookup& at, int64_t n_routed_experts);

// Views of block i / MTP module k (1-based) of a slab with this layout; a name in resident
// (may be null) takes its view from there instead of the slab.
BlockParams block_params(const ParamLayout& L, const float* slab, const ModelConfig& c,
                         int64_t i, const ResidentViews* resident = nullptr);
BlockGrads block_grads(const ParamLayout& L, float* grads, const ModelConfig& c, int64_t i);
MtpParams mtp_params(const ParamLayout& L, const float* slab, const ModelConfig& c, int64_t k,
                     const ResidentViews* resident = nullptr);
MtpGrads mtp_grads(const ParamLayout& L, float* grads, const ModelConfig& c, int64_t k);

// Parameter counts by kind of piece, from the builders above (dsv3.Config.num_parameters
// composes them in closed form, for any depth).
struct ParamCounts {
  int64_t embed = 0, norm = 0, head = 0;  // head: 0 when tied
  int64_t dense_block = 0, moe_block = 0;
  int64_t moe_block_active = 0;  // counting num_experts_per_tok routed experts
  int64_t mtp_own = 0;           // enorm, hnorm, eh_proj, shared_head.norm of one MTP module
};
ParamCounts param_counts(const ModelConfig& c);

// Normal(0, init_range) for matrices, ones for norms, zeros for biases; entry e draws from
// its own counter stream (hash of its name), so the values depend only on (seed, name).
void init_params(float* slab, const ParamLayout& layout, uint64_t seed, float init_range);

}  // namespace dsv3
