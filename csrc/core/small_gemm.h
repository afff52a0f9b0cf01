// Single-threaded products for the attention core, where a BLAS call costs too much around
// too little work: every call is one block of one head (M, K ~ 64, N <= a few hundred), and
// OpenBLAS spends a third of such a call packing its operands and zeroing C.
//
//   C[M,N] = alpha * op(A) @ B           (accumulate = false)
//   C[M,N] += alpha * op(A) @ B          (accumulate = true)
//   op(A) = A [M,K] (row stride lda), or with trans_a A stored [K,M] (row stride lda);
//   B [K,N] row-major, row stride ldb, unit column stride (callers pack a B^T once per head).
//
// On CPUs with AVX-512F a register-tiled kernel runs: an 8 x 32 block of C stays in 16
// registers while K runs, A is read by broadcasts straight from memory (either layout), B a row
// at a time; no packing, no separate pass over C. Each C element is the sum over k in order
// with one FMA per step, so results are deterministic (they differ from OpenBLAS's by
// rounding). Elsewhere the call goes to sgemm.
#pragma once
#include <cstdint>

namespace dsv3 {

void small_gemm(bool trans_a, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                int64_t lda, const float* B, int64_t ldb, bool accumulate, float* C,
                int64_t ldc);

bool small_gemm_vectorized();  // the AVX-512 kernel is in use (reported by build_info)

// dst[k, j] = src[j * lds + k] for j < n, k < K (dst row stride ldd): a B^T for small_gemm.
void transpose_rows(float* dst, int64_t ldd, const float* src, int64_t lds, int64_t n,
                    int64_t K);

}  // namespace dsv3
