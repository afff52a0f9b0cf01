#include "model/layout.h"

#include <algorithm>

#include "core/check.h"
#include "core/parallel.h"
#include "core/rng.h"
#include "model/block.h"

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

// Every relative name, spelled once: the specs and the views below both use these.
namespace name {
// block i, relative to "model.layers.{i}."
constexpr const char* input_layernorm = "input_layernorm.weight";
constexpr const char* post_attention_layernorm = "post_attention_layernorm.weight";
constexpr const char* self_attn = "self_attn.";
constexpr const char* mlp = "mlp.";
// attention, relative to "self_attn."
constexpr const char* q_a_proj = "q_a_proj.weight";
constexpr const char* q_a_layernorm = "q_a_layernorm.weight";
constexpr const char* q_b_proj = "q_b_proj.weight";
constexpr const char* q_proj = "q_proj.weight";
constexpr const char* kv_a_proj_with_mqa = "kv_a_proj_with_mqa.weight";
constexpr const char* kv_a_layernorm = "kv_a_layernorm.weight";
constexpr const char* kv_b_proj = "kv_b_proj.weight";
constexpr const char* k_proj = "k_proj.weight";
constexpr const char* v_proj = "v_proj.weight";
constexpr const char* o_proj = "o_proj.weight";
// feed-forward, relative to "mlp."
constexpr const char* gate = "gate.weight";
constexpr const char* gate_bias = "gate.e_score_correction_bias";
constexpr const char* shared_experts = "shared_experts.";
constexpr const char* swiglu[3] = {"gate_proj.weight", "up_proj.weight", "down_proj.weight"};
// an MTP module's own weights, relative to its "model.layers.{i}."
constexpr const char* enorm = "enorm.weight";
constexpr const char* hnorm = "hnorm.weight";
constexpr const char* eh_proj = "eh_proj.weight";
constexpr const char* shared_head_norm = "shared_head.norm.weight";
}  // namespace name

}  // namespace

std::string hf::layer(int64_t i) { return "model.layers." + std::to_string(i) + "."; }
std::string hf::expert_bias(int64_t i) { return layer(i) + name::mlp + name::gate_bias; }

namespace {

int64_t checked_mul(int64_t a, int64_t b);
int64_t checked_add(int64_t a, int64_t b);

void swiglu_specs(std::vector<ParamSpec>& out, const std::string& p, int64_t D, int64_t W,
                  int64_t expert = -1) {
  out.push_back({p + name::swiglu[0], {W, D}, ParamEntry::Normal, true, expert});
  out.push_back({p + name::swiglu[1], {W, D}, ParamEntry::Normal, true, expert});
  out.push_back({p + name::swiglu[2], {D, W}, ParamEntry::Normal, true, expert});
}
std::string expert_prefix(int64_t j) { return "experts." + std::to_string(j) + "."; }

template <class S, class At>
S swiglu_views(const At& at, const std::string& p) {
  return S{at(p + name::swiglu[0]), at(p + name::swiglu[1]), at(p + name::swiglu[2])};
}
template <class S, class At>
S mla_views(const At& at) {
  return S{at(name::q_a_proj), at(name::q_a_layernorm), at(name::q_b_proj), at(name::q_proj),
           at(name::kv_a_proj_with_mqa), at(name::kv_a_layernorm), at(name::kv_b_proj),
           at(name::o_proj)};
}
template <class S, class At>
S mha_views(const At& at) {
  return S{at(name::q_proj), at(name::k_proj), at(name::v_proj), at(name::o_proj)};
}

struct Builder {
  ParamLayout L;
  void add(const std::string& name, std::vector<int64_t> shape,
           ParamEntry::Init init = ParamEntry::Normal, bool trainable = true, int64_t block = -1,
           int64_t expert = -1) {
    ParamEntry e;
    e.name = name;
    e.shape = std::move(shape);
    e.size = 1;
    for (int64_t d : e.shape) e.size = checked_mul(e.size, d);
    e.offset = L.total;
    L.total = checked_add(L.total, (e.size + 15) / 16 * 16);  // 64-byte aligned entries
    e.init = init;
    e.decay = e.shape.size() == 2;
    e.trainable = trainable;
    e.block = block;
    e.expert = expert;
    L.index[name] = L.entries.size();
    L.entries.push_back(e);
  }
  void add(const std::string& prefix, const std::vector<ParamSpec>& specs, int64_t block) {
    for (const ParamSpec& s : specs)
      add(prefix + s.name, s.shape, s.init, s.trainable, block, s.expert);
  }
  // block i with an MoE or a dense ffn
  void block(const ModelConfig& c, const BlockDims& d, int64_t i, bool moe) {
    const std::string p = hf::layer(i);
    add(p + name::input_layernorm, {c.D}, ParamEntry::Ones, true, i);
    add(p + name::self_attn, d.mla ? mla_param_specs(d.mla_dims) : mha_param_specs(d.mha_dims),
        i);
    add(p + name::post_attention_layernorm, {c.D}, ParamEntry::Ones, true, i);
    std::vector<ParamSpec> ffn;
    if (moe)
      ffn = moe_param_specs(d.moe);
    else
      swiglu_specs(ffn, "", c.D, c.inter);
    add(p + name::mlp, ffn, i);
  }
  void mtp_own(const ModelConfig& c, int64_t i) {
    const std::string p = hf::layer(i);
    add(p + name::enorm, {c.D}, ParamEntry::Ones, true, i);
    add(p + name::hnorm, {c.D}, ParamEntry::Ones, true, i);
    add(p + name::eh_proj, {c.D, 2 * c.D}, ParamEntry::Normal, true, i);
  }
  void mtp_head(const ModelConfig& c, int64_t i) {
    add(hf::layer(i) + name::shared_head_norm, {c.D}, ParamEntry::Ones, true, i);
  }
  int64_t count(bool active_only, int64_t K) const {
    int64_t n = 0;
    for (const ParamEntry& e : L.entries)
      if (!active_only || e.expert < K) n = checked_add(n, e.size);
    return n;
  }
};

// Parameter counts of absurd configs (each dimension < 2^31, their products not) must not wrap
int64_t checked_mul(int64_t a, int64_t b) {
  int64_t r = 0;
  DSV3_CHECK(!__builtin_mul_overflow(a, b, &r),
             "[Model] the config's parameter count exceeds 2^63 (", a, " x ", b, ")");
  return r;
}
int64_t checked_add(int64_t a, int64_t b) {
  int64_t r = 0;
  DSV3_CHECK(!__builtin_add_overflow(a, b, &r), "[Model] the config's parameter count exceeds 2^63");
  return r;
}

}  // namespace

