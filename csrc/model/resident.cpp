// A model over RESIDENT weights (issue #21): the projection matrices stay in the storage format
// they were given in (fp32 / bf16 / FP8 E4M3 + 128x128 weight_scale_inv, kernels/wlinear.h),
// in memory the caller owns (numpy arrays or memory maps the Python Model keeps alive), and
// are dequantized on the fly inside the linear kernels. Everything else lives in the slab.
//
// Legend:  held    name -> WeightView given in its storage format
//          copied  name -> fp32 array copied into the slab
//          slab    compact_layout: only the non-resident entries have storage (offset >= 0)
//
//   held, resident-capable (layout.h)  -> resident_ (no fp32 storage is ever allocated)
//   held kv_b_proj                      -> dequantized into the slab (fp32): the absorbed MLA
//                                          decode slices it per head (kernels/mla.h), as
//                                          DeepSeek's own inference code dequantizes wkv_b;
//                                          a bf16 / fp8 one is also kept as given, for the
//                                          decode to read (MlaParams::kv_b_view)
//   copied                              -> memcpy into the slab
// Such a model runs inference (forward, cached decoding, MTP drafting, the loss without
// gradients); gradients and training refuse it (they need fp32 master weights).
#include <cmath>
#include <cstring>
#include <numeric>

#include "core/check.h"
#include "model/model.h"

namespace dsv3 {

namespace {
bool is_kv_b_proj(const std::string& n) {
  const std::string s = ".kv_b_proj.weight";
  return n.size() > s.size() && n.compare(n.size() - s.size(), s.size(), s) == 0;
}
}  // namespace

bool may_be_held(const std::string& name) { return resident_capable(name) || is_kv_b_proj(name); }

namespace {

// The views of held whose names stay resident (checked against the layout).
ResidentViews resident_part(const ParamLayout& L, const ResidentWeights& w) {
  const char* op = "[Model.from_resident] '";
  ResidentViews r;
  for (const auto& [name, v] : w.held) {
    const ParamEntry& e = L.at(name);
    DSV3_CHECK(may_be_held(name), op, name, "' cannot be resident (only projection matrices ",
               "can; norms, biases and router gates must be given as float32 arrays)");
    DSV3_CHECK(v.O == e.shape[0] && v.K == e.shape[1], op, name, "' must be [", e.shape[0],
               ", ", e.shape[1], "], got a [", v.O, ", ", v.K, "] view");
    DSV3_CHECK(v.data && (v.fmt != WeightFormat::fp8_e4m3 || v.scale_inv), op, name,
               "' has no data (or, fp8, no scale_inv)");
    if (v.fmt == WeightFormat::fp8_e4m3) {
      const int64_t KB = (v.K + 127) / 128, n = ((v.O + 127) / 128) * KB;
      for (int64_t j = 0; j < n; ++j)
        DSV3_CHECK(std::isfinite(v.scale_inv[j]), op, name, "' has a non-finite ",
                   "weight_scale_inv (block ", j / KB, ", ", j % KB, ")");
    }
    if (!is_kv_b_proj(name)) r.emplace(name, v);
  }
  return r;
}

}  // namespace

Model::Model(const ModelConfig& c, const ResidentWeights& w) : cfg_(c) {
  dims_ = block_dims(c);
  const ParamLayout full = build_layout(c);
  resident_ = resident_part(full, w);
  layout_ = compact_layout(full, resident_);
  resident_model_ = true;
  keep_alive_ = w.keep_alive;
  for (const ParamEntry& e : layout_.entries) {
    const bool h = w.held.count(e.name) != 0, cp = w.copied.count(e.name) != 0;
    DSV3_CHECK(h != cp, "[Model.from_resident] '", e.name, "' must be given exactly once, ",
               h ? "got it twice" : "it is missing");
  }
  DSV3_CHECK(w.held.size() + w.copied.size() == layout_.entries.size(),
             "[Model.from_resident] unknown weight names given");
  w_.assign((size_t)layout_.total, 0.f);  // only the non-resident entries
  for (const ParamEntry& e : layout_.entries) {
    if (e.resident) continue;
    float* dst = w_.data() + e.offset;
    auto cp = w.copied.find(e.name);
    if (cp != w.copied.end()) {
      std::memcpy(dst, cp->second, sizeof(float) * e.size);
    } else {  // a held kv_b_proj: dequantized row by row
      const WeightView& v = w.held.at(e.name);
      if (v.fmt != WeightFormat::fp32) kv_b_stored_.emplace(e.name, v);
      std::vector<int64_t> ids((size_t)v.O);
      std::iota(ids.begin(), ids.end(), int64_t{0});
      wlinear_rows(dst, ids.data(), v, v.O);
    }
  }
}

void Model::set_kv_b_view(BlockParams& b, int64_t block) const {
  if (kv_b_stored_.empty()) return;
  auto it = kv_b_stored_.find(hf::layer(block) + "self_attn.kv_b_proj.weight");
  if (it != kv_b_stored_.end()) b.mla.kv_b_view = it->second;
}

WeightView Model::param_view(const std::string& name) const {
  auto r = resident_.find(name);
  if (r != resident_.end()) return r->second;
  const ParamEntry& e = layout_.at(name);
  return WeightView::f32(w_.data() + e.offset, e.shape[0], e.shape.size() > 1 ? e.shape[1] : 1);
}

WeightFormat Model::weight_format(const std::string& name) const {
  layout_.at(name);  // throws for an unknown name
  auto r = resident_.find(name);
  return r == resident_.end() ? WeightFormat::fp32 : r->second.fmt;
}

int64_t Model::weight_bytes() const {
  int64_t n = (int64_t)sizeof(float) * layout_.total;
  for (const auto& [name, v] : resident_) n += weight_format_bytes(v.fmt, v.O, v.K);
  return n;
}

void Model::copy_param(float* out, const std::string& name) const {
  const ParamEntry& e = layout_.at(name);
  if (!e.resident) {
    std::memcpy(out, w_.data() + e.offset, sizeof(float) * e.size);
    return;
  }
  const WeightView& v = resident_.at(name);
  std::vector<int64_t> ids((size_t)v.O);
  std::iota(ids.begin(), ids.end(), int64_t{0});
  wlinear_rows(out, ids.data(), v, v.O);
}

}  // namespace dsv3
