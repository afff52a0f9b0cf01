#include "model/layout.h"

#include <algorithm>

#include "core/check.h"
#include "core/parallel.h"
#include "core/rng.h"

namespace dsv3 {

void model_config_check(const ModelConfig& c) {
  DSV3_CHECK(c.V >= 1 && c.D >= 1 && c.layers >= 1 && c.H >= 1 && c.Hkv >= 1 && c.Dr >= 2 &&
                 c.Dr % 2 == 0 && c.Dv >= 1 && c.Dn >= 0 && c.mtp >= 0,
             "[Model] invalid dimensions in the config");
  DSV3_CHECK(c.attention == "mla" || c.attention == "mha" || c.attention == "gqa",
             "[Model] attention_type must be mla, mha or gqa, got ", c.attention);
  DSV3_CHECK(c.attention != "mla" || c.Dc >= 1, "[Model] kv_lora_rank must be >= 1 for MLA");
  DSV3_CHECK(c.H % c.Hkv == 0, "[Model] kv heads must divide attention heads");
  if (c.E > 0)
    DSV3_CHECK(c.K >= 1 && c.K <= c.E && c.moe_inter >= 1 && c.n_group >= 1 &&
                   c.E % c.n_group == 0 && c.topk_group >= 1 && c.topk_group <= c.n_group,
               "[Model] invalid MoE settings");
  DSV3_CHECK(c.inter >= 1 || c.first_k_dense == 0 || c.E == 0, "[Model] intermediate_size");
}

const ParamEntry& ParamLayout::at(const std::string& name) const {
  auto it = index.find(name);
  DSV3_INDEX_CHECK(it != index.end(), "[Model] no parameter named '", name, "'");
  return entries[it->second];
}

namespace {

struct Builder {
  ParamLayout L;
  void add(const std::string& name, std::vector<int64_t> shape,
           ParamEntry::Init init = ParamEntry::Normal, bool trainable = true) {
    ParamEntry e;
    e.name = name;
    e.shape = std::move(shape);
    e.size = 1;
    for (int64_t d : e.shape) e.size *= d;
    e.offset = L.total;
    e.init = init;
    e.decay = e.shape.size() == 2;
    e.trainable = trainable;
    L.index[name] = L.entries.size();
    L.entries.push_back(e);
    L.total += (e.size + 15) / 16 * 16;  // 64-byte aligned entries
  }
  void swiglu(const std::string& p, int64_t D, int64_t W) {
    add(p + "gate_proj.weight", {W, D});
    add(p + "up_proj.weight", {W, D});
    add(p + "down_proj.weight", {D, W});
  }
  void block(const ModelConfig& c, int64_t i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    const int64_t D = c.D, H = c.H, dqk = c.Dn + c.Dr;
    add(p + "input_layernorm.weight", {D}, ParamEntry::Ones);
    const std::string a = p + "self_attn.";
    if (c.attention == "mla") {
      if (c.Dq > 0) {
        add(a + "q_a_proj.weight", {c.Dq, D});
        add(a + "q_a_layernorm.weight", {c.Dq}, ParamEntry::Ones);
        add(a + "q_b_proj.weight", {H * dqk, c.Dq});
      } else {
        add(a + "q_proj.weight", {H * dqk, D});
      }
      add(a + "kv_a_proj_with_mqa.weight", {c.Dc + c.Dr, D});
      add(a + "kv_a_layernorm.weight", {c.Dc}, ParamEntry::Ones);
      add(a + "kv_b_proj.weight", {H * (c.Dn + c.Dv), c.Dc});
    } else {
      add(a + "q_proj.weight", {H * dqk, D});
      add(a + "k_proj.weight", {c.Hkv * dqk, D});
      add(a + "v_proj.weight", {c.Hkv * c.Dv, D});
    }
    add(a + "o_proj.weight", {D, H * c.Dv});
    add(p + "post_attention_layernorm.weight", {D}, ParamEntry::Ones);
    const std::string m = p + "mlp.";
    if (!c.is_moe_layer(i)) {
      swiglu(m, D, c.inter);
      return;
    }
    add(m + "gate.weight", {c.E, D});
    if (c.has_bias()) add(m + "gate.e_score_correction_bias", {c.E}, ParamEntry::Zeros, false);
    for (int64_t j = 0; j < c.E; ++j) swiglu(m + "experts." + std::to_string(j) + ".", D, c.moe_inter);
    if (c.n_shared > 0) swiglu(m + "shared_experts.", D, c.n_shared * c.moe_inter);
  }
};

}  // namespace

ParamLayout build_layout(const ModelConfig& c) {
  model_config_check(c);
  Builder b;
  b.add("model.embed_tokens.weight", {c.V, c.D});
  for (int64_t i = 0; i < c.layers; ++i) b.block(c, i);
  for (int64_t k = 0; k < c.mtp; ++k) {
    const int64_t i = c.layers + k;
    const std::string p = "model.layers." + std::to_string(i) + ".";
    b.add(p + "enorm.weight", {c.D}, ParamEntry::Ones);
    b.add(p + "hnorm.weight", {c.D}, ParamEntry::Ones);
    b.add(p + "eh_proj.weight", {c.D, 2 * c.D});
    b.block(c, i);
    b.add(p + "shared_head.norm.weight", {c.D}, ParamEntry::Ones);
  }
  b.add("model.norm.weight", {c.D}, ParamEntry::Ones);
  if (!c.tie_embeddings) b.add("lm_head.weight", {c.V, c.D});
  return b.L;
}

void init_params(float* slab, const ParamLayout& layout, uint64_t seed, float init_range) {
  std::fill(slab, slab + layout.total, 0.f);  // padding between entries stays 0
  for (const ParamEntry& e : layout.entries) {
    float* w = slab + e.offset;
    if (e.init == ParamEntry::Ones) {
      std::fill(w, w + e.size, 1.f);
    } else if (e.init == ParamEntry::Normal) {
      uint64_t stream = 1469598103934665603ull;  // FNV-1a of the name: portable
      for (unsigned char ch : e.name) stream = (stream ^ ch) * 1099511628211ull;
      parallel_for(e.size, 1 << 14, [&](int64_t a, int64_t b) {
        for (int64_t j = a; j < b; ++j) w[j] = (float)(init_range * normal01(seed, stream, j));
      });
    }
  }
}

}  // namespace dsv3
