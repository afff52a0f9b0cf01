// The avx2 tier of wlinear (AVX2 + FMA + F16C, 8 lanes): wlinear_tier_body.inc under a target
// attribute, reached only when the CPU has these extensions (wlinear.cpp checks).
#include "kernels/wlinear_tiers.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define WL_ISA 2
#define WL_TARGET __attribute__((target("avx2,fma,f16c")))
#define WL_KERNELS kernels_avx2
#include "kernels/wlinear_tier_body.inc"
#else
dsv3::wlin::TierKernels dsv3::wlin::kernels_avx2() { return {}; }
#endif
