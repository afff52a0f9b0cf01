#include "bindings/convert.h"

#include "model/model.h"

#include <set>

namespace dsv3::py_glue {

int64_t int_arg(const py::handle& v, const char* op, const char* name, int64_t lo, int64_t hi) {
  PyObject* o = v.ptr();
  if (PyBool_Check(o) || PyFloat_Check(o) || !PyIndex_Check(o))
    throw py::type_error(str_cat("[", op, "] ", name, " must be an integer, got ",
                                 std::string(py::str(py::type::of(v).attr("__name__"))), " ",
                                 std::string(py::repr(v))));
  auto i = py::reinterpret_steal<py::object>(PyNumber_Index(o));
  if (!i) throw py::error_already_set();
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(i.ptr(), &overflow);
  if (x == -1 && PyErr_Occurred()) throw py::error_already_set();
  const std::string msg = str_cat("[", op, "] ", name, " must be an integer in [", lo, ", ", hi,
                                  "], got ", std::string(py::str(i)));
  if (overflow) {
    PyErr_SetString(PyExc_OverflowError, msg.c_str());
    throw py::error_already_set();
  }
  if (x < lo || x > hi) throw py::value_error(msg);
  return (int64_t)x;
}

RopeParams rope_params(int64_t dim, double theta, const py::object& scaling) {
  RopeParams p;
  p.dim = dim;
  p.theta = theta;
  if (scaling.is_none()) return p;
  DSV3_CHECK(py::isinstance<py::dict>(scaling), "[rope] rope_scaling must be None or a dict");
  auto d = scaling.cast<py::dict>();
  auto get = [&](const char* key, double dflt) {
    if (!d.contains(key) || d[key].is_none()) return dflt;
    py::object v = d[key];
    DSV3_CHECK(!PyBool_Check(v.ptr()) && PyNumber_Check(v.ptr()) && !PyComplex_Check(v.ptr()),
               "[rope] rope_scaling.", key, " must be a number, got ", std::string(py::repr(v)));
    return v.cast<double>();  // finiteness: rope_table's checks
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

ModelConfig model_config(const py::object& cfg) {
  ModelConfig c;
  auto I = [&](const char* n) { return cfg_get<int64_t>(cfg, n); };
  auto opt = [&](const char* n) {
    py::object v = cfg.attr(n);
    return v.is_none() ? int64_t(0) : int_arg(v, "cfg", n);
  };
  c.V = I("vocab_size");
  c.D = I("hidden_size");
  c.inter = I("intermediate_size");
  c.layers = I("num_hidden_layers");
  c.mtp = I("num_nextn_predict_layers");
  c.H = I("num_attention_heads");
  c.Hkv = I("kv_heads");
  c.Dq = opt("q_lora_rank");
  c.Dc = I("kv_lora_rank");
  c.Dn = I("qk_nope_head_dim");
  c.Dr = I("qk_rope_head_dim");
  c.Dv = I("v_head_dim");
  c.E = opt("n_routed_experts");
  if (c.E > 0) {
    c.moe_inter = I("moe_intermediate_size");
    c.n_shared = I("n_shared_experts");
    c.K = I("num_experts_per_tok");
    c.n_group = I("n_group");
    c.topk_group = I("topk_group");
    c.topk_method = cfg_get<std::string>(cfg, "topk_method");
    c.scoring_func = cfg_get<std::string>(cfg, "scoring_func");
    c.norm_topk_prob = cfg_get<bool>(cfg, "norm_topk_prob");
    c.routed_scaling_factor = cfg_get<float>(cfg, "routed_scaling_factor");
  }
  c.first_k_dense = I("first_k_dense_replace");
  c.moe_layer_freq = I("moe_layer_freq");
  c.eps = cfg_get<float>(cfg, "rms_norm_eps");
  c.rope = rope_params(c.Dr, cfg_get<double>(cfg, "rope_theta"), cfg.attr("rope_scaling"));
  c.softmax_scale = cfg_get<float>(cfg, "softmax_scale");
  c.tie_embeddings = cfg_get<bool>(cfg, "tie_word_embeddings");
  c.init_range = cfg_get<float>(cfg, "initializer_range");
  c.attention = cfg_get<std::string>(cfg, "attention_type");
  return c;
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
            ql.is_none() ? 0 : int_arg(ql, "cfg", "q_lora_rank"), cfg_get<int64_t>(cfg, "kv_lora_rank"),
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

py::dict named_copy(const ParamLayout& L, const float* slab, bool trainable_only) {
  // the arrays are made under the GIL, the copies (a whole model's bytes) run without it
  py::dict d;
  std::vector<std::pair<const ParamEntry*, float*>> todo;
  for (const ParamEntry& e : L.entries) {
    if (trainable_only && !e.trainable) continue;
    F32 a(Shape(e.shape.begin(), e.shape.end()));
    todo.emplace_back(&e, a.mutable_data());
    d[py::str(e.name)] = a;
  }
  py::gil_scoped_release nogil;
  for (auto& [e, out] : todo) std::copy(slab + e->offset, slab + e->offset + e->size, out);
  return d;
}

void check_param_keys(const py::handle& params_h, const std::vector<ParamSpec>& specs,
                      const char* op) {
  DSV3_CHECK(py::isinstance<py::dict>(params_h), "[", op, "] params must be a dict of ",
             "float32 arrays keyed by Hugging Face names relative to the layer");
  auto params = py::reinterpret_borrow<py::dict>(params_h);
  std::set<std::string> expected;
  std::string missing, unexpected;
  for (const ParamSpec& s : specs) {
    expected.insert(s.name);
    if (!params.contains(s.name)) missing += (missing.empty() ? "" : ", ") + s.name;
  }
  for (const auto& item : params) {
    const std::string key = py::str(item.first);
    if (!expected.count(key)) unexpected += (unexpected.empty() ? "" : ", ") + key;
  }
  DSV3_CHECK(missing.empty() && unexpected.empty(), "[", op, "] params do not match the config",
             missing.empty() ? "" : "; missing: ", missing,
             unexpected.empty() ? "" : "; unexpected: ", unexpected);
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

py::dict loss_parts_dict(const LossParts& lp) {
  py::dict d;
  d["loss"] = lp.loss;
  d["main"] = lp.main;
  d["mtp"] = lp.mtp;
  d["balance"] = lp.balance;
  return d;
}

}  // namespace dsv3::py_glue
