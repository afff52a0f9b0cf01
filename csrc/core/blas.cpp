#include "core/blas.h"

#include <cblas.h>
#include <dlfcn.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <climits>
#include <cstdlib>

#include "core/blas_copies.h"
#include "core/check.h"
#include "core/parallel.h"

// scipy-openblas32 (PyPI) prefixes every symbol with scipy_ so that it never clashes with a
// system OpenBLAS in the same process; its cblas.h declares the prefixed names.
#ifdef DSV3_BLAS_SCIPY
#define DSV3_BLAS(name) scipy_##name
#else
#define DSV3_BLAS(name) name
#endif

namespace dsv3 {

namespace {

constexpr int64_t kSplitWork = 1 << 18;   // M*N*K from which a product is split
constexpr int64_t kPieceWork = 1 << 17;   // the least M*N*K of one piece
constexpr int64_t kBlock = 16;            // rows or columns per unit of a split

// Debian's serial build (libopenblas0-serial, SINGLE_THREADED without USE_LOCKING) is not
// safe to call from two threads at once: its buffer allocator races and results change from
// run to run (measured: the first training loss differs between runs at 2 threads). With it,
// each thread calls a private copy of the library (core/blas_copies.h), or, where copies
// cannot be made, the calls are serialised. Products are cut into the same pieces either way,
// so the results equal the other builds'.
bool serial_build() {
  static const bool serial = DSV3_BLAS(openblas_get_parallel)() == 0;
  return serial;
}

#define DSV3_STR2(x) #x
#define DSV3_STR(x) DSV3_STR2(x)

// The OpenMP build re-reads omp_get_max_threads() of the calling thread at every call and
// threads the call that wide, whatever openblas_set_num_threads said; a pool worker's (or any
// new thread's) OpenMP ICV is the process default, so without this each piece would start an
// OpenMP team of its own and oversubscribe the cores (measured: the training step 2x slower
// than with the pthreads build). The ICV is 1 for the call and restored after it, so other
// OpenMP code on the caller's thread (numpy's BLAS, PyTorch) keeps its own setting.
// Without OpenMP at build time (Apple clang) the OpenMP build of OpenBLAS brings the runtime
// with it, so the two calls are looked up in the process instead.
struct OneOpenmpThread {
  using Get = int (*)();
  using Set = void (*)(int);
  int prev = 0;
  static Get get() {
#ifdef _OPENMP
    static const Get fn = &omp_get_max_threads;
#else
    static const Get fn = reinterpret_cast<Get>(dlsym(RTLD_DEFAULT, "omp_get_max_threads"));
#endif
    return fn;
  }
  static Set set() {
#ifdef _OPENMP
    static const Set fn = &omp_set_num_threads;
#else
    static const Set fn = reinterpret_cast<Set>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
#endif
    return fn;
  }
  OneOpenmpThread() {
    static const bool openmp = DSV3_BLAS(openblas_get_parallel)() == 2 && get() && set();
    if (openmp && (prev = get()()) != 1) set()(1);
  }
  ~OneOpenmpThread() {
    if (prev > 1) set()(prev);
  }
};

void call(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
          int64_t ldc) {
  const CBLAS_TRANSPOSE ta = trans_a ? CblasTrans : CblasNoTrans;
  const CBLAS_TRANSPOSE tb = trans_b ? CblasTrans : CblasNoTrans;
  if (serial_build()) {
    BlasLease lease;
    lease.sgemm()(CblasRowMajor, ta, tb, (int)M, (int)N, (int)K, alpha, A, (int)lda, B, (int)ldb,
                  beta, C, (int)ldc);
    return;
  }
  OneOpenmpThread one;
  DSV3_BLAS(cblas_sgemm)(CblasRowMajor, ta, tb, (int)M, (int)N,
                         (int)K, alpha, A, (int)lda, B, (int)ldb, beta, C, (int)ldc);
}

}  // namespace

void blas_init() {
  static const bool once = [] {
    {
      // The OpenMP build's openblas_set_num_threads also sets the calling thread's OpenMP
      // ICV (omp_set_num_threads): the guard gives the importing thread its own back.
      OneOpenmpThread keep_callers_setting;
      DSV3_BLAS(openblas_set_num_threads)(1);
    }
    if (serial_build())
      blas_copies_init(&DSV3_BLAS(cblas_sgemm), blas_loaded(),
                       DSV3_STR(DSV3_BLAS(cblas_sgemm)));
    return true;
  }();
  (void)once;
}

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
           const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
           int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  DSV3_ASSERT(M < INT_MAX && N < INT_MAX && K < INT_MAX && lda < INT_MAX && ldb < INT_MAX &&
                  ldc < INT_MAX,
              "sgemm dimensions exceed the 32-bit BLAS interface");
  if (K <= 0) {  // BLAS leaves C alone when K == 0 only if beta == 1; make it explicit
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.f ? 0.f : beta * C[i * ldc + j];
    return;
  }
  blas_init();
  if (in_parallel() || num_threads() <= 1 || M * N * K < kSplitWork) {
    call(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  const bool rows = M >= N;  // split the longer side of C
  const int64_t side = rows ? M : N, other = rows ? N : M;
  const int64_t units = (side + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, kPieceWork / (kBlock * other * K));
  parallel_for(units, grain, [&](int64_t u0, int64_t u1) {
    const int64_t i0 = u0 * kBlock, i1 = std::min(side, u1 * kBlock);
    if (rows)
      call(trans_a, trans_b, i1 - i0, N, K, alpha, trans_a ? A + i0 : A + i0 * lda, lda, B, ldb,
           beta, C + i0 * ldc, ldc);
    else
      call(trans_a, trans_b, M, i1 - i0, K, alpha, A, lda, trans_b ? B + i0 * ldb : B + i0, ldb,
           beta, C + i0, ldc);
  });
}

void sgemm_naive(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                 int64_t ldc) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const float a = trans_a ? A[k * lda + i] : A[i * lda + k];
        const float b = trans_b ? B[j * ldb + k] : B[k * ldb + j];
        acc += a * b;
      }
      float& c = C[i * ldc + j];
      c = alpha * acc + (beta == 0.f ? 0.f : beta * c);
    }
}

std::string blas_variant() {
  const int mode = DSV3_BLAS(openblas_get_parallel)();
  return mode == 0 ? "serial" : mode == 1 ? "pthreads" : "openmp";
}

std::string blas_calls() {
  const std::string split = "1 thread per call; products split across dsv3's pool";
  if (!serial_build()) return split;
  blas_init();
  const std::string& error = blas_copies_error();
  if (!error.empty())
    return "serialised: the serial build is not thread-safe and no private copy could be made (" +
           error + ")";
  return split + "; the serial build is not thread-safe: each thread calls a private copy (" +
         std::to_string(blas_copies_loaded()) + " loaded so far)";
}

std::string blas_info() {
  return str_cat("OpenBLAS (", DSV3_BLAS(openblas_get_config)(), "; threading ", blas_variant(),
                 "; core ", DSV3_BLAS(openblas_get_corename)(), ")");
}

std::string blas_loaded() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&DSV3_BLAS(cblas_sgemm)), &info) && info.dli_fname) {
    char real[PATH_MAX];  // through the alternatives' symlinks to the build's own file
    return realpath(info.dli_fname, real) ? std::string(real) : std::string(info.dli_fname);
  }
  return "unknown";
}

const char* blas_source() {
#ifdef DSV3_BLAS_SCIPY
  return "pypi";
#else
  return "system";
#endif
}

}  // namespace dsv3