std::vector<ParamSpec> mla_param_specs(const MlaDims& d) {
  const int64_t dqk = d.Dn + d.Dr;
  std::vector<ParamSpec> s;
  if (d.Dq > 0) {
    s.push_back({name::q_a_proj, {d.Dq, d.D}});
    s.push_back({name::q_a_layernorm, {d.Dq}, ParamEntry::Ones});
    s.push_back({name::q_b_proj, {d.H * dqk, d.Dq}});
  } else {
    s.push_back({name::q_proj, {d.H * dqk, d.D}});
  }
  s.push_back({name::kv_a_proj_with_mqa, {d.Dc + d.Dr, d.D}});
  s.push_back({name::kv_a_layernorm, {d.Dc}, ParamEntry::Ones});
  s.push_back({name::kv_b_proj, {d.H * (d.Dn + d.Dv), d.Dc}});
  s.push_back({name::o_proj, {d.D, d.H * d.Dv}});
  return s;
}

std::vector<ParamSpec> mha_param_specs(const MhaDims& d) {
  const int64_t dqk = d.Dn + d.Dr;
  return {{name::q_proj, {d.H * dqk, d.D}},
          {name::k_proj, {d.Hkv * dqk, d.D}},
          {name::v_proj, {d.Hkv * d.Dv, d.D}},
          {name::o_proj, {d.D, d.H * d.Dv}}};
}

std::vector<ParamSpec> moe_param_specs(const MoeConfig& c) {
  const int64_t E = c.n_routed_experts, D = c.hidden_size;
  std::vector<ParamSpec> s;
  s.push_back({name::gate, {E, D}});
  if (c.has_bias())
    s.push_back({name::gate_bias, {E}, ParamEntry::Zeros, /*trainable=*/false});
  for (int64_t j = 0; j < E; ++j) swiglu_specs(s, expert_prefix(j), D, c.moe_intermediate_size, j);
  if (c.shared_width() > 0) swiglu_specs(s, name::shared_experts, D, c.shared_width());
  return s;
}

MlaParams mla_params(const ParamLookup& at) { return mla_views<MlaParams>(at); }
MlaGrads mla_grads(const GradLookup& at) { return mla_views<MlaGrads>(at); }
MhaParams mha_params(const ParamLookup& at) { return mha_views<MhaParams>(at); }
MhaGrads mha_grads(const GradLookup& at) { return mha_views<MhaGrads>(at); }

