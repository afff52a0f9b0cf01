// The scalar tier of wlinear (one lane, baseline instructions): wlinear_tier_body.inc without a
// target attribute. Always available; DSV3_ISA=scalar forces it.
#include "kernels/wlinear_tiers.h"

#define WL_ISA 0
#define WL_TARGET
#define WL_KERNELS kernels_scalar
#include "kernels/wlinear_tier_body.inc"
