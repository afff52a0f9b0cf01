// The avx512-gfni tier of wlinear: the avx512 tier (wlinear_tier_body.inc) whose fp8 GEMV
// decodes 64 E4M3 codes at a time with two GFNI bit-matrix transforms and four unpacks
// (WL_GFNI; the body's legend), reached only when the CPU has AVX-512F/BW/VL and GFNI
// (wlinear.cpp checks).
#include "kernels/wlinear_tiers.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define WL_ISA 512
#define WL_GFNI 1
#define WL_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c,gfni")))
#define WL_KERNELS kernels_avx512_gfni
#include "kernels/wlinear_tier_body.inc"
#else
dsv3::wlin::TierKernels dsv3::wlin::kernels_avx512_gfni() { return {}; }
#endif
