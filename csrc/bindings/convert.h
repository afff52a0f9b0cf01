// Python objects -> engine structs: Config -> layer dims, rope_scaling dict -> RopeParams,
// {hf_name: array} dicts -> parameter views (checked for presence, dtype and shape).
#pragma once
#include <limits>
#include <map>
#include <type_traits>
#include <string>

#include "bindings/arrays.h"
#include "kernels/mha.h"
#include "kernels/mla.h"
#include "kernels/rope.h"
#include "model/config.h"
#include "model/layout.h"

namespace dsv3 {
struct LossParts;  // model/model.h
}

namespace dsv3::py_glue {

RopeParams rope_params(int64_t dim, double theta, const py::object& scaling);

// A Python integer argument as int64_t in [lo, hi]: ints and numpy integers (anything with
// __index__) but bool and floats (TypeError naming the argument: 1.5 is never truncated);
// beyond int64 -> OverflowError, outside [lo, hi] -> ValueError, both naming the argument and
// the range (never pybind11's "incompatible function arguments"). The binding-side twin of
// python/dsv3/_args.py's integer(), for the entry points without a Python wrapper.
int64_t int_arg(const py::handle& v, const char* op, const char* name,
                int64_t lo = std::numeric_limits<int64_t>::min(),
                int64_t hi = std::numeric_limits<int64_t>::max());

// cfg.<name> as T; a missing attribute or a value of the wrong type raises TypeError naming
// the field (a dsv3.Config was validated before it gets here: ops.py passes a checked copy).
template <typename T>
T cfg_get(const py::object& cfg, const char* name) {
  if (!py::hasattr(cfg, name))
    throw py::type_error(str_cat("cfg must be a dsv3.Config (missing attribute ", name, ")"));
  py::object v = cfg.attr(name);
  if constexpr (std::is_same_v<T, int64_t>) {
    return int_arg(v, "cfg", name);
  } else {
    try {
      return v.cast<T>();
    } catch (const py::cast_error&) {
      throw py::type_error(str_cat("[cfg] ", name, " has the wrong type (",
                                   std::string(py::str(py::type::of(v).attr("__name__"))),
                                   ")"));
    }
  }
}

// The engine's ModelConfig of a dsv3.Config.
ModelConfig model_config(const py::object& cfg);
MlaDims mla_dims(const py::object& cfg);
MhaDims mha_dims(const py::object& cfg);

// {hf_name: float32 array} copies of the slab's entries (only the trainable ones if asked).
py::dict named_copy(const ParamLayout& L, const float* slab, bool trainable_only);

// {loss, main, mtp, balance} of a loss call (Model.loss, Trainer.evaluate)
py::dict loss_parts_dict(const LossParts& lp);

// Refuses params (which must be a dict) unless its keys are exactly the specs' names; the
// ValueError lists every missing and every unexpected key.
void check_param_keys(const py::handle& params, const std::vector<ParamSpec>& specs,
                      const char* op);

// Holds the arrays of a {name: array} dict alive and hands out checked pointers.
class ParamDict {
 public:
  ParamDict(const py::handle& d, const char* op);
  // The named weight, which must have exactly this shape.
  const float* get(const std::string& name, const Shape& shape);
  bool has(const std::string& name) const;

 private:
  py::dict dict_;
  const char* op_;
  std::map<std::string, F32> keep_;
};

}  // namespace dsv3::py_glue
