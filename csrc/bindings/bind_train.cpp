// dsv3._core.Trainer (the C++ training step), adamw_update (for tests) and the precision knob.
#include <pybind11/stl.h>

#include "bindings/convert.h"
#include "core/busy.h"
#include "model/train.h"

namespace dsv3 {

namespace py = pybind11;
using namespace py_glue;
using py::arg;

namespace {

using U16 = py::array_t<uint16_t, py::array::c_style>;

TrainStepOptions step_options(const py::dict& d) {
  TrainStepOptions o;
  o.lr = d["lr"].cast<float>();
  o.beta1 = d["beta1"].cast<float>();
  o.beta2 = d["beta2"].cast<float>();
  o.eps = d["eps"].cast<float>();
  o.weight_decay = d["weight_decay"].cast<float>();
  o.grad_clip = d["grad_clip"].cast<float>();
  o.grad_accum = d["grad_accum"].cast<int64_t>();
  o.alpha = d["alpha"].cast<double>();
  o.mtp_weight = d["mtp_weight"].cast<double>();
  o.gamma = d["gamma"].cast<float>();
  o.precision = parse_gemm_precision(d["precision"].cast<std::string>().c_str());
  return o;
}

template <typename T, typename A>
A copy_out(const std::vector<T>& v) {
  A a((py::ssize_t)v.size());
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

// Moments from a checkpoint: exactly the trainer's storage dtype (uint16 bf16 bits or
// float32: never a by-value conversion, which would turn bf16 bits into numbers) and shape
// (n,), else ValueError naming the tensor; no bare ensure() (it returns null for str arrays).
template <typename T>
py::array_t<T, py::array::c_style> moment_arg(const py::handle& obj, size_t n, const char* name,
                                              const char* dtype) {
  const std::string want = str_cat(dtype, " of shape (", n, ",)");
  const bool is_arr = py::isinstance<py::array>(obj);
  DSV3_CHECK(is_array_of<T>(obj, "Trainer.load", name), "[Trainer.load] ", name, " must be ",
             want, ", got ", dtype_name(obj), " ",
             is_arr ? shape_str(shape_of(py::reinterpret_borrow<py::array>(obj))) : "");
  auto a = py::array_t<T, py::array::c_style>::ensure(obj);
  if (!a) throw py::error_already_set();
  DSV3_CHECK(a.ndim() == 1 && (size_t)a.shape(0) == n, "[Trainer.load] ", name, " must be ",
             want, ", got shape ", shape_str(shape_of(a)));
  return a;
}

// Both moments checked before either is written (all or nothing).
template <typename T>
void set_moments(std::vector<T>& m, std::vector<T>& v, const py::handle& m_,
                 const py::handle& v_, const char* dtype) {
  auto a = moment_arg<T>(m_, m.size(), "optimizer_m", dtype);
  auto b = moment_arg<T>(v_, v.size(), "optimizer_v", dtype);
  std::copy(a.data(), a.data() + m.size(), m.begin());
  std::copy(b.data(), b.data() + v.size(), v.begin());
}

// (m, v) copies: uint16 bf16 bits or float32, in the slab's layout; full: in the full model's
// layout (collective over the EP group when the model is an expert shard; to_main: only
// world rank 0 receives them, the others get (None, None))
// (an unsharded Trainer copies under the GIL, as the other state reads do)
template <typename T, typename Arr>
py::tuple moment_pair(Trainer& t, const std::vector<T>& m, const std::vector<T>& v, bool full,
                      bool to_main) {
  if (!full || !t.sharded()) return py::make_tuple(copy_out<T, Arr>(m), copy_out<T, Arr>(v));
  std::vector<T> fm, fv;
  {
    py::gil_scoped_release nogil;
    fm = t.gather_full(m, to_main);
    fv = t.gather_full(v, to_main);
  }
  if (fm.empty() && !m.empty()) return py::make_tuple(py::none(), py::none());
  return py::make_tuple(copy_out<T, Arr>(fm), copy_out<T, Arr>(fv));
}
py::tuple moments_copy(Trainer& t, bool full = false, bool to_main = false) {
  t.check_model("Trainer");
  return t.bf16_moments() ? moment_pair<uint16_t, U16>(t, t.m16, t.v16, full, to_main)
                          : moment_pair<float, F32>(t, t.m32, t.v32, full, to_main);
}

// Moments of the slab's layout, or of the full layout for an expert shard (a checkpoint of
// any world size: this rank's experts are taken).
template <typename T>
void set_moments_any(Trainer& t, std::vector<T>& m, std::vector<T>& v, const py::handle& m_,
                     const py::handle& v_, const char* dtype) {
  const size_t full = (size_t)t.full_layout().total;
  const bool is_full = t.sharded() && py::isinstance<py::array>(m_) &&
                       (size_t)py::reinterpret_borrow<py::array>(m_).size() == full;
  if (!is_full) return set_moments(m, v, m_, v_, dtype);
  auto a = moment_arg<T>(m_, full, "optimizer_m", dtype);  // both checked before either is set
  auto b = moment_arg<T>(v_, full, "optimizer_v", dtype);
  t.from_full(a.data(), m);
  t.from_full(b.data(), v);
}

}  // namespace

void bind_train(py::module_& m) {
  py::class_<Trainer, std::shared_ptr<Trainer>>(m, "Trainer")
      .def(py::init([](std::shared_ptr<Model> md, bool bf16) {
             DSV3_CHECK(!md->is_resident(), "[Trainer] this model holds resident inference ",
                        "weights; training needs fp32 weights (load it with ",
                        "Model.from_pretrained(dir) to train)");
             return std::make_shared<Trainer>(*md, bf16);
           }),
           arg("model"), arg("bf16_moments"), py::keep_alive<1, 2>())
      .def_property("steps_done",
          [](const Trainer& t) {
            BusyGuard guard(t.busy, false, "Trainer");
            return t.steps_done;
          },
          [](Trainer& t, int64_t n) {
            BusyGuard guard(t.busy, true, "Trainer");
            t.steps_done = n;
          })
      .def("step", [](Trainer& t, py::handle batch, const py::dict& opts, int64_t expect_step) {
        const TrainStepOptions o = step_options(opts);
        I64 arr = i64(batch, "Trainer.step", "batch");
        DSV3_CHECK(arr.ndim() == 2, "[Trainer.step] batch must be an int array (B, T+1), got ",
                   "shape ", shape_str(shape_of(arr)));
        const int64_t B = arr.shape(0), N = arr.shape(1);
        const int64_t* p = arr.data();
        TrainStepStats st;
        {
          // the step writes the weights and the moments: it needs both alone (core/busy.h)
          BusyGuard tguard(t.busy, true, "Trainer");
          BusyGuard mguard(t.model().busy, true, "Model");
          // the caller's learning rate is that of step expect_step + 1: another thread's step
          // in between would make it stale
          if (t.steps_done != expect_step)
            throw std::runtime_error(str_cat("[Trainer] another thread stepped this Trainer (",
                                             expect_step, " -> ", t.steps_done,
                                             " steps) during this call; serialise the calls"));
          py::gil_scoped_release nogil;
          st = t.step(p, B, N, o);
        }
        py::dict d;
        d["loss"] = st.loss;
        d["main"] = st.main;
        d["mtp"] = st.mtp;
        d["balance"] = st.balance;
        d["grad_norm"] = st.grad_norm;
        d["allreduce_seconds"] = st.allreduce_seconds;
        d["allreduce_wait_seconds"] = st.allreduce_wait_seconds;
        d["dispatch_seconds"] = st.dispatch_seconds;
        d["finite"] = st.finite;
        const int64_t E = t.model().config().E;
        py::array_t<int64_t> load({(py::ssize_t)st.moe_blocks, (py::ssize_t)E});
        std::copy(st.expert_load.begin(), st.expert_load.end(), load.mutable_data());
        d["expert_load"] = load;
        return d;
      }, arg("batch"), arg("options"), arg("expect_step"))
      .def("moments", [](Trainer& t) {
        BusyGuard guard(t.busy, false, "Trainer");
        return moments_copy(t);
      })
      .def("entries", [](Trainer& t) {  // (name, offset, size) of each slab entry
        py::list out;
        for (const ParamEntry& e : t.model().layout().entries)
          out.append(py::make_tuple(e.name, e.offset, e.size));
        return out;
      })
      // (params by name, m, v, steps_done) from one moment: no step can run in between; in
      // the full model's layout (an expert shard gathers the others': every EP rank calls it;
      // to_main: for the checkpoint world rank 0 writes, the other ranks of a sharded Trainer
      // get None)
      .def("snapshot", [](Trainer& t, bool to_main) -> py::object {
        BusyGuard tguard(t.busy, false, "Trainer");
        BusyGuard mguard(t.model().busy, false, "Model");
        const Model& md = t.model();
        const py::tuple mv = moments_copy(t, true, to_main);
        if (!t.sharded())
          return py::make_tuple(named_copy(md.layout(), md.params().data(), false), mv[0],
                                mv[1], t.steps_done);
        std::vector<float> w;
        {
          py::gil_scoped_release nogil;
          w = t.gather_full(md.params(), to_main);
        }
        if (w.empty()) return py::none();
        return py::make_tuple(named_copy(t.full_layout(), w.data(), false), mv[0], mv[1],
                              t.steps_done);
      }, arg("to_main") = false)
      // the loss without gradients through the Trainer's expert-parallel context (an expert
      // shard's evaluation: every EP rank calls it with its tokens)
      .def("eval_loss", [](Trainer& t, py::handle tok, double alpha, double mtp_weight) {
        I64 arr = i64(tok, "Trainer.evaluate", "tokens");
        DSV3_CHECK(arr.ndim() == 2, "[Trainer.evaluate] tokens must be (B, T+1), got shape ",
                   shape_str(shape_of(arr)));
        LossParts lp;
        {
          BusyGuard tguard(t.busy, true, "Trainer");
          BusyGuard mguard(t.model().busy, false, "Model");
          py::gil_scoped_release nogil;
          lp = t.eval_loss(arr.data(), arr.shape(0), arr.shape(1), alpha, mtp_weight);
        }
        return loss_parts_dict(lp);
      }, arg("tokens"), arg("alpha"), arg("mtp_weight"))
      .def("set_moments", [](Trainer& t, py::handle m_, py::handle v_) {
        BusyGuard guard(t.busy, true, "Trainer");
        t.check_model("Trainer.set_moments");
        if (t.bf16_moments())
          set_moments_any(t, t.m16, t.v16, m_, v_, "uint16 (bf16 bits: moment_dtype is bfloat16)");
        else
          set_moments_any(t, t.m32, t.v32, m_, v_, "float32 (moment_dtype is float32)");
      }, arg("m"), arg("v"));

  // AdamW on one flat range (tests): w, m, v updated in place; bf16 moments as uint16 arrays.
  m.def("adamw_update", [](py::handle w_, const py::handle& g_, py::handle m_, py::handle v_,
                           float lr, float b1, float b2, float eps, float wd, int64_t step) {
    F32 w = inplace<float>(w_, "adamw", "w", "float32");
    F32 g = f32(g_, "adamw", "g");
    const bool bf16 = is_array_of<uint16_t>(m_, "adamw", "m");
    const int64_t n = (int64_t)w.size();
    AdamWParams p{lr, b1, b2, eps, wd, step};
    auto same_size = [&](const py::array& m, const py::array& v) {
      DSV3_CHECK((int64_t)g.size() == n && (int64_t)m.size() == n && (int64_t)v.size() == n,
                 "[adamw] w, g, m, v must have the same size");
    };
    if (bf16) {
      U16 m = inplace<uint16_t>(m_, "adamw", "m", "uint16 (bf16 bits)");
      U16 v = inplace<uint16_t>(v_, "adamw", "v", "uint16 (bf16 bits)");
      same_size(m, v);
      adamw_update_bf16(w.mutable_data(), g.data(), m.mutable_data(), v.mutable_data(), n, p);
    } else {
      F32 m = inplace<float>(m_, "adamw", "m", "float32");
      F32 v = inplace<float>(v_, "adamw", "v", "float32");
      same_size(m, v);
      adamw_update(w.mutable_data(), g.data(), m.mutable_data(), v.mutable_data(), n, p);
    }
  }, arg("w"), arg("g"), arg("m"), arg("v"), arg("lr"), arg("beta1"), arg("beta2"), arg("eps"),
     arg("weight_decay"), arg("step"));
}

}  // namespace dsv3
