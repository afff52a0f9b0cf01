// dsv3._core attention layers (MLA and the MHA/GQA baselines) and the decoding cache.
#include <pybind11/stl.h>

#include "bindings/convert.h"
#include "kernels/kv_cache.h"
#include "kernels/mha.h"
#include "kernels/mla.h"

namespace dsv3 {

namespace py = pybind11;
using namespace py_glue;
using py::arg;

namespace {

bool is_mla(const py::object& cfg) { return cfg_get<std::string>(cfg, "attention_type") == "mla"; }

// Weights of one attention layer, by Hugging Face name relative to "self_attn.".
struct LayerWeights {
  ParamDict dict;
  MlaParams mla;
  MhaParams mha;
  LayerWeights(const py::handle& params, const py::object& cfg, const char* op)
      : dict(params, op) {
    const py::ssize_t D = cfg_get<int64_t>(cfg, "hidden_size");
    const py::ssize_t H = cfg_get<int64_t>(cfg, "num_attention_heads");
    const py::ssize_t Dn = cfg_get<int64_t>(cfg, "qk_nope_head_dim");
    const py::ssize_t Dr = cfg_get<int64_t>(cfg, "qk_rope_head_dim");
    const py::ssize_t Dv = cfg_get<int64_t>(cfg, "v_head_dim");
    if (is_mla(cfg)) {
      py::object qlo = cfg.attr("q_lora_rank");
      const py::ssize_t Dq = qlo.is_none() ? 0 : qlo.cast<py::ssize_t>();
      const py::ssize_t Dc = cfg_get<int64_t>(cfg, "kv_lora_rank");
      if (Dq > 0) {
        mla.q_a_proj = dict.get("q_a_proj.weight", {Dq, D});
        mla.q_a_layernorm = dict.get("q_a_layernorm.weight", {Dq});
        mla.q_b_proj = dict.get("q_b_proj.weight", {H * (Dn + Dr), Dq});
      } else {
        mla.q_proj = dict.get("q_proj.weight", {H * (Dn + Dr), D});
      }
      mla.kv_a_proj_with_mqa = dict.get("kv_a_proj_with_mqa.weight", {Dc + Dr, D});
      mla.kv_a_layernorm = dict.get("kv_a_layernorm.weight", {Dc});
      mla.kv_b_proj = dict.get("kv_b_proj.weight", {H * (Dn + Dv), Dc});
      mla.o_proj = dict.get("o_proj.weight", {D, H * Dv});
    } else {
      const py::ssize_t Hkv = cfg_get<int64_t>(cfg, "kv_heads");
      mha.q_proj = dict.get("q_proj.weight", {H * (Dn + Dr), D});
      mha.k_proj = dict.get("k_proj.weight", {Hkv * (Dn + Dr), D});
      mha.v_proj = dict.get("v_proj.weight", {Hkv * Dv, D});
      mha.o_proj = dict.get("o_proj.weight", {D, H * Dv});
    }
  }
};

struct XArg {
  F32 x;
  int64_t B, T, D;
};

XArg x_arg(const py::handle& h, const py::object& cfg, const char* op, const char* name = "x") {
  XArg a{f32(h, op, name), 1, 0, cfg_get<int64_t>(cfg, "hidden_size")};
  check_ndim(a.x, 2, 3, op, name);
  DSV3_CHECK(a.x.shape(a.x.ndim() - 1) == a.D, "[", op, "] ", name,
             " must have last dimension hidden_size = ", a.D, ", got shape ",
             shape_str(shape_of(a.x)));
  a.B = a.x.ndim() == 3 ? a.x.shape(0) : 1;
  a.T = a.x.shape(a.x.ndim() - 2);
  DSV3_CHECK(a.B >= 1 && a.T >= 1, "[", op, "] ", name, " must hold at least one token");
  return a;
}

F32 layer_forward(py::handle x_h, py::handle params, py::object cfg, int64_t start_pos) {
  const char* op = "attention_layer";
  XArg a = x_arg(x_h, cfg, op);
  LayerWeights w(params, cfg, op);
  F32 out = empty(shape_of(a.x));
  float* po = out.mutable_data();
  const float* px = a.x.data();
  if (is_mla(cfg)) {
    MlaDims d = mla_dims(cfg);
    py::gil_scoped_release nogil;
    MlaActs acts;
    mla_forward(po, acts, px, w.mla, d, a.B, a.T, start_pos);
  } else {
    MhaDims d = mha_dims(cfg);
    py::gil_scoped_release nogil;
    MhaActs acts;
    mha_forward(po, acts, px, w.mha, d, a.B, a.T, start_pos);
  }
  return out;
}

py::tuple layer_backward(py::handle dout_h, py::handle x_h, py::handle params, py::object cfg,
                         int64_t start_pos) {
  const char* op = "attention_layer_backward";
  XArg a = x_arg(x_h, cfg, op);
  XArg g = x_arg(dout_h, cfg, op, "d_out");
  check_same_shape(a.x, g.x, op, "x", "d_out");
  LayerWeights w(params, cfg, op);
  F32 dx = empty(shape_of(a.x));  // overwritten (set_dx)
  py::dict grads;
  // one zeroed gradient array per weight, same names and shapes
  std::map<std::string, F32> garr;
  for (auto item : py::reinterpret_borrow<py::dict>(params)) {
    const std::string name = py::str(item.first);
    F32 src = f32(item.second, op, ("params['" + name + "']").c_str());
    garr.emplace(name, zeros(shape_of(src)));
  }
  auto gp = [&](const char* name) -> float* {
    auto it = garr.find(name);
    return it == garr.end() ? nullptr : it->second.mutable_data();
  };
  Buf out = buf(a.B * a.T * a.D);  // the forward's output, not returned
  float* pdx = dx.mutable_data();
  const float *px = a.x.data(), *pg = g.x.data();
  if (is_mla(cfg)) {
    MlaDims d = mla_dims(cfg);
    MlaGrads gr{gp("q_a_proj.weight"), gp("q_a_layernorm.weight"), gp("q_b_proj.weight"),
                gp("q_proj.weight"), gp("kv_a_proj_with_mqa.weight"),
                gp("kv_a_layernorm.weight"), gp("kv_b_proj.weight"), gp("o_proj.weight")};
    py::gil_scoped_release nogil;
    MlaActs acts;
    acts.keep_probs = true;
    mla_forward(out.get(), acts, px, w.mla, d, a.B, a.T, start_pos);
    mla_backward(pdx, gr, pg, acts, px, w.mla, d, /*set_dx=*/true);
  } else {
    MhaDims d = mha_dims(cfg);
    MhaGrads gr{gp("q_proj.weight"), gp("k_proj.weight"), gp("v_proj.weight"),
                gp("o_proj.weight")};
    py::gil_scoped_release nogil;
    MhaActs acts;
    acts.keep_probs = true;
    mha_forward(out.get(), acts, px, w.mha, d, a.B, a.T, start_pos);
    mha_backward(pdx, gr, pg, acts, px, w.mha, d, /*set_dx=*/true);
  }
  for (auto& kv : garr) grads[py::str(kv.first)] = kv.second;
  return py::make_tuple(dx, grads);
}

std::shared_ptr<KvCache> make_cache(py::object cfg, int64_t batch, int64_t max_len,
                                    py::object layers) {
  const int64_t L = layers.is_none() ? cfg_get<int64_t>(cfg, "num_hidden_layers")
                                     : layers.cast<int64_t>();
  if (is_mla(cfg)) {
    const int64_t w = cfg_get<int64_t>(cfg, "kv_lora_rank") + cfg_get<int64_t>(cfg, "qk_rope_head_dim");
    return std::make_shared<KvCache>("latent", L, batch, max_len, w);
  }
  MhaDims d = mha_dims(cfg);
  return std::make_shared<KvCache>("kv", L, batch, max_len, d.cache_width());
}

F32 layer_decode(py::handle x_h, py::handle params, py::object cfg, KvCache& cache,
                 int64_t layer, int64_t start_pos, bool absorbed) {
  const char* op = "attention_layer_decode";
  XArg a = x_arg(x_h, cfg, op);
  LayerWeights w(params, cfg, op);
  DSV3_CHECK(a.B == cache.batch, "[", op, "] x has batch ", a.B, " but the cache was made for ",
             cache.batch);
  BusyGuard cguard(cache.busy, true, "KVCache");
  cache.check_step(layer, start_pos, a.T);
  F32 out = empty(shape_of(a.x));
  float* po = out.mutable_data();
  const float* px = a.x.data();
  float* base = cache.layer(layer);
  if (is_mla(cfg)) {
    DSV3_CHECK(cache.kind == "latent", "[", op, "] an MLA layer needs a latent cache");
    MlaDims d = mla_dims(cfg);
    DSV3_CHECK(cache.width == d.Dc + d.Dr, "[", op, "] cache width ", cache.width,
               " != kv_lora_rank + qk_rope_head_dim = ", d.Dc + d.Dr);
    py::gil_scoped_release nogil;
    const LatentCacheView v{base, cache.max_len};
    if (absorbed)
      mla_decode_absorbed(po, px, w.mla, d, v, a.B, a.T, start_pos);
    else
      mla_decode_naive(po, px, w.mla, d, v, a.B, a.T, start_pos);
  } else {
    DSV3_CHECK(cache.kind == "kv", "[", op, "] an MHA/GQA layer needs a kv cache");
    MhaDims d = mha_dims(cfg);
    DSV3_CHECK(cache.width == d.cache_width(), "[", op, "] cache width ", cache.width,
               " does not match the config (", d.cache_width(), ")");
    py::gil_scoped_release nogil;
    mha_decode(po, px, w.mha, d, KvCacheView{base, cache.max_len}, a.B, a.T, start_pos);
  }
  cache.length[layer] = start_pos + a.T;
  return out;
}

}  // namespace

void bind_attention(py::module_& m) {
  py::class_<KvCache, std::shared_ptr<KvCache>>(m, "KVCache")
      .def(py::init(&make_cache), arg("cfg"), arg("batch") = 1, arg("max_len") = 1024,
           arg("layers") = py::none())
      .def_readonly("kind", &KvCache::kind)
      .def_readonly("layers", &KvCache::layers)
      .def_readonly("batch", &KvCache::batch)
      .def_readonly("max_len", &KvCache::max_len)
      .def_readonly("width", &KvCache::width)
      .def_property_readonly("nbytes", &KvCache::nbytes)
      .def_property_readonly("bytes_per_token", &KvCache::bytes_per_token)
      .def_property_readonly("length", [](const KvCache& c) {
        BusyGuard guard(c.busy, false, "KVCache");
        return c.length;
      })
      .def("reset", [](KvCache& c) {
        BusyGuard guard(c.busy, true, "KVCache");
        std::fill(c.length.begin(), c.length.end(), 0);
      })
      .def("truncate", [](KvCache& c, int64_t length) {
        BusyGuard guard(c.busy, true, "KVCache");
        c.truncate(length);
      }, arg("length"))
      .def("layer_data", [](KvCache& c, int64_t l) {
        DSV3_INDEX_CHECK(l >= 0 && l < c.layers, "[KVCache] layer ", l, " out of range");
        BusyGuard guard(c.busy, false, "KVCache");
        F32 a({(py::ssize_t)c.batch, (py::ssize_t)c.max_len, (py::ssize_t)c.width});
        std::copy(c.layer(l), c.layer(l) + c.batch * c.max_len * c.width, a.mutable_data());
        return a;
      }, arg("layer"))
      .def("__repr__", [](const KvCache& c) {
        return str_cat("KVCache(kind='", c.kind, "', layers=", c.layers, ", batch=", c.batch,
                       ", max_len=", c.max_len, ", bytes_per_token=", c.bytes_per_token(),
                       ", nbytes=", c.nbytes(), ")");
      });
  m.def("attention_layer", &layer_forward, arg("x"), arg("params"), arg("cfg"), arg("start_pos"));
  m.def("attention_layer_backward", &layer_backward, arg("d_out"), arg("x"), arg("params"),
        arg("cfg"), arg("start_pos"));
  m.def("attention_layer_decode", &layer_decode, arg("x"), arg("params"), arg("cfg"),
        arg("cache"), arg("layer"), arg("start_pos"), arg("absorbed"));
}

}  // namespace dsv3
