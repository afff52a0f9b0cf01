// dsv3._core.Model: the C++ model object, its parameter slab by Hugging Face name, forward,
// cached forward, loss and gradients.
#include <pybind11/stl.h>

#include <memory>

#include "bindings/convert.h"
#include "core/busy.h"
#include "kernels/lowp_weights.h"
#include "model/model.h"

namespace dsv3 {

namespace py = pybind11;
using namespace py_glue;
using py::arg;

namespace {

struct Tokens {
  I64 arr;
  int64_t B, T;
  bool batched;
};

Tokens tokens_arg(const py::handle& h, const char* op, int64_t min_t) {
  Tokens t{i64(h, op, "tokens"), 1, 0, false};
  check_ndim(t.arr, 1, 2, op, "tokens (T,) or (B, T)");
  t.batched = t.arr.ndim() == 2;
  t.B = t.batched ? t.arr.shape(0) : 1;
  t.T = t.arr.shape(t.arr.ndim() - 1);
  DSV3_CHECK(t.B >= 1 && t.T >= min_t, "[", op, "] tokens must hold at least ", min_t,
             " token(s) per sequence, got shape ", shape_str(shape_of(t.arr)));
  return t;
}

// The layout's parameter counts per piece (Config.num_parameters composes them).
py::dict param_counts_py(py::object cfg) {
  const ParamCounts n = param_counts(model_config(cfg));
  py::dict d;
  d["embed"] = n.embed;
  d["norm"] = n.norm;
  d["head"] = n.head;
  d["dense_block"] = n.dense_block;
  d["moe_block"] = n.moe_block;
  d["moe_block_active"] = n.moe_block_active;
  d["mtp_own"] = n.mtp_own;
  return d;
}

// The layout's (name, shape) list, without allocating the slab (the tensor list of a
// checkpoint of this config: dsv3.resident, bench/make_checkpoint.py).
py::list param_layout_py(py::object cfg) {
  const ParamLayout L = build_layout(model_config(cfg));
  py::list out;
  for (const ParamEntry& e : L.entries)
    out.append(py::make_tuple(e.name, py::tuple(py::cast(e.shape))));
  return out;
}

// A resident model's weights are not written in place (they may be memory maps shared with
// others): load_state_dict / set_param refuse it.
void check_writable(const Model& md) {
  DSV3_CHECK(!md.is_resident(), "[load_state_dict] this model holds resident inference ",
             "weights, which are read-only; load it with Model.from_pretrained(dir) (fp32 ",
             "weights) to change or train them");
}

// {name: float32 copy} of every weight, the resident ones dequantized.
py::dict state_copy(const Model& md) {
  if (!md.is_resident()) return named_copy(md.layout(), md.params().data(), false);
  py::dict d;
  std::vector<std::pair<const ParamEntry*, float*>> todo;
  for (const ParamEntry& e : md.layout().entries) {
    F32 a(Shape(e.shape.begin(), e.shape.end()));
    todo.emplace_back(&e, a.mutable_data());
    d[py::str(e.name)] = a;
  }
  py::gil_scoped_release nogil;
  for (auto& [e, out] : todo) md.copy_param(out, e->name);
  return d;
}

}  // namespace

// One registration list of the Model class (each entry a few-line adapter): longer than ~80
// lines only because the class has that many methods.
void bind_model(py::module_& m) {
  m.def("param_counts", &param_counts_py, arg("cfg"));
  m.def("param_layout", &param_layout_py, arg("cfg"));
  py::class_<Model, std::shared_ptr<Model>>(m, "Model")
      .def(py::init([](py::object cfg, uint64_t seed, int ep, int ep_index, bool random_init) {
             ModelConfig c = model_config(cfg);
             py::gil_scoped_release nogil;
             if (ep > 1)
               return std::make_shared<Model>(c, seed, ExpertShard{ep, ep_index}, random_init);
             DSV3_CHECK(ep == 1 && ep_index == 0, "[Model] expert_shard must be (ep, index) ",
                        "with ep >= 1 and 0 <= index < ep, got (", ep, ", ", ep_index, ")");
             return std::make_shared<Model>(c, seed, random_init);
           }),
           arg("cfg"), arg("seed"), arg("ep") = 1, arg("ep_index") = 0,
           arg("random_init") = true)
      .def_property_readonly("expert_shard", [](const Model& md) {  // (ep, index); (1, 0): all
        return py::make_tuple(md.expert_shard().ep, md.expert_shard().index);
      })
      // keeps only the routed experts of EP rank ep_index (the others' weights are freed).
      // Holds the GIL: the layout it swaps is read without a guard by num_parameters,
      // param_info and expert_shard (one copy of the kept weights; review of #18)
      .def("shard_experts", [](Model& md, int ep, int ep_index) {
        BusyGuard guard(md.busy, true, "Model");
        md.shard_experts(ExpertShard{ep, ep_index});
      }, arg("ep"), arg("ep_index"))
      .def_property_readonly("num_parameters", [](const Model& md) {
        int64_t n = 0;
        for (const ParamEntry& e : md.layout().entries) n += e.size;
        return n;
      })
      .def("param_info", [](const Model& md) {
        py::list out;
        for (const ParamEntry& e : md.layout().entries)
          out.append(py::make_tuple(e.name, py::tuple(py::cast(e.shape)), e.trainable, e.decay));
        return out;
      })
      .def("state_dict", [](const Model& md) {
        BusyGuard guard(md.busy, false, "Model");
        return state_copy(md);
      })
      .def("set_param", [](Model& md, const std::string& name, py::handle value) {
        check_writable(md);
        BusyGuard guard(md.busy, true, "Model");
        const ParamEntry& e = md.layout().at(name);
        F32 a = f32(value, "load_state_dict", name.c_str());
        const Shape want(e.shape.begin(), e.shape.end());
        DSV3_CHECK(shape_of(a) == want, "[load_state_dict] '", name, "' must have shape ",
                   shape_str(want), ", got ", shape_str(shape_of(a)));
        std::copy(a.data(), a.data() + e.size, md.params().data() + e.offset);
      }, arg("name"), arg("value"))
      .def("set_params", [](Model& md, py::dict values) {
        // every check first, then one copy under one exclusive hold: all or nothing
        check_writable(md);
        std::vector<std::pair<const ParamEntry*, F32>> todo;
        for (auto item : values) {
          const std::string name = py::str(item.first);
          const ParamEntry& e = md.layout().at(name);
          F32 a = f32(item.second, "load_state_dict", name.c_str());
          const Shape want(e.shape.begin(), e.shape.end());
          DSV3_CHECK(shape_of(a) == want, "[load_state_dict] '", name, "' must have shape ",
                     shape_str(want), ", got ", shape_str(shape_of(a)));
          todo.emplace_back(&e, std::move(a));
        }
        std::vector<std::pair<const ParamEntry*, const float*>> src;
        for (auto& [e, a] : todo) src.emplace_back(e, a.data());
        BusyGuard guard(md.busy, true, "Model");
        py::gil_scoped_release nogil;  // the arrays stay alive in todo; no Python object is touched
        for (auto& [e, p] : src) std::copy(p, p + e->size, md.params().data() + e->offset);
      }, arg("values"))
      .def("forward", [](Model& md, py::handle tok) {
        Tokens t = tokens_arg(tok, "Model.forward", 1);
        const int64_t V = md.config().V;
        F32 out = t.batched ? F32({t.B, t.T, V}) : F32({t.T, V});
        float* po = out.mutable_data();
        const int64_t* pt = t.arr.data();
        BusyGuard guard(md.busy, false, "Model");
        py::gil_scoped_release nogil;
        md.forward(po, pt, t.B, t.T);
        return out;
      }, arg("tokens"))
      .def("forward_cached", [](Model& md, py::handle tok, KvCache& cache, int64_t start_pos,
                                bool want_hidden) {
        Tokens t = tokens_arg(tok, "Model.forward", 1);
        const int64_t V = md.config().V, D = md.config().D;
        F32 out = t.batched ? F32({t.B, t.T, V}) : F32({t.T, V});
        F32 hid = want_hidden ? (t.batched ? F32({t.B, t.T, D}) : F32({t.T, D})) : F32(0);
        float *po = out.mutable_data(), *ph = want_hidden ? hid.mutable_data() : nullptr;
        const int64_t* pt = t.arr.data();
        {
          BusyGuard guard(md.busy, false, "Model");
          BusyGuard cguard(cache.busy, true, "KVCache");
          py::gil_scoped_release nogil;
          md.forward_cached(po, ph, pt, t.B, t.T, cache, start_pos);
        }
        return want_hidden ? py::object(py::make_tuple(out, hid)) : py::object(out);
      }, arg("tokens"), arg("cache"), arg("start_pos"), arg("want_hidden"))
      .def("new_cache", [](const Model& md, int64_t batch, int64_t max_len, bool bf16) {
        return md.new_cache(batch, max_len, bf16);
      }, arg("batch"), arg("max_len"), arg("bf16") = false)
      .def("new_mtp_cache", [](const Model& md, int64_t batch, int64_t max_len, bool bf16) {
        return md.new_mtp_cache(batch, max_len, bf16);
      }, arg("batch"), arg("max_len"), arg("bf16") = false)
      .def("mtp_forward_cached", [](Model& md, py::handle h_prev, py::handle tok, KvCache& cache,
                                    int64_t start_pos, int64_t k) {
        const char* op = "Model.mtp_forward";
        Tokens t = tokens_arg(tok, op, 1);
        const int64_t V = md.config().V, D = md.config().D;
        F32 h = f32(h_prev, op, "hidden");
        const Shape want = t.batched ? Shape{t.B, t.T, D} : Shape{t.T, D};
        DSV3_CHECK(shape_of(h) == want, "[", op, "] hidden must have shape ", shape_str(want),
                   " (tokens' shape + hidden_size), got ", shape_str(shape_of(h)));
        F32 out = t.batched ? F32({t.B, t.T, V}) : F32({t.T, V});
        F32 hid = t.batched ? F32({t.B, t.T, D}) : F32({t.T, D});
        float *po = out.mutable_data(), *ph = hid.mutable_data();
        const float* pin = h.data();
        const int64_t* pt = t.arr.data();
        {
          BusyGuard guard(md.busy, false, "Model");
          BusyGuard cguard(cache.busy, true, "KVCache");
          py::gil_scoped_release nogil;
          md.mtp_forward_cached(po, ph, pin, pt, t.B, t.T, cache, start_pos, k);
        }
        return py::make_tuple(out, hid);
      }, arg("hidden"), arg("tokens"), arg("cache"), arg("start_pos"), arg("k"))
      // precision / weight_cache: the training step's GEMM precision and its prepared-weight
      // cache ("none", "step": codes only, "panels": panels kept too; lowp_weights.h), for
      // the tests that compare them; Model.loss_and_grad uses the fp32 defaults
      .def("loss", [](Model& md, py::handle tok, double alpha, double mtp_weight, bool grad,
                      const std::string& precision, const std::string& weight_cache) {
        Tokens t = tokens_arg(tok, "Model.loss", 2);
        const int64_t* pt = t.arr.data();
        const GemmPrecision prec = parse_gemm_precision(precision.c_str());
        DSV3_CHECK(weight_cache == "none" || weight_cache == "step" || weight_cache == "panels",
                   "[Model.loss] weight_cache must be 'none', 'step' or 'panels', got '",
                   weight_cache, "'");
        std::vector<float> g;
        LossParts lp;
        {
          BusyGuard guard(md.busy, false, "Model");
          py::gil_scoped_release nogil;
          if (grad) g.assign((size_t)md.layout().total, 0.f);
          std::unique_ptr<LowpWeightCache> wc;
          if (weight_cache != "none") wc = std::make_unique<LowpWeightCache>(weight_cache == "panels");
          lp = md.loss(pt, t.B, t.T, grad ? g.data() : nullptr, alpha, mtp_weight, prec, nullptr,
                       nullptr, wc.get());
        }
        py::dict d = loss_parts_dict(lp);
        py::array_t<int64_t> load({(py::ssize_t)lp.moe_blocks, (py::ssize_t)md.config().E});
        std::copy(lp.expert_load.begin(), lp.expert_load.end(), load.mutable_data());
        d["expert_load"] = load;
        py::object grads = grad ? py::object(named_copy(md.layout(), g.data(), true)) : py::none();
        return py::tuple(py::make_tuple(d, grads));
      }, arg("tokens"), arg("alpha"), arg("mtp_weight"), arg("grad"), arg("precision") = "fp32",
         arg("weight_cache") = "step");
}

}  // namespace dsv3
