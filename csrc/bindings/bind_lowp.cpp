// dsv3._core lowp: the bf16 GEMM of core/lowp_gemm.h on numpy arrays (any strides: a
// transposed view is read in place), and the active low-precision tier.
#include "bindings/arrays.h"
#include "core/lowp_gemm.h"

namespace dsv3 {

namespace py = pybind11;
using namespace py_glue;

namespace {

// A float32 2-D array read through its strides (no copy).
Bf16Src strided(const py::array& x, const char* name) {
  DSV3_CHECK(x.ndim() == 2, "[ops.bf16_matmul] ", name, " must be 2-D, got shape ",
             shape_str(shape_of(x)));
  DSV3_CHECK(x.strides(0) % 4 == 0 && x.strides(1) % 4 == 0, "[ops.bf16_matmul] ", name,
             " must have float-aligned strides");
  Bf16Src s;
  s.f32 = static_cast<const float*>(x.data());
  s.rs = x.strides(0) / 4;
  s.cs = x.strides(1) / 4;
  return s;
}

py::array float32_array(const py::handle& obj, const char* name) {
  if (!is_array_of<float>(obj, "ops.bf16_matmul", name))
    throw py::type_error(str_cat("[ops.bf16_matmul] ", name, " must be a float32 numpy array, ",
                                 "got ", dtype_name(obj)));
  return py::reinterpret_borrow<py::array>(obj);
}

// C[M,N] = a[M,K] @ b[K,N], operands rounded to bf16 (RNE), exact products, fp32 sums.
F32 bf16_matmul(py::handle a_h, py::handle b_h) {
  py::array a = float32_array(a_h, "a"), b = float32_array(b_h, "b");
  Bf16Src sa = strided(a, "a"), sb = strided(b, "b");
  const int64_t M = a.shape(0), K = a.shape(1), N = b.ndim() == 2 ? b.shape(1) : 0;
  DSV3_CHECK(b.shape(0) == K, "[ops.bf16_matmul] b must have ", K, " rows (a's columns), got ",
             "shape ", shape_str(shape_of(b)));
  std::swap(sb.rs, sb.cs);  // the kernel takes B as [N,K]: element (n, k) = b[k, n]
  F32 c = empty({(py::ssize_t)M, (py::ssize_t)N});
  float* pc = c.mutable_data();
  py::gil_scoped_release nogil;
  bf16_gemm(pc, N, sa, sb, M, N, K, false);
  return c;
}

}  // namespace

void bind_lowp(py::module_& m) {
  m.def("bf16_matmul", &bf16_matmul, py::arg("a"), py::arg("b"));
  m.def("lowp_tier", [] { return std::string(lowp_tier_name(lowp_tier())); });
  m.def("lowp_reason", [] { return lowp_tier_reason(); });
}

}  // namespace dsv3
