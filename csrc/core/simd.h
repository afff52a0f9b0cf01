// Run-time SIMD dispatch for hot elementwise loops without -march=native: a function marked
// DSV3_SIMD_CLONES is compiled for AVX-512F, x86-64-v3 (AVX2 + FMA; plain AVX2 before GCC 12)
// and baseline x86-64, and the loader picks the best one for the CPU (GCC/Clang function
// multiversioning). Elsewhere it is a no-op. Contraction into FMA stays off
// (-ffp-contract=off); the explicit FMAs of mathfn.h are exact in every clone (an instruction,
// or libm's fmaf in the baseline clone), so the clones round identically.
// The clones name instruction sets or ISA levels, never CPU models ("arch=haswell"): a model
// clone is chosen by __builtin_cpu_is, which fails on CPUs newer than the compiler's model table
// (and on many VMs), silently falling back to the baseline clone. "arch=x86-64-v3" is chosen
// by __builtin_cpu_supports, on features.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(DSV3_NO_CLONES) && \
    !defined(__SANITIZE_ADDRESS__)
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
// x86-64-v3 = AVX2 + FMA + BMI (an ISA level, dispatched on CPU features like avx512f)
#define DSV3_SIMD_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "avx512f")))
#else
#define DSV3_SIMD_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#endif
#else
#define DSV3_SIMD_CLONES
#endif

namespace dsv3 {
const char* simd_flags();  // the instruction sets this CPU offers to the clones
}
