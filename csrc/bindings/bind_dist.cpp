// dsv3._core parallel groups (dist/comm.h): the thin adapter dsv3.distributed builds on.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "bindings/convert.h"
#include "core/busy.h"
#include "dist/comm.h"
#include "model/train.h"

namespace dsv3 {

namespace py = pybind11;
using py::arg;

void bind_dist(py::module_& m) {
  m.def("mpi_available", &mpi_available);
  // 0 single, 1 funneled, 2 serialized, 3 multiple: the level MPI provides (0 before MPI is
  // initialised; 3 in a build without MPI, where nothing communicates)
  m.def("mpi_thread_level", &mpi_thread_level);
  m.def("mpi_library_version", &mpi_library_version);
  m.def("mpi_abort", [](int code) { mpi_abort(code); }, arg("code"));
  m.def("mpi_world_size", [] {  // initialises MPI when needed
    DSV3_CHECK(mpi_available(), "[dsv3.distributed] this dsv3 was built without MPI");
    py::gil_scoped_release nogil;
    return mpi_world()->size();
  });
  m.def("parse_parallel_layout", [](const std::string& s) {
    const ParallelLayout l = parse_parallel_layout(s);
    return py::make_tuple(l.dp, l.ep);
  }, arg("layout"));

  py::class_<ParallelGroups, std::shared_ptr<ParallelGroups>>(m, "ParallelGroups")
      .def(py::init([](int dp, int ep) {
             if (!mpi_available())
               throw std::runtime_error(
                   "[dsv3.distributed] this dsv3 was built without MPI: install an MPI (e.g. "
                   "apt-get install libopenmpi-dev openmpi-bin) and reinstall dsv3 (pip install .)");
             ParallelLayout l;
             l.dp = dp;
             l.ep = ep;
             std::shared_ptr<Comm> w;
             {
               py::gil_scoped_release nogil;
               w = mpi_world();
             }
             return std::make_shared<ParallelGroups>(make_groups(w, l));
           }),
           arg("dp"), arg("ep"))
      .def_property_readonly("rank", [](const ParallelGroups& g) { return g.world->rank(); })
      .def_property_readonly("size", [](const ParallelGroups& g) { return g.world->size(); })
      .def_property_readonly("dp", [](const ParallelGroups& g) { return g.layout.dp; })
      .def_property_readonly("ep", [](const ParallelGroups& g) { return g.layout.ep; })
      .def_property_readonly("dp_index", &ParallelGroups::dp_index)
      .def_property_readonly("ep_index", &ParallelGroups::ep_index)
      .def("barrier", [](ParallelGroups& g) {
        py::gil_scoped_release nogil;
        g.world->barrier();
      })
      // world sum of a float64 / float32 / int64 array, in place (tests, small statistics)
      .def("allreduce_sum", [](ParallelGroups& g, py::array a) {
        DSV3_CHECK(a.flags() & py::array::c_style, "[allreduce_sum] x must be C-contiguous");
        DSV3_CHECK(a.writeable(), "[allreduce_sum] x must be writeable");
        py::gil_scoped_release nogil;
        if (a.dtype().is(py::dtype::of<double>()))
          g.world->allreduce_sum((double*)a.mutable_data(), a.size());
        else if (a.dtype().is(py::dtype::of<float>()))
          g.world->allreduce_sum((float*)a.mutable_data(), a.size());
        else if (a.dtype().is(py::dtype::of<int64_t>()))
          g.world->allreduce_sum((int64_t*)a.mutable_data(), a.size());
        else
          throw std::invalid_argument("[allreduce_sum] x must be float64, float32 or int64");
      }, arg("x"))
      .def("stats", [](const ParallelGroups& g) {  // communication statistics of this rank
        py::dict d;
        // the world's all-reduces and the DP group's (an expert shard's expert gradients)
        const bool dp = g.layout.ep > 1 && g.dp_group;
        d["allreduce_bytes"] = g.world->bytes_allreduce + (dp ? g.dp_group->bytes_allreduce : 0);
        d["allreduce_seconds"] =
            g.world->seconds_allreduce + (dp ? g.dp_group->seconds_allreduce : 0);
        const Comm& e = *g.ep_group;
        d["alltoall_bytes"] = e.bytes_alltoall;
        d["alltoall_seconds"] = e.seconds_alltoall;
        return d;
      });

  m.def("trainer_set_parallel", [](Trainer& t, std::shared_ptr<ParallelGroups> g,
                                   bool fp8_dispatch) {
    BusyGuard guard(t.busy, true, "Trainer");
    BusyGuard mguard(t.model().busy, true, "Model");  // ep > 1 may shard the model's slab
    t.set_parallel(std::move(g), fp8_dispatch);
  }, arg("trainer"), arg("groups").none(true), arg("fp8_dispatch") = false);
  // tests: the last step's gradient in the full model's layout (an expert shard gathers the
  // other EP ranks' experts: every rank calls it)
  m.def("trainer_last_gradients", [](Trainer& t) {
    BusyGuard guard(t.busy, false, "Trainer");
    std::vector<float> g;
    if (t.sharded()) {
      py::gil_scoped_release nogil;
      g = t.gather_full(t.last_gradients());
    }
    const std::vector<float>& src = t.sharded() ? g : t.last_gradients();
    py::array_t<float> out((py::ssize_t)src.size());
    std::copy(src.begin(), src.end(), out.mutable_data());
    return out;
  }, arg("trainer"));
  // {name: weight} of the full model (an expert shard gathers: every rank calls it; to_main:
  // only world rank 0 receives it, the other ranks of a sharded Trainer get None)
  m.def("trainer_full_state", [](Trainer& t, bool to_main) -> py::object {
    BusyGuard guard(t.busy, false, "Trainer");
    BusyGuard mguard(t.model().busy, false, "Model");
    if (!t.sharded())
      return py_glue::named_copy(t.model().layout(), t.model().params().data(), false);
    std::vector<float> w;
    {
      py::gil_scoped_release nogil;
      w = t.gather_full(t.model().params(), to_main);
    }
    if (w.empty()) return py::none();
    return py_glue::named_copy(t.full_layout(), w.data(), false);
  }, arg("trainer"), arg("to_main") = false);
  m.def("trainer_ep_stats", [](Trainer& t) {  // expert-parallel statistics since the start
    BusyGuard guard(t.busy, false, "Trainer");
    const ExpertParallel& e = t.expert_parallel();
    py::dict d;
    d["tokens"] = e.tokens;
    d["rank_visits"] = e.rank_visits;
    d["dispatch_bytes"] = e.dispatch_bytes;
    d["combine_bytes"] = e.combine_bytes;
    return d;
  }, arg("trainer"));
}

}  // namespace dsv3
