// The one BLAS wrapper: every matrix product in dsv3 goes through here.
// Row-major throughout: C[M,N] = alpha * op(A) @ op(B) + beta * C, where op(A) is [M,K] and
// op(B) is [K,N]; trans_a means A is stored [K,M], trans_b means B is stored [N,K].
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

void blas_set_num_threads(int n);
std::string blas_info();  // e.g. "OpenBLAS 0.3.21 ... (openmp)"

}  // namespace dsv3
