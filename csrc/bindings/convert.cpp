#include "bindings/convert.h"

namespace dsv3::py_glue {

RopeParams rope_params(int64_t dim, double theta, const py::object& scaling) {
  RopeParams p;
  p.dim = dim;
  p.theta = theta;
  if (scaling.is_none()) return p;
  DSV3_CHECK(py::isinstance<py::dict>(scaling), "[rope] rope_scaling must be None or a dict");
  auto d = scaling.cast<py::dict>();
  auto get = [&](const char* key, double dflt) {
    return d.contains(key) && !d[key].is_none() ? d[key].cast<double>() : dflt;
  };
  std::string type;
  if (d.contains("type")) type = py::str(d["type"]).cast<std::string>();
  if (type.empty() && d.contains("rope_type")) type = py::str(d["rope_type"]).cast<std::string>();
  DSV3_CHECK(type == "yarn", "[rope] rope_scaling type must be \"yarn\" (the only scaling ",
             "DeepSeek-V3 uses), got \"", type, "\"");
  p.yarn = true;
  p.factor = get("factor", 1.0);
  p.original_max_position_embeddings = get("original_max_position_embeddings", 4096);
  p.beta_fast = get("beta_fast", 32);
  p.beta_slow = get("beta_slow", 1);
  p.mscale = get("mscale", 1);
  p.mscale_all_dim = get("mscale_all_dim", 0);
  return p;
}

namespace {
RopeTable cfg_rope(const py::object& cfg) {
  return rope_table(rope_params(cfg_get<int64_t>(cfg, "qk_rope_head_dim"),
                                cfg_get<double>(cfg, "rope_theta"), cfg.attr("rope_scaling")));
}
}  // namespace

MlaDims mla_dims(const py::object& cfg) {
  py::object ql = cfg.attr("q_lora_rank");
  MlaDims d{cfg_get<int64_t>(cfg, "hidden_size"), cfg_get<int64_t>(cfg, "num_attention_heads"),
            ql.is_none() ? 0 : ql.cast<int64_t>(), cfg_get<int64_t>(cfg, "kv_lora_rank"),
            cfg_get<int64_t>(cfg, "qk_nope_head_dim"), cfg_get<int64_t>(cfg, "qk_rope_head_dim"),
            cfg_get<int64_t>(cfg, "v_head_dim"), cfg_get<float>(cfg, "rms_norm_eps"),
            cfg_get<float>(cfg, "softmax_scale"), cfg_rope(cfg)};
  mla_check_dims(d);
  return d;
}

MhaDims mha_dims(const py::object& cfg) {
  MhaDims d{cfg_get<int64_t>(cfg, "hidden_size"), cfg_get<int64_t>(cfg, "num_attention_heads"),
            cfg_get<int64_t>(cfg, "kv_heads"), cfg_get<int64_t>(cfg, "qk_nope_head_dim"),
            cfg_get<int64_t>(cfg, "qk_rope_head_dim"), cfg_get<int64_t>(cfg, "v_head_dim"),
            cfg_get<float>(cfg, "softmax_scale"), cfg_rope(cfg)};
  mha_check_dims(d);
  return d;
}

ParamDict::ParamDict(const py::handle& d, const char* op) : op_(op) {
  if (!py::isinstance<py::dict>(d))
    throw py::type_error(str_cat("[", op, "] params must be a dict {name: float32 array}"));
  dict_ = py::reinterpret_borrow<py::dict>(d);
}

bool ParamDict::has(const std::string& name) const { return dict_.contains(name); }

const float* ParamDict::get(const std::string& name, const Shape& shape) {
  if (!dict_.contains(name))
    throw py::key_error(str_cat("[", op_, "] params is missing '", name, "' (shape ",
                                shape_str(shape), ")"));
  F32 a = f32(dict_[name.c_str()], op_, ("params['" + name + "']").c_str());
  DSV3_CHECK(shape_of(a) == shape, "[", op_, "] params['", name, "'] must have shape ",
             shape_str(shape), ", got ", shape_str(shape_of(a)));
  const float* ptr = a.data();
  keep_.emplace(name, std::move(a));
  return ptr;
}

}  // namespace dsv3::py_glue
