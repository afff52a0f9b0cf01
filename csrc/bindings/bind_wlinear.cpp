// dsv3._core wlinear: csrc/kernels/wlinear.h on numpy arrays (test and benchmark surface; the
// model calls the engine directly). A weight is (fmt, data, scale_inv): fmt "fp32" with float32
// data [O, K], "bf16" with uint16 bit patterns [O, K], "fp8" with uint8 E4M3 codes [O, K] and
// float32 scale_inv [ceil(O/128), ceil(K/128)] (None for the other formats).
#include <string>

#include "bindings/arrays.h"
#include "kernels/wlinear.h"

namespace dsv3 {

namespace py = pybind11;
using namespace py_glue;
using py::arg;

namespace {

// The weight arrays kept alive for the call, and the view over them.
struct Weight {
  py::array data;
  F32 scale;
  WeightView view;
};

Weight weight_arg(const char* op, const std::string& fmt_s, py::handle data_h,
                  py::handle sinv_h) {
  Weight w;
  WeightFormat fmt;
  try {
    fmt = parse_weight_format(fmt_s.c_str());
  } catch (const std::invalid_argument& e) {
    throw py::value_error(str_cat("[", op, "] fmt: ", e.what()));
  }
  const char* want = fmt == WeightFormat::fp32 ? "float32" : fmt == WeightFormat::bf16
                                                                 ? "uint16 (bf16 bit patterns)"
                                                                 : "uint8 (E4M3 codes)";
  const bool ok = fmt == WeightFormat::fp32   ? is_array_of<float>(data_h, op, "data")
                  : fmt == WeightFormat::bf16 ? is_array_of<uint16_t>(data_h, op, "data")
                                              : is_array_of<uint8_t>(data_h, op, "data");
  if (!ok)
    throw py::type_error(str_cat("[", op, "] data must be a ", want, " numpy array for fmt='",
                                 fmt_s, "', got ", dtype_name(data_h)));
  w.data = py::array::ensure(data_h, py::array::c_style);
  DSV3_CHECK(w.data.ndim() == 2 && w.data.shape(0) >= 1 && w.data.shape(1) >= 1, "[", op,
             "] data must be 2-D [O, K] with O, K >= 1, got shape ", shape_str(shape_of(w.data)));
  const int64_t O = w.data.shape(0), K = w.data.shape(1);
  w.view = {fmt, w.data.data(), nullptr, O, K};
  if (fmt == WeightFormat::fp8_e4m3) {
    DSV3_CHECK(!sinv_h.is_none(), "[", op, "] scale_inv is required for fmt='fp8'");
    w.scale = f32(sinv_h, op, "scale_inv");
    const int64_t ob = (O + 127) / 128, kb = (K + 127) / 128;
    DSV3_CHECK(w.scale.ndim() == 2 && w.scale.shape(0) == ob && w.scale.shape(1) == kb, "[", op,
               "] scale_inv must have shape (ceil(O/128), ceil(K/128)) = (", ob, ", ", kb,
               "), got ", shape_str(shape_of(w.scale)));
    w.view.scale_inv = w.scale.data();
  } else {
    DSV3_CHECK(sinv_h.is_none(), "[", op, "] scale_inv must be None for fmt='", fmt_s, "'");
  }
  return w;
}

F32 wlinear_py(py::handle x_h, const std::string& fmt, py::handle data_h, py::handle sinv_h) {
  const Weight w = weight_arg("wlinear", fmt, data_h, sinv_h);
  F32 x = f32(x_h, "wlinear", "x");
  DSV3_CHECK(x.ndim() >= 1 && x.shape(x.ndim() - 1) == w.view.K, "[wlinear] x must have last ",
             "dimension K = ", w.view.K, ", got shape ", shape_str(shape_of(x)));
  Shape s = shape_of(x);
  s.back() = (py::ssize_t)w.view.O;
  F32 y = empty(s);
  const int64_t R = rows(x);
  float* py_ = y.mutable_data();
  const float* px = x.data();
  py::gil_scoped_release nogil;
  wlinear_forward(py_, px, w.view, R);
  return y;
}

F32 wlinear_rows_py(py::handle ids_h, const std::string& fmt, py::handle data_h,
                    py::handle sinv_h) {
  const Weight w = weight_arg("wlinear_rows", fmt, data_h, sinv_h);
  I64 ids = i64(ids_h, "wlinear_rows", "ids");
  const int64_t R = ids.size();
  const int64_t* pi = ids.data();
  for (int64_t r = 0; r < R; ++r)
    if (pi[r] < 0 || pi[r] >= w.view.O)
      throw py::index_error(str_cat("[wlinear_rows] ids must be in [0, O = ", w.view.O,
                                    "), got ", pi[r]));
  Shape s = shape_of(ids);
  s.push_back((py::ssize_t)w.view.K);
  F32 out = empty(s);
  float* po = out.mutable_data();
  py::gil_scoped_release nogil;
  wlinear_rows(po, pi, w.view, R);
  return out;
}

// x[:, :n] @ data[r0 : r0 + n, :] into the first K columns of a zero [R, ldy] (n: all of x's
// columns by default, ldy: K; the strides as MLA's absorbed decode uses them); IndexError
// from the engine's range check (std::out_of_range)
F32 wlinear_rows_product_py(py::handle x_h, int64_t r0, const std::string& fmt,
                            py::handle data_h, py::handle sinv_h, py::object n_h,
                            py::object ldy_h) {
  const Weight w = weight_arg("wlinear_rows_product", fmt, data_h, sinv_h);
  F32 x = f32(x_h, "wlinear_rows_product", "x");
  DSV3_CHECK(x.ndim() == 2, "[wlinear_rows_product] x must be 2-D [R, columns], got shape ",
             shape_str(shape_of(x)));
  const int64_t R = x.shape(0), ldx = x.shape(1), K = w.view.K;
  const int64_t n = n_h.is_none() ? ldx : n_h.cast<int64_t>();
  const int64_t ldy = ldy_h.is_none() ? K : ldy_h.cast<int64_t>();
  DSV3_CHECK(n >= 0 && n <= ldx, "[wlinear_rows_product] n must be in [0, x.shape[1] = ", ldx,
             "], got ", n);
  DSV3_CHECK(ldy >= K, "[wlinear_rows_product] ldy must be >= K = ", K, ", got ", ldy);
  F32 y = zeros({(py::ssize_t)R, (py::ssize_t)ldy});
  float* py_ = y.mutable_data();
  const float* px = x.data();
  py::gil_scoped_release nogil;
  wlinear_rows_product(py_, ldy, px, ldx, w.view, r0, n, R);
  return y;
}

}  // namespace

void bind_wlinear(py::module_& m) {
  m.def("wlinear", &wlinear_py, arg("x"), arg("fmt"), arg("data"), arg("scale_inv") = py::none());
  m.def("wlinear_rows", &wlinear_rows_py, arg("ids"), arg("fmt"), arg("data"),
        arg("scale_inv") = py::none());
  m.def("wlinear_rows_product", &wlinear_rows_product_py, arg("x"), arg("r0"), arg("fmt"),
        arg("data"), arg("scale_inv") = py::none(), arg("n") = py::none(),
        arg("ldy") = py::none());
  m.def("wlinear_tier", [] { return std::string(wlinear_tier_name()); });
}

}  // namespace dsv3
