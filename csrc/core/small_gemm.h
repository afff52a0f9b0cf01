// Single-threaded products for the attention core, where a BLAS call costs too much around
// too little work: every call is one block of one head (one of M, K is a 32-query block, the
// other up to the key count; N is a head dim or the key count), and OpenBLAS spends a third
// of such a call packing its operands and zeroing C.
//
//   C[M,N] = alpha * op(A) @ B           (accumulate = false)
//   C[M,N] += alpha * op(A) @ B          (accumulate = true)
//   op(A) = A [M,K] (row stride lda), or with trans_a A stored [K,M] (row stride lda);
//   B [K,N] row-major, row stride ldb, unit column stride (callers pack a B^T once per head).
//
// On CPUs with AVX-512F a register-tiled kernel runs: a block of C (8 x 32, or for op(A) = A^T
// with N a multiple of 96 or 64, 4 x 96 or 6 x 64) stays in registers while K runs; A is read
// by broadcasts straight from memory (either layout), B a row at a time (a B panel reused by
// many row tiles is first copied to contiguous rows); C is written once. Each C element is the
// sum over k in order with one FMA per step, so results are deterministic (they differ from
// OpenBLAS's by rounding). Elsewhere, or with DSV3_SMALL_GEMM=0, the call goes to sgemm.
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