MoeParams moe_params(const ParamLookup& at, int64_t E) {
  MoeParams p;
  p.gate_weight = at(name::gate);
  p.gate_e_score_correction_bias = at(name::gate_bias);
  for (int64_t j = 0; j < E; ++j)
    p.experts.push_back(swiglu_views<SwiGluParams>(at, expert_prefix(j)));
  p.shared_experts = swiglu_views<SwiGluParams>(at, name::shared_experts);
  return p;
}
MoeGrads moe_grads(const GradLookup& at, int64_t E) {
  MoeGrads g;
  g.gate_weight = at(name::gate);
  for (int64_t j = 0; j < E; ++j)
    g.experts.push_back(swiglu_views<SwiGluGrads>(at, expert_prefix(j)));
  g.shared_experts = swiglu_views<SwiGluGrads>(at, name::shared_experts);
  return g;
}

ParamRef::operator const float*() const {
  DSV3_CHECK(view.fmt == WeightFormat::fp32, "[Model] this weight is held in ",
             weight_format_name(view.fmt), " but is read as fp32 (only projection matrices ",
             "may be resident)");
  return view.as_f32();
}

ParamRef f32_ref(const float* w, const std::vector<int64_t>& shape) {
  if (!w) return ParamRef{};
  const int64_t O = shape.empty() ? 1 : shape[0], K = shape.size() > 1 ? shape[1] : 1;
  return ParamRef{WeightView::f32(w, O, K)};
}

namespace {

// at(relative name) over the gradient slab's entries under prefix (null when absent)
std::function<float*(const std::string&)> grad_lookup(const ParamLayout& L, float* slab,
                                                       const std::string& prefix) {
  return [&L, slab, prefix](const std::string& n) -> float* {
    auto it = L.index.find(prefix + n);
    return it == L.index.end() ? nullptr : slab + L.entries[it->second].offset;
  };
}

// at(relative name) over the weights under prefix: the resident view of the name when there
// is one, else the fp32 view of its slab entry, else absent
ParamLookup param_lookup(const ParamLayout& L, const float* slab, const ResidentViews* resident,
                         const std::string& prefix) {
  return [&L, slab, resident, prefix](const std::string& n) -> ParamRef {
    const std::string full = prefix + n;
    if (resident) {
      auto r = resident->find(full);
      if (r != resident->end()) return ParamRef{r->second};
    }
    auto it = L.index.find(full);
    if (it == L.index.end()) return ParamRef{};
    const ParamEntry& e = L.entries[it->second];
    DSV3_ASSERT(!e.resident, "resident weight '", full, "' has no view");
    return f32_ref(slab + e.offset, e.shape);
  };
}

// mk(prefix) makes the lookup of the names under prefix
template <class S, class MakeLookup, class Attn, class Moe, class Mlp>
S block_views(const MakeLookup& mk, const ModelConfig& c, int64_t i, Attn attn, Moe moe,
              Mlp mlp) {
  const std::string p = hf::layer(i);
  const auto at = mk(p);
  S s;
  s.input_layernorm = at(name::input_layernorm);
  s.post_attention_layernorm = at(name::post_attention_layernorm);
  attn(s, mk(p + name::self_attn));
  const auto m = mk(p + name::mlp);
  if (c.is_moe_layer(i))
    s.experts = moe(m, c.E);
  else
    s.mlp = mlp(m);
  return s;
}

}  // namespace

BlockParams block_params(const ParamLayout& L, const float* slab, const ModelConfig& c,
                         int64_t i, const ResidentViews* resident) {
  BlockParams b = block_views<BlockParams>(
      [&](const std::string& p) { return param_lookup(L, slab, resident, p); }, c, i,
      [&](BlockParams& s, const ParamLookup& at) {
        if (c.attention == "mla") s.mla = mla_params(at);
        else s.mha = mha_params(at);
      },
      moe_params, [](const ParamLookup& at) { return swiglu_views<SwiGluParams>(at, ""); });
  b.moe = c.is_moe_layer(i);
  return b;
}

BlockGrads block_grads(const ParamLayout& L, float* grads, const ModelConfig& c, int64_t i) {
  return block_views<BlockGrads>(
      [&](const std::string& p) { return grad_lookup(L, grads, p); }, c, i,
      [&](BlockGrads& s, const GradLookup& at) {
        s.mla = mla_grads(at);
        s.mha = mha_grads(at);
      },
      moe_grads, [](const GradLookup& at) { return swiglu_views<SwiGluGrads>(at, ""); });
}

