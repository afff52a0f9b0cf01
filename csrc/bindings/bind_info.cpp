// dsv3._core build and threading info.
#include "dist/comm.h"
#include "bindings/arrays.h"
#include "bindings/convert.h"
#include "core/blas.h"
#include "core/lowp_gemm.h"
#include "core/memory.h"
#include "core/parallel.h"
#include "core/simd.h"
#include "core/small_gemm.h"
#include "kernels/wlinear.h"

namespace dsv3 {

namespace py = pybind11;

void bind_info(py::module_& m) {
  tune_malloc();  // at import: see core/memory.h (DSV3_MALLOC_TUNING=0 opts out)
  blas_init();    // BLAS on one thread: dsv3's pool splits the products (core/blas.h)
  m.def("build_info", [] {
    py::dict d;
    d["compiler"] = DSV3_COMPILER;
    d["cxx_standard"] = (long)__cplusplus;
    d["blas"] = blas_info();
    d["blas_library"] = DSV3_BLAS_PATH;      // linked at build time
    d["blas_loaded"] = blas_loaded();        // resolved at run time (LD_LIBRARY_PATH, alternatives)
    d["blas_variant"] = blas_variant();      // openmp | pthreads | serial
    d["blas_source"] = blas_source();        // system | pypi
    d["blas_threads"] = blas_calls();
    d["threading"] = "dsv3 pool";
    d["threads_default"] = thread_default_source();
    d["spin_us"] = spin_us();
    d["spin_budget_us"] = spin_budget_us();
#ifdef _OPENMP
    d["openmp"] = (long)_OPENMP;  // the OpenMP version built against (0: built without)
#else
    d["openmp"] = 0L;
#endif
    d["num_threads"] = num_threads();
    d["simd"] = simd_flags();
    d["malloc_tuned"] = malloc_tuned();
    d["attention_gemm"] = small_gemm_vectorized() ? "avx512" : "blas";
    py::dict lowp;  // the low-precision GEMM tier (core/lowp_gemm.h) and why
    lowp["tier"] = lowp_tier_name(lowp_tier());
    lowp["reason"] = lowp_tier_reason();
    d["lowp"] = lowp;
    // MPI for dsv3.distributed: the library built against ("" = built without MPI)
    d["mpi"] = mpi_available() ? mpi_library_version() : std::string();
    d["wlinear_tier"] = wlinear_tier_name();  // resident-weight linears (kernels/wlinear.h)
    d["wlinear_tier_reason"] = wlinear_tier_reason();
#ifdef __OPTIMIZE__
    d["optimized"] = true;
#else
    d["optimized"] = false;
#endif
#if defined(__SANITIZE_ADDRESS__)
    d["sanitizers"] = "address,undefined";
#else
    d["sanitizers"] = "none";
#endif
    return d;
  });
  m.def("get_num_threads", &num_threads);
  m.def("set_num_threads", [](py::handle n) {
    set_num_threads(py_glue::int_arg(n, "set_num_threads", "n"));
  }, py::arg("n"));
}

}  // namespace dsv3
