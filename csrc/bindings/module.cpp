// dsv3._core: the private extension module. One register function per concern; the public
// surface is python/dsv3/__init__.py.
#include <pybind11/pybind11.h>

#include "core/check.h"

namespace dsv3 {
void bind_info(pybind11::module_& m);
void bind_fp8(pybind11::module_& m);
void bind_lowp(pybind11::module_& m);
void bind_wlinear(pybind11::module_& m);
void bind_ops(pybind11::module_& m);
void bind_attention(pybind11::module_& m);
void bind_moe(pybind11::module_& m);
void bind_model(pybind11::module_& m);
void bind_resident(pybind11::module_& m);
void bind_train(pybind11::module_& m);
void bind_dist(pybind11::module_& m);
}  // namespace dsv3

PYBIND11_MODULE(_core, m) {
  m.doc() = "dsv3 C++ engine (private; use the dsv3 package)";
  // registered first: pybind11 tries the most recently registered translators first, and
  // NonFiniteError is a std::invalid_argument (-> ValueError) as well
  pybind11::register_exception<dsv3::NonFiniteError>(m, "NonFiniteError", PyExc_ValueError);
  dsv3::bind_info(m);
  dsv3::bind_ops(m);
  dsv3::bind_attention(m);
  dsv3::bind_moe(m);
  dsv3::bind_model(m);
  dsv3::bind_resident(m);
  dsv3::bind_train(m);
  dsv3::bind_dist(m);
  dsv3::bind_fp8(m);
  dsv3::bind_lowp(m);
  dsv3::bind_wlinear(m);
}