namespace {
// MTP module k's views: its own weights (missing ones throw), the main embedding, block i.
// at(full name) finds one weight; block(i) makes block i's views.
template <class S, class At, class Block>
S mtp_views(const ParamLayout& L, const At& at, const ModelConfig& c, int64_t k,
            const Block& block) {
  const int64_t i = c.layers + k - 1;
  const std::string p = hf::layer(i);
  const auto get = [&](const std::string& n) {
    L.at(n);  // throws when absent
    return at(n);
  };
  return S{get(hf::embed_tokens), get(p + name::enorm), get(p + name::hnorm),
           get(p + name::eh_proj), get(p + name::shared_head_norm), block(i)};
}
}  // namespace

MtpParams mtp_params(const ParamLayout& L, const float* slab, const ModelConfig& c, int64_t k,
                     const ResidentViews* resident) {
  return mtp_views<MtpParams>(L, param_lookup(L, slab, resident, ""), c, k, [&](int64_t i) {
    return block_params(L, slab, c, i, resident);
  });
}

MtpGrads mtp_grads(const ParamLayout& L, float* grads, const ModelConfig& c, int64_t k) {
  return mtp_views<MtpGrads>(L, grad_lookup(L, grads, ""), c, k,
                             [&](int64_t i) { return block_grads(L, grads, c, i); });
}

ParamLayout build_layout(const ModelConfig& c) {
  model_config_check(c);
  const BlockDims d = block_dims(c);
  Builder b;
  b.add(hf::embed_tokens, {c.V, c.D});
  for (int64_t i = 0; i < c.layers; ++i) b.block(c, d, i, c.is_moe_layer(i));
  for (int64_t k = 0; k < c.mtp; ++k) {
    const int64_t i = c.layers + k;
    b.mtp_own(c, i);
    b.block(c, d, i, c.is_moe_layer(i));
    b.mtp_head(c, i);
  }
  b.add(hf::norm, {c.D}, ParamEntry::Ones);
  if (!c.tie_embeddings) b.add(hf::lm_head, {c.V, c.D});
  return b.L;
}

ParamLayout compact_layout(const ParamLayout& L, const ResidentViews& resident) {
  ParamLayout out = L;
  out.total = 0;
  for (ParamEntry& e : out.entries) {
    e.resident = resident.count(e.name) != 0;
    e.offset = e.resident ? -1 : out.total;
    if (!e.resident) out.total += (e.size + 15) / 16 * 16;  // 64-byte aligned, as build_layout
  }
  return out;
}

bool resident_capable(const std::string& n) {
  if (n == hf::embed_tokens || n == hf::lm_head) return true;
  const auto ends = [&](const std::string& suffix) {  // "<prefix>.<suffix>"
    const size_t k = suffix.size();
    return n.size() > k && n[n.size() - k - 1] == '.' && n.compare(n.size() - k, k, suffix) == 0;
  };
  for (const char* m : {name::q_a_proj, name::q_b_proj, name::q_proj, name::kv_a_proj_with_mqa,
                        name::o_proj, name::k_proj, name::v_proj, name::eh_proj})
    if (ends(m)) return true;
  for (const char* m : name::swiglu)
    if (ends(m)) return true;
  return false;
}

ParamCounts param_counts(const ModelConfig& c) {
  // Shapes only: the rotary table (Dr/2 frequencies) is not needed for counting
  ModelConfig shapes = c;
  shapes.rope.dim = 2;
  shapes.rope.yarn = false;
  const BlockDims d = block_dims(shapes);
  ParamCounts n;
  n.embed = checked_mul(c.V, c.D);
  n.norm = c.D;
  n.head = c.tie_embeddings ? 0 : n.embed;
  Builder dense, mtp;
  dense.block(c, d, 0, false);
  n.dense_block = dense.count(false, 0);
  if (c.E > 0) {
    // An MoE block's size is affine in E (router rows, bias, experts): built with one and two
    // experts, not with E (a config may ask for millions), and extrapolated.
    auto moe_count = [&](int64_t E) {
      BlockDims dE = d;
      dE.moe.n_routed_experts = E;
      Builder b;
      b.block(c, dE, 0, true);
      return b;
    };
    const Builder one = moe_count(1);
    const int64_t n1 = one.count(false, 0);
    const int64_t per_expert = moe_count(2).count(false, 0) - n1;  // its weights + router row
    const int64_t expert_weights = n1 - one.count(true, 0);        // its weights alone
    n.moe_block = checked_add(n1, checked_mul(c.E - 1, per_expert));
    n.moe_block_active = n.moe_block - checked_mul(c.E - c.K, expert_weights);
  }
  mtp.mtp_own(c, 0);
  mtp.mtp_head(c, 0);
  n.mtp_own = mtp.count(false, 0);
  return n;
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
