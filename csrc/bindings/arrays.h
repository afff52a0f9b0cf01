// numpy <-> engine glue shared by the binding files. Inputs are checked here (dtype -> TypeError,
// rank/shape -> ValueError, both naming the argument) and made C-contiguous (a copy only when
// the caller's array is not). Outputs are always freshly allocated arrays: the engine never
// writes into a caller's array.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/check.h"

namespace dsv3::py_glue {

namespace py = pybind11;
using F32 = py::array_t<float, py::array::c_style>;
using I64 = py::array_t<int64_t, py::array::c_style>;
using Shape = std::vector<py::ssize_t>;

inline std::string dtype_name(const py::handle& obj) {
  if (py::isinstance<py::array>(obj)) return py::str(py::reinterpret_borrow<py::array>(obj).dtype());
  return py::str(py::type::handle_of(obj).attr("__name__"));
}

// Whether obj is an ndarray of exactly T's dtype, compared by value (kind and size): arrays
// unpickled or built from a descriptor hold an equal dtype that is not numpy's singleton
// object. T's dtype in non-native byte order raises TypeError naming the argument (the engine
// reads native words; converting silently would hide a copy).
template <typename T>
bool is_array_of(const py::handle& obj, const char* op, const char* name) {
  if (!py::isinstance<py::array>(obj)) return false;
  const py::dtype dt = py::reinterpret_borrow<py::array>(obj).dtype(), want = py::dtype::of<T>();
  if (dt.kind() != want.kind() || dt.itemsize() != want.itemsize() || dt.has_fields())
    return false;
  const uint16_t probe = 1;
  const char native = *reinterpret_cast<const char*>(&probe) == 1 ? '<' : '>';
  const char order = dt.byteorder();
  if (order == '=' || order == '|' || order == native) return true;
  throw py::type_error(str_cat("[", op, "] ", name, " has non-native byte order (dtype ",
                               std::string(py::str(dt)), "); pass ", name,
                               ".astype(", name, ".dtype.newbyteorder('='))"));
}

// A float32 ndarray, C-contiguous. Anything else (float64, int, lists) raises TypeError.
inline F32 f32(const py::handle& obj, const char* op, const char* name) {
  if (!is_array_of<float>(obj, op, name))
    throw py::type_error(str_cat("[", op, "] ", name, " must be a float32 numpy array, got ",
                                 dtype_name(obj)));
  return F32::ensure(obj);
}

// An integer ndarray (any integer dtype, converted to int64). Floats/bools raise TypeError.
inline I64 i64(const py::handle& obj, const char* op, const char* name) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(str_cat("[", op, "] ", name, " must be an integer numpy array, got ",
                                 dtype_name(obj)));
  auto arr = py::reinterpret_borrow<py::array>(obj);
  const char kind = arr.dtype().kind();
  if (kind != 'i' && kind != 'u')
    throw py::type_error(str_cat("[", op, "] ", name, " must be an integer numpy array, got ",
                                 dtype_name(obj)));
  // forcecast: numpy will not cast uint64 to int64 "safely", and ensure() then returned a null
  // array (SIGSEGV on use). uint64 ids >= 2^63 become negative and fail the id range checks.
  I64 out = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(obj);
  if (!out) throw py::error_already_set();
  return out;
}

// An array the engine updates in place: exactly dtype T, C-contiguous and writeable, else
// TypeError / ValueError naming the argument (a converted copy would silently lose the writes).
template <typename T>
py::array_t<T, py::array::c_style> inplace(const py::handle& obj, const char* op,
                                           const char* name, const char* type_name) {
  if (!is_array_of<T>(obj, op, name))
    throw py::type_error(str_cat("[", op, "] ", name, " is updated in place and must be a ",
                                 type_name, " numpy array, got ", dtype_name(obj)));
  auto arr = py::reinterpret_borrow<py::array>(obj);
  DSV3_CHECK(arr.flags() & py::array::c_style, "[", op, "] ", name,
             " is updated in place and must be C-contiguous (pass np.ascontiguousarray(",
             name, ") and read the result from that array)");
  DSV3_CHECK(arr.writeable(), "[", op, "] ", name, " is updated in place and must be writeable");
  return py::reinterpret_borrow<py::array_t<T, py::array::c_style>>(obj);
}

inline Shape shape_of(const py::array& a) { return Shape(a.shape(), a.shape() + a.ndim()); }

inline std::string shape_str(const Shape& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

inline void check_ndim(const py::array& a, int lo, int hi, const char* op, const char* name) {
  DSV3_CHECK(a.ndim() >= lo && a.ndim() <= hi, "[", op, "] ", name, " must have ",
             lo == hi ? std::to_string(lo) : str_cat(lo, " to ", hi), " dimensions, got shape ",
             shape_str(shape_of(a)));
}

inline void check_same_shape(const py::array& a, const py::array& b, const char* op,
                             const char* name_a, const char* name_b) {
  DSV3_CHECK(shape_of(a) == shape_of(b), "[", op, "] ", name_b, " must have the shape of ",
             name_a, " ", shape_str(shape_of(a)), ", got ", shape_str(shape_of(b)));
}

// Product of all dimensions but the last (rows of a [..., D] array).
inline int64_t rows(const py::array& a) {
  int64_t r = 1;
  for (py::ssize_t i = 0; i + 1 < a.ndim(); ++i) r *= a.shape(i);
  return r;
}

inline F32 empty(const Shape& s) { return F32(s); }
inline F32 zeros(const Shape& s) {
  F32 a(s);
  std::fill(a.mutable_data(), a.mutable_data() + a.size(), 0.f);
  return a;
}

}  // namespace dsv3::py_glue
