#include "core/simd.h"

namespace dsv3 {

const char* simd_flags() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return "x86-64 (avx512f clones active)";
  if (__builtin_cpu_supports("avx2")) return "x86-64 (avx2 clones active)";
  return "x86-64 (sse2 baseline)";
#elif defined(__aarch64__)
  return "aarch64 (neon baseline)";
#else
  return "generic";
#endif
}

}  // namespace dsv3
