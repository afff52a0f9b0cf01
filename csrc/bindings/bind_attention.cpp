// dsv3._core attention layers (MLA and the MHA/GQA baselines) and the decoding cache.
#include <pybind11/stl.h>

#include "bindings/convert.h"
#include "kernels/kv_cache.h"
#include "kernels/mha.h"
#include "kernels/mla.h"
#include "model/layout.h"

namespace dsv3 {

namespace py = pybind11;
using namespace py_glue;
using py::arg;

namespace {

bool is_mla(const py::object& cfg) { return cfg_get<std::string>(cfg, "attention_type") == "mla"; }

// Weights of one attention layer, by Hugging Face name relative to "self_attn." (exactly the
// names and shapes of layout.h's mla_param_specs / mha_param_specs), and the layer's dims.
struct LayerWeights {
  ParamDict dict;
  bool mla_layer;
  MlaDims mla_d{};
  MhaDims mha_d{};
  std::vector<ParamSpec> specs;
  MlaParams mla;
  MhaParams mha;
  LayerWeights(const py::handle& params, const py::object& cfg, const char* op)
      : dict(params, op), mla_layer(is_mla(cfg)) {
    if (mla_layer) {
      mla_d = mla_dims(cfg);
      specs = mla_param_specs(mla_d);
    } else {
      mha_d = mha_dims(cfg);
      specs = mha_param_specs(mha_d);
    }
    check_param_keys(params, specs, op);
    std::map<std::string, ParamRef> ptr;
    for (const ParamSpec& s : specs)
      ptr[s.name] = f32_ref(dict.get(s.name, Shape(s.shape.begin(), s.shape.end())), s.shape);
    const auto at = [&](const std::string& n) -> ParamRef {
      auto it = ptr.find(n);
      return it == ptr.end() ? ParamRef{} : it->second;
    };
    if (mla_layer)
      mla = mla_params(at);
    else
      mha = mha_params(at);
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
  if (w.mla_layer) {
    const MlaDims& d = w.mla_d;
    py::gil_scoped_release nogil;
    MlaActs acts;
    mla_forward(po, acts, px, w.mla, d, a.B, a.T, start_pos);
  } else {
    const MhaDims& d = w.mha_d;
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
  for (const ParamSpec& s : w.specs)
    garr.emplace(s.name, zeros(Shape(s.shape.begin(), s.shape.end())));
  auto gp = [&](const std::string& name) -> float* {
    auto it = garr.find(name);
    return it == garr.end() ? nullptr : it->second.mutable_data();
  };
  Buf out = buf(a.B * a.T * a.D);  // the forward's output, not returned
  float* pdx = dx.mutable_data();
  const float *px = a.x.data(), *pg = g.x.data();
  if (w.mla_layer) {
    const MlaDims& d = w.mla_d;
    const MlaGrads gr = mla_grads(gp);
    py::gil_scoped_release nogil;
    MlaActs acts;
    acts.keep_probs = true;
    mla_forward(out.get(), acts, px, w.mla, d, a.B, a.T, start_pos);
    mla_backward(pdx, gr, pg, acts, px, w.mla, d, /*set_dx=*/true);
  } else {
    const MhaDims& d = w.mha_d;
    const MhaGrads gr = mha_grads(gp);
    py::gil_scoped_release nogil;
    MhaActs acts;
    acts.keep_probs = true;
    mha_forward(out.get(), acts, px, w.mha, d, a.B, a.T, start_pos);
    mha_backward(pdx, gr, pg, acts, px, w.mha, d, /*set_dx=*/true);
  }
  for (auto& kv : garr) grads[py::str(kv.first)] = kv.second;
  return py::make_tuple(dx, grads);
}

std::shared_ptr<KvCache> make_cache(py::object cfg, py::handle batch_h, py::handle max_len_h,
                                    py::object layers, const std::string& dtype) {
  DSV3_CHECK(dtype == "float32" || dtype == "bfloat16", "[KVCache] dtype must be 'float32' or ",
             "'bfloat16', got '", dtype, "'");
  const bool bf16 = dtype == "bfloat16";
  const int64_t batch = int_arg(batch_h, "KVCache", "batch", 1);
  const int64_t max_len = int_arg(max_len_h, "KVCache", "max_len", 1);
  const int64_t L = layers.is_none() ? cfg_get<int64_t>(cfg, "num_hidden_layers")
                                     : int_arg(layers, "KVCache", "layers", 1);
  if (is_mla(cfg)) {
    const int64_t w =
        cfg_get<int64_t>(cfg, "kv_lora_rank") + cfg_get<int64_t>(cfg, "qk_rope_head_dim");
    return std::make_shared<KvCache>("latent", L, batch, max_len, w, bf16);
  }
  MhaDims d = mha_dims(cfg);
  return std::make_shared<KvCache>("kv", L, batch, max_len, d.cache_width(), bf16);
}

F32 layer_decode(py::handle x_h, py::handle params, py::object cfg, KvCache& cache,
                 int64_t layer, int64_t start_pos, bool absorbed) {
  const char* op = "attention_layer_decode";
  XArg a = x_arg(x_h, cfg, op);
  LayerWeights w(params, cfg, op);
  DSV3_CHECK(a.B == cache.batch, "[", op, "] x has batch ", a.B, " but the cache was made for ",
             cache.batch);
  BusyGuard cguard(cache.busy, true, "KVCache");
  if (w.mla_layer) {
    DSV3_CHECK(cache.kind == "latent", "[", op, "] an MLA layer needs a latent cache");
    DSV3_CHECK(cache.width == w.mla_d.Dc + w.mla_d.Dr, "[", op, "] cache width ", cache.width,
               " != kv_lora_rank + qk_rope_head_dim = ", w.mla_d.Dc + w.mla_d.Dr);
  } else {
    DSV3_CHECK(cache.kind == "kv", "[", op, "] an MHA/GQA layer needs a kv cache");
    DSV3_CHECK(cache.width == w.mha_d.cache_width(), "[", op, "] cache width ", cache.width,
               " does not match the config (", w.mha_d.cache_width(), ")");
  }
  // the kernel's checks before begin_write (which forgets rows): a refused call leaves the
  // cache unchanged
  if (w.mla_layer) {
    mla_check_dims(w.mla_d);
    mla_check_params(w.mla, w.mla_d);
  } else {
    mha_check_dims(w.mha_d);
    mha_check_params(w.mha);
  }
  cache.begin_write(layer, layer + 1, start_pos, a.T);
  F32 out = empty(shape_of(a.x));
  float* po = out.mutable_data();
  const float* px = a.x.data();
  float* base = cache.begin_layer(layer, start_pos);
  if (w.mla_layer) {
    const MlaDims& d = w.mla_d;
    py::gil_scoped_release nogil;
    const LatentCacheView v{base, cache.max_len, cache.bf16};
    if (absorbed)
      mla_decode_absorbed(po, px, w.mla, d, v, a.B, a.T, start_pos);
    else
      mla_decode_naive(po, px, w.mla, d, v, a.B, a.T, start_pos);
  } else {
    const MhaDims& d = w.mha_d;
    py::gil_scoped_release nogil;
    mha_decode(po, px, w.mha, d, KvCacheView{base, cache.max_len, cache.bf16}, a.B, a.T,
               start_pos);
  }
  cache.end_layer(layer, start_pos, a.T);
  cache.end_write(layer, layer + 1, start_pos, a.T);
  return out;
}

}  // namespace

void bind_attention(py::module_& m) {
  py::class_<KvCache, std::shared_ptr<KvCache>>(m, "KVCache")
      .def(py::init(&make_cache), arg("cfg"), arg("batch") = 1, arg("max_len") = 1024,
           arg("layers") = py::none(), arg("dtype") = "float32")
      .def_property_readonly("dtype", [](const KvCache& c) { return std::string(c.dtype()); })
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
      .def("truncate", [](KvCache& c, py::handle length_h) {
        const int64_t length = int_arg(length_h, "KVCache.truncate", "length", 0);
        BusyGuard guard(c.busy, true, "KVCache");
        c.truncate(length);
      }, arg("length"))
      .def("layer_data", [](KvCache& c, py::handle l_h) {
        const int64_t l = int_arg(l_h, "KVCache.layer_data", "layer");
        DSV3_INDEX_CHECK(l >= 0 && l < c.layers, "[KVCache] layer ", l, " out of range");
        BusyGuard guard(c.busy, false, "KVCache");
        F32 a({(py::ssize_t)c.batch, (py::ssize_t)c.max_len, (py::ssize_t)c.width});
        const std::vector<float> v = c.layer_values(l);  // the stored values (bf16: decoded)
        std::copy(v.begin(), v.end(), a.mutable_data());
        return a;
      }, arg("layer"))
      .def("__repr__", [](const KvCache& c) {
        return str_cat("KVCache(kind='", c.kind, "', dtype='", c.dtype(), "', layers=", c.layers,
                       ", batch=", c.batch,
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
