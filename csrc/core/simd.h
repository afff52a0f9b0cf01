// Run-time SIMD dispatch for hot elementwise loops without -march=native: a function marked
// DSV3_SIMD_CLONES is compiled for AVX-512F, AVX2 and baseline x86-64, and the loader picks
// the best one for the CPU (GCC/Clang function multiversioning). Elsewhere it is a no-op.
// Contraction into FMA stays off (-ffp-contract=off), so the clones round identically.
// The clones name ISA features, not "arch=" CPU models: GCC's resolver matches arch= clones
// with __builtin_cpu_is, so e.g. a Sapphire Rapids or Zen CPU would get the baseline clone.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(DSV3_NO_CLONES) && \
    !defined(__SANITIZE_ADDRESS__)
#define DSV3_SIMD_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define DSV3_SIMD_CLONES
#endif

namespace dsv3 {
const char* simd_flags();  // the instruction sets this CPU offers to the clones
}
