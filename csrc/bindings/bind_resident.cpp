// dsv3._core.Model.from_resident and the weight-format queries: a Model whose projection
// matrices stay resident in their storage format (model/resident.cpp), in numpy arrays or
// memory maps this binding keeps alive for the model's lifetime.
//
//   weights = {hf_name: value}, every weight of the layout exactly once; value is
//     float32 ndarray                   copied into the slab
//     ("fp32", float32 [O,K], None)     resident, zero copy
//     ("bf16", uint16 [O,K], None)      resident bf16 bit patterns
//     ("fp8",  uint8 [O,K], float32 [ceil(O/128), ceil(K/128)])
//                                       resident E4M3 codes + weight_scale_inv
//   Tuples are allowed for the projection matrices (layout.h resident_capable) and kv_b_proj
//   (dequantized into the slab). Arrays must be C-contiguous with exactly these dtypes (no
//   silent copies). Unknown / missing names -> KeyError listing them; dtype -> TypeError;
//   shape, contiguity, format, non-finite scale_inv -> ValueError; all name the tensor.
#include <pybind11/stl.h>

#include "bindings/convert.h"
#include "core/busy.h"
#include "model/model.h"

namespace dsv3 {

namespace py = pybind11;
using namespace py_glue;
using py::arg;

namespace {

constexpr const char* kOp = "Model.from_resident";

// Python objects owned by a C++ model (the resident arrays); released under the GIL.
struct PyKeepAlive {
  std::vector<py::object> objs;
  ~PyKeepAlive() {
    py::gil_scoped_acquire gil;
    objs.clear();
  }
};

// obj as a C-contiguous ndarray of exactly T with this shape (the tensor's `what`).
template <typename T>
const T* resident_array(const py::handle& obj, const std::string& name, const char* what,
                        const char* dtype, const Shape& want) {
  const std::string arg = name + " " + what;
  if (!is_array_of<T>(obj, kOp, arg.c_str()))
    throw py::type_error(str_cat("[", kOp, "] '", name, "': ", what, " must be a ", dtype,
                                 " numpy array, got ", dtype_name(obj)));
  auto a = py::reinterpret_borrow<py::array>(obj);
  DSV3_CHECK(a.flags() & py::array::c_style, "[", kOp, "] '", name, "': ", what,
             " must be C-contiguous (resident weights are never copied)");
  DSV3_CHECK(shape_of(a) == want, "[", kOp, "] '", name, "': ", what, " must have shape ",
             shape_str(want), ", got ", shape_str(shape_of(a)));
  return static_cast<const T*>(a.data());
}

// (fmt, data, scale_inv) of weight e as a view; the arrays go to keep.
// codes_checked: the caller has already checked the fp8 codes for NaN (dsv3.resident's loader
// rejects them), so the scan here is skipped.
WeightView held_view(const py::handle& value, const ParamEntry& e, PyKeepAlive& keep,
                     bool codes_checked) {
  const std::string& n = e.name;
  auto t = py::reinterpret_borrow<py::tuple>(value);
  if (t.size() != 3 || !py::isinstance<py::str>(t[0]))
    throw py::type_error(str_cat("[", kOp, "] '", n, "' must be a float32 array or a tuple ",
                                 "(fmt, data, scale_inv) with fmt 'fp32', 'bf16' or 'fp8'"));
  DSV3_CHECK(may_be_held(n), "[", kOp, "] '", n, "' cannot be resident: only projection ",
             "matrices (and kv_b_proj, dequantized) can; give norms, biases and router gates ",
             "as float32 arrays");
  const std::string fs = py::str(t[0]);
  WeightFormat f;
  try {
    f = parse_weight_format(fs.c_str());
  } catch (const std::invalid_argument& ex) {
    throw std::invalid_argument(str_cat("[", kOp, "] '", n, "': ", ex.what()));
  }
  const int64_t O = e.shape[0], K = e.shape[1];
  const Shape want{O, K};
  WeightView v{f, nullptr, nullptr, O, K};
  if (f == WeightFormat::fp32) v.data = resident_array<float>(t[1], n, "data", "float32", want);
  if (f == WeightFormat::bf16)
    v.data = resident_array<uint16_t>(t[1], n, "data", "uint16 (bf16 bits)", want);
  if (f == WeightFormat::fp8_e4m3) {
    v.data = resident_array<uint8_t>(t[1], n, "data", "uint8 (E4M3 codes)", want);
    v.scale_inv = resident_array<float>(t[2], n, "scale_inv", "float32",
                                        Shape{(O + 127) / 128, (K + 127) / 128});
    // once here, so that the decode GEMV need not check every row group on every use (the
    // arrays must not change afterwards: a NaN code written later would go unseen)
    if (codes_checked) {
      v.nan_free = true;
    } else {
      py::gil_scoped_release nogil;
      v.nan_free = fp8_codes_nan_free(static_cast<const uint8_t*>(v.data), O * K);
    }
  } else {
    DSV3_CHECK(t[2].is_none(), "[", kOp, "] '", n, "': scale_inv must be None for ", fs);
  }
  keep.objs.push_back(py::reinterpret_borrow<py::object>(t[1]));
  keep.objs.push_back(py::reinterpret_borrow<py::object>(t[2]));
  return v;
}

std::string name_list(const std::vector<std::string>& v) {
  std::string s;
  for (size_t i = 0; i < v.size() && i < 10; ++i) s += (i ? ", " : "") + v[i];
  return s + (v.size() > 10 ? str_cat(", ... (", v.size(), ")") : "");
}

std::shared_ptr<Model> from_resident(py::object cfg, py::handle weights_h, bool codes_checked) {
  const ModelConfig c = model_config(cfg);
  if (!py::isinstance<py::dict>(weights_h))
    throw py::type_error(str_cat("[", kOp, "] weights must be a dict {hf_name: array or ",
                                 "(fmt, data, scale_inv)}, got ", dtype_name(weights_h)));
  auto weights = py::reinterpret_borrow<py::dict>(weights_h);
  const ParamLayout L = build_layout(c);
  std::vector<std::string> unknown, missing;
  for (auto item : weights) {
    if (!py::isinstance<py::str>(item.first))
      throw py::type_error(str_cat("[", kOp, "] weight names must be str"));
    const std::string n = py::str(item.first);
    if (!L.has(n)) unknown.push_back(n);
  }
  for (const ParamEntry& e : L.entries)
    if (!weights.contains(e.name)) missing.push_back(e.name);
  if (!unknown.empty() || !missing.empty())
    throw py::key_error(str_cat("[", kOp, "] ",
                                missing.empty() ? "" : "missing weights: " + name_list(missing),
                                !missing.empty() && !unknown.empty() ? "; " : "",
                                unknown.empty() ? "" : "unknown names: " + name_list(unknown)));
  auto keep = std::make_shared<PyKeepAlive>();
  std::vector<F32> copies;
  ResidentWeights w;
  for (const ParamEntry& e : L.entries) {
    py::handle v = weights[py::str(e.name)];
    if (py::isinstance<py::tuple>(v)) {
      w.held.emplace(e.name, held_view(v, e, *keep, codes_checked));
      continue;
    }
    F32 a = f32(v, kOp, e.name.c_str());
    const Shape want(e.shape.begin(), e.shape.end());
    DSV3_CHECK(shape_of(a) == want, "[", kOp, "] '", e.name, "' must have shape ",
               shape_str(want), ", got ", shape_str(shape_of(a)));
    w.copied.emplace(e.name, a.data());
    copies.push_back(std::move(a));
  }
  w.keep_alive = keep;
  py::gil_scoped_release nogil;
  return std::make_shared<Model>(c, w);
}

}  // namespace

// Methods of the Model class registered by bind_model (called after it).
void bind_resident(py::module_& m) {
  auto cls = py::reinterpret_borrow<py::class_<Model, std::shared_ptr<Model>>>(m.attr("Model"));
  cls.def_static("from_resident", &from_resident, arg("cfg"), arg("weights"),
                 arg("codes_checked") = false)
      .def("is_resident", &Model::is_resident)
      .def("weight_format", [](const Model& md, const std::string& name) {
        if (!md.layout().has(name))
          throw py::key_error(str_cat("[Model.weight_format] no weight named '", name, "'"));
        return std::string(weight_format_name(md.weight_format(name)));
      }, arg("name"))
      .def("weight_formats", [](const Model& md) {
        py::dict d;
        for (const ParamEntry& e : md.layout().entries)
          if (e.shape.size() == 2)
            d[py::str(e.name)] = weight_format_name(md.weight_format(e.name));
        return d;
      })
      .def("resident_bytes", &Model::weight_bytes);
}

}  // namespace dsv3
