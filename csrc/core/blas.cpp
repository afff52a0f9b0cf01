#include "core/blas.h"

#include <cblas.h>

#include <climits>

#include "core/check.h"

namespace dsv3 {

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
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, (int)M, (int)N, (int)K, alpha, A, (int)lda, B,
              (int)ldb, beta, C, (int)ldc);
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

void blas_set_num_threads(int n) { openblas_set_num_threads(n); }

std::string blas_info() {
  const int mode = openblas_get_parallel();
  const char* par = mode == 0 ? "sequential" : mode == 1 ? "pthreads" : "openmp";
  return str_cat("OpenBLAS (", openblas_get_config(), "; threading ", par, ", ",
                 openblas_get_num_threads(), " threads; core ", openblas_get_corename(), ")");
}

}  // namespace dsv3
