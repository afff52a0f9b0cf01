// The environment variables the engine reads, all here (each read once, on first use):
//   DSV3_SMALL_GEMM=0       the attention core's products always use BLAS (small_gemm.h)
//   DSV3_KEEP_ATTN_PROBS=0  the attention backward always recomputes the probabilities
//   DSV3_MALLOC_TUNING=0    malloc's policy is left alone (memory.h); so is it when the user
//                           set any MALLOC_* variable or a glibc.malloc GLIBC_TUNABLES entry
// They switch between paths that agree to fp32 rounding (tests and A/B measurements), never
// the semantics.
#pragma once

namespace dsv3 {

struct EnvSettings {
  bool small_gemm = true;
  bool keep_attn_probs = true;
  bool malloc_tuning = true;
  bool user_malloc_policy = false;
};

const EnvSettings& env_settings();

}  // namespace dsv3
