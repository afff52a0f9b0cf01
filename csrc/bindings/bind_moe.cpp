// dsv3._core MoE ops: the kernels of csrc/kernels/{moe_gate,moe,balance}.h on numpy arrays.
// The config argument is any object with Hugging Face's MoE attributes (dsv3.Config).
#include <pybind11/stl.h>

#include <map>
#include <string>

#include "bindings/arrays.h"
#include "bindings/convert.h"
#include "kernels/balance.h"
#include "kernels/moe.h"
#include "kernels/moe_gate.h"
#include "kernels/moe_layer.h"
#include "model/layout.h"

namespace dsv3 {

namespace py = pybind11;
using namespace py_glue;
using py::arg;

namespace {

template <typename V>
V cfg_attr(py::handle cfg, const char* name, const char* op) {
  if (!py::hasattr(cfg, name))
    throw py::type_error(str_cat("[", op, "] cfg must have the MoE fields of dsv3.Config; '",
                                 name, "' is missing"));
  return cfg.attr(name).cast<V>();
}

MoeConfig moe_config_from(py::handle cfg, int64_t D, const char* op) {
  MoeConfig c;
  DSV3_CHECK(!py::hasattr(cfg, "n_routed_experts") || !cfg.attr("n_routed_experts").is_none(),
             "[", op, "] n_routed_experts must be >= 1 (the config has no MoE layers)");
  c.n_routed_experts = cfg_attr<int64_t>(cfg, "n_routed_experts", op);
  c.num_experts_per_tok = cfg_attr<int64_t>(cfg, "num_experts_per_tok", op);
  c.n_group = cfg_attr<int64_t>(cfg, "n_group", op);
  c.topk_group = cfg_attr<int64_t>(cfg, "topk_group", op);
  c.topk_method = topk_method_from(cfg_attr<std::string>(cfg, "topk_method", op), op);
  c.scoring_func = scoring_func_from(cfg_attr<std::string>(cfg, "scoring_func", op), op);
  c.norm_topk_prob = cfg_attr<bool>(cfg, "norm_topk_prob", op);
  c.routed_scaling_factor = cfg_attr<float>(cfg, "routed_scaling_factor", op);
  c.hidden_size = D;
  c.moe_intermediate_size = cfg_attr<int64_t>(cfg, "moe_intermediate_size", op);
  c.n_shared_experts = cfg_attr<int64_t>(cfg, "n_shared_experts", op);
  moe_config_check(c, op);
  return c;
}

void check_shape(const py::array& a, const Shape& want, const char* op, const std::string& name) {
  DSV3_CHECK(shape_of(a) == want, "[", op, "] ", name, " must have shape ", shape_str(want),
             ", got ", shape_str(shape_of(a)));
}

// x: (..., D) float32 with D >= 1.
F32 moe_input(py::handle x_h, const char* op, const char* name, int lo_ndim, int hi_ndim) {
  F32 x = f32(x_h, op, name);
  check_ndim(x, lo_ndim, hi_ndim, op, name);
  DSV3_CHECK(x.shape(x.ndim() - 1) >= 1, "[", op, "] ", name, " must have a non-empty last ",
             "dimension, got shape ", shape_str(shape_of(x)));
  return x;
}

Shape with_last(const py::array& a, py::ssize_t d) {
  Shape s = shape_of(a);
  s.back() = d;
  return s;
}

// The layer's parameters from a dict keyed by Hugging Face names relative to the layer
// ("mlp.": the names and shapes of layout.h's moe_param_specs). `keep` holds the (possibly
// converted) arrays alive while the views are in use.
struct LayerParams {
  MoeParams p;
  std::map<std::string, F32> keep;
  std::vector<ParamSpec> specs;  // every expected key, in layout order
};

LayerParams layer_params(py::handle params_h, const MoeConfig& c, const char* op) {
  LayerParams lp;
  lp.specs = moe_param_specs(c);
  check_param_keys(params_h, lp.specs, op);
  auto params = py::reinterpret_borrow<py::dict>(params_h);
  for (const ParamSpec& s : lp.specs) {
    F32 a = f32(params[s.name.c_str()], op, s.name.c_str());
    check_shape(a, Shape(s.shape.begin(), s.shape.end()), op, s.name);
    lp.keep.emplace(s.name, std::move(a));
  }
  lp.p = moe_params([&](const std::string& n) -> ParamRef {
    auto it = lp.keep.find(n);
    if (it == lp.keep.end()) return ParamRef{};
    const F32& a = it->second;
    return f32_ref(a.data(), std::vector<int64_t>(a.shape(), a.shape() + a.ndim()));
  }, c.n_routed_experts);
  return lp;
}

// ---- gate -----------------------------------------------------------------------------------
py::tuple moe_gate_py(py::handle x_h, py::handle w_h, py::handle b_h, py::handle cfg) {
  const char* op = "moe_gate";
  F32 x = moe_input(x_h, op, "x", 1, 8);
  F32 w = f32(w_h, op, "weight");
  const int64_t D = x.shape(x.ndim() - 1);
  MoeConfig c = moe_config_from(cfg, D, op);
  const int64_t E = c.n_routed_experts, K = c.num_experts_per_tok, T = rows(x);
  check_shape(w, {(py::ssize_t)E, (py::ssize_t)D}, op, "weight (n_routed_experts, hidden)");
  F32 b;
  const float* pb = nullptr;
  if (!b_h.is_none()) {
    b = f32(b_h, op, "bias");
    check_shape(b, {(py::ssize_t)E}, op, "bias (n_routed_experts,)");
    pb = b.data();
  }
  Shape out_shape = with_last(x, K);
  I64 idx(out_shape);
  F32 weights = empty(out_shape);
  int64_t* pi = idx.mutable_data();
  float* pw = weights.mutable_data();
  const float *px = x.data(), *pW = w.data();
  {
    py::gil_scoped_release nogil;
    std::vector<float> scores((size_t)(T * E));
    moe_gate_forward(pi, pw, scores.data(), px, pW, pb, c, T);
  }
  return py::make_tuple(idx, weights);
}

// ---- layer ----------------------------------------------------------------------------------
struct LayerRun {
  MoeConfig c;
  LayerParams lp;
  F32 x;
  int64_t B, T;  // sequences, tokens per sequence
};

void layer_setup(LayerRun& r, py::handle x_h, py::handle params, py::handle cfg, const char* op) {
  r.x = moe_input(x_h, op, "x (T, D) or (B, T, D)", 2, 3);
  const int64_t D = r.x.shape(r.x.ndim() - 1);
  r.c = moe_config_from(cfg, D, op);
  r.lp = layer_params(params, r.c, op);
  r.B = r.x.ndim() == 3 ? r.x.shape(0) : 1;
  r.T = r.x.shape(r.x.ndim() - 2);
}

py::tuple moe_forward_py(py::handle x_h, py::handle params, py::handle cfg, double alpha) {
  const char* op = "moe_forward";
  LayerRun r;
  layer_setup(r, x_h, params, cfg, op);
  const int64_t E = r.c.n_routed_experts, K = r.c.num_experts_per_tok, R = r.B * r.T;
  F32 y = empty(shape_of(r.x));
  I64 idx(with_last(r.x, K)), load(Shape{(py::ssize_t)E});
  F32 tw = empty(with_last(r.x, K)), scores = empty(with_last(r.x, E));
  double bal = 0.0, maxvio = 0.0;
  {
    py::gil_scoped_release nogil;
    const MoeActs a =
        moe_layer_forward(y.mutable_data(), &bal, r.x.data(), r.lp.p, r.c, r.B, r.T, alpha);
    std::copy(a.topk_idx, a.topk_idx + R * K, idx.mutable_data());
    std::copy(a.topk_weight, a.topk_weight + R * K, tw.mutable_data());
    std::copy(a.scores, a.scores + R * E, scores.mutable_data());
    expert_load(load.mutable_data(), a.topk_idx, R, K, E);
    maxvio = max_violation(load.data(), E);
  }
  py::dict aux;
  aux["topk_idx"] = idx;
  aux["topk_weight"] = tw;
  aux["scores"] = scores;
  aux["expert_load"] = load;
  aux["max_violation"] = maxvio;
  aux["balance_loss"] = bal;
  return py::make_tuple(y, aux);
}

py::tuple moe_backward_py(py::handle dy_h, py::handle x_h, py::handle params, py::handle cfg,
                          double alpha) {
  const char* op = "moe_backward";
  LayerRun r;
  layer_setup(r, x_h, params, cfg, op);
  F32 dy = f32(dy_h, op, "dy");
  check_same_shape(r.x, dy, op, "x", "dy");
  const int64_t E = r.c.n_routed_experts;
  F32 dx = zeros(shape_of(r.x));
  py::dict out;
  std::map<std::string, float*> ptr;
  for (const ParamSpec& s : r.lp.specs) {
    if (!s.trainable) continue;  // the correction bias: moved by update_expert_bias only
    F32 z = zeros(Shape(s.shape.begin(), s.shape.end()));
    ptr[s.name] = z.mutable_data();
    out[s.name.c_str()] = z;
  }
  const MoeGrads g = moe_grads([&](const std::string& n) -> float* {
    auto it = ptr.find(n);
    return it == ptr.end() ? nullptr : it->second;
  }, E);
  float* pdx = dx.mutable_data();
  const float* pdy = dy.data();
  {
    py::gil_scoped_release nogil;
    moe_layer_backward(pdx, g, pdy, r.x.data(), r.lp.p, r.c, r.B, r.T, alpha);
  }
  return py::make_tuple(dx, out);
}

// ---- balancing ------------------------------------------------------------------------------
py::tuple balance_loss_py(py::handle s_h, py::handle idx_h, double alpha) {
  const char* op = "moe_balance_loss";
  F32 s = f32(s_h, op, "scores");
  I64 idx = i64(idx_h, op, "topk_idx");
  check_ndim(s, 2, 3, op, "scores (T, E) or (B, T, E)");
  DSV3_CHECK(idx.ndim() == s.ndim(), "[", op, "] topk_idx must have the rank of scores (",
             s.ndim(), "), got shape ", shape_str(shape_of(idx)));
  for (int d = 0; d + 1 < s.ndim(); ++d)
    DSV3_CHECK(idx.shape(d) == s.shape(d), "[", op, "] topk_idx must have shape ",
               shape_str(with_last(s, idx.shape(idx.ndim() - 1))), ", got ",
               shape_str(shape_of(idx)));
  const int64_t B = s.ndim() == 3 ? s.shape(0) : 1, T = s.shape(s.ndim() - 2);
  const int64_t E = s.shape(s.ndim() - 1), K = idx.shape(idx.ndim() - 1);
  F32 ds = zeros(shape_of(s));
  double L = 0.0;
  float* pds = ds.mutable_data();
  {
    py::gil_scoped_release nogil;
    if (B * T > 0) {
      L = seq_balance_loss_forward(s.data(), idx.data(), B, T, E, K, alpha);
      seq_balance_loss_backward(pds, 1.0, s.data(), idx.data(), B, T, E, K, alpha);
    }
  }
  return py::make_tuple(L, ds);
}

I64 expert_load_py(py::handle idx_h, int64_t E) {
  I64 idx = i64(idx_h, "expert_load", "topk_idx");
  check_ndim(idx, 1, 8, "expert_load", "topk_idx");
  I64 load(Shape{(py::ssize_t)E});
  expert_load(load.mutable_data(), idx.data(), idx.size(), 1, E);
  return load;
}

double max_violation_py(py::handle load_h) {
  I64 load = i64(load_h, "max_violation", "load");
  check_ndim(load, 1, 1, "max_violation", "load");
  return max_violation(load.data(), load.size());
}

F32 update_bias_py(py::handle b_h, py::handle load_h, double gamma) {
  const char* op = "update_expert_bias";
  F32 b = f32(b_h, op, "bias");
  I64 load = i64(load_h, op, "load");
  check_ndim(b, 1, 1, op, "bias");
  check_shape(load, shape_of(b), op, "load (the shape of bias)");
  F32 out = empty(shape_of(b));
  std::copy(b.data(), b.data() + b.size(), out.mutable_data());
  update_expert_bias(out.mutable_data(), load.data(), b.size(), (float)gamma);
  return out;
}

}  // namespace

void bind_moe(py::module_& m) {
  m.def("moe_param_specs", [](py::handle cfg, int64_t D) {
    py::list out;
    for (const ParamSpec& s : moe_param_specs(moe_config_from(cfg, D, "moe_param_shapes")))
      out.append(py::make_tuple(s.name, py::tuple(py::cast(s.shape)),
                                s.init == ParamEntry::Zeros  ? "zeros"
                                : s.init == ParamEntry::Ones ? "ones"
                                                             : "normal"));
    return out;
  }, arg("cfg"), arg("hidden_size"));
  m.def("topk_methods", &topk_method_names);
  m.def("moe_gate", &moe_gate_py, arg("x"), arg("weight"), arg("bias"), arg("cfg"));
  m.def("moe_forward", &moe_forward_py, arg("x"), arg("params"), arg("cfg"),
        arg("balance_alpha"));
  m.def("moe_backward", &moe_backward_py, arg("dy"), arg("x"), arg("params"), arg("cfg"),
        arg("balance_alpha"));
  m.def("moe_balance_loss", &balance_loss_py, arg("scores"), arg("topk_idx"), arg("alpha"));
  m.def("expert_load", &expert_load_py, arg("topk_idx"), arg("n_routed_experts"));
  m.def("max_violation", &max_violation_py, arg("load"));
  m.def("update_expert_bias", &update_bias_py, arg("bias"), arg("load"), arg("gamma"));
}

}  // namespace dsv3
