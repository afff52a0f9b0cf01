// The one BLAS wrapper: every matrix product in dsv3 goes through here.
// Row-major throughout: C[M,N] = alpha * op(A) @ op(B) + beta * C, where op(A) is [M,K] and
// op(B) is [K,N]; trans_a means A is stored [K,M], trans_b means B is stored [N,K].
//
// BLAS itself always runs single-threaded (blas_init fixes its thread count at 1). A product
// called outside a parallel region with M*N*K >= 2^18 is cut into row blocks (M >= N) or column
// blocks of 16 across dsv3's pool (core/parallel.h); inside a region it runs whole on the
// calling thread. Each element of C is computed by the same single-threaded kernel whichever
// OpenBLAS build is loaded (OpenMP, pthreads or serial: Debian's three share one source), so
// results are identical across the three for a given thread count. The serial build is not
// thread-safe: each thread calls a private copy of it (core/blas_copies.h).
#pragma once
#include <cstdint>
#include <string>

namespace dsv3 {

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
           const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
           int64_t ldc);

// Straightforward triple loop with fp32 accumulation in k order: the naive reference kept
// beside the fast products (tests/test_small_gemm.py checks it against float64 and the
// attention core's small_gemm against it, through _core._small_gemm(naive=True)).
void sgemm_naive(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                 const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                 int64_t ldc);

void blas_init();            // idempotent; sets the loaded OpenBLAS to one thread
std::string blas_info();     // e.g. "OpenBLAS (OpenBLAS 0.3.21 ... ; threading openmp; core ...)"
std::string blas_variant();  // the loaded build's threading: "openmp", "pthreads" or "serial"
std::string blas_calls();    // how dsv3 calls the loaded build (build_info "blas_threads")
std::string blas_loaded();   // the file the loader resolved the BLAS symbols to
const char* blas_source();   // "system" or "pypi" (scipy-openblas32), fixed at build time

}  // namespace dsv3
