// The environment variables the engine reads, all here (each read once, on first use):
//   DSV3_SMALL_GEMM=0       the attention core's products always use BLAS (small_gemm.h)
//   DSV3_KEEP_ATTN_PROBS=0  the attention backward always recomputes the probabilities
//   DSV3_MOE_DECODE_PASS=0  decoding's MoE runs expert by expert, not as one GEMV pass over
//                           all of the step's experts (kernels/moe.cpp; the same bits)
//   DSV3_MALLOC_TUNING=0    malloc's policy is left alone (memory.h); so is it when the user
//                           set any MALLOC_* variable or a glibc.malloc GLIBC_TUNABLES entry
// They switch between paths that agree to fp32 rounding (tests and A/B measurements), never
// the semantics. The others are read where they act (each documented there):
//   DSV3_ISA            caps the SIMD / low-precision tiers (core/lowp_gemm.cpp,
//                       kernels/wlinear.cpp; =avx512-gfni selects wlinear's GFNI fp8 GEMV)
//   DSV3_AMX_EMULATE=1  the AMX tier with emulated tile instructions (core/lowp_gemm_amx.cpp)
//   DSV3_SPIN_US        the pool's spin budget (core/parallel.cpp)
//   DSV3_BLAS_COPIES    the BLAS copies policy (core/blas_copies.cpp)
//   DSV3_MPI_THREAD, DSV3_MPI_MAX_MESSAGE, DSV3_TEST_FAIL_GATHER_RANK
//                       MPI's thread level, the all-to-all piece size, a test's injected
//                       failure (dist/mpi_comm.cpp, model/train_shard.cpp)
#pragma once

namespace dsv3 {

struct EnvSettings {
  bool small_gemm = true;
  bool keep_attn_probs = true;
  bool moe_decode_pass = true;
  bool malloc_tuning = true;
  bool user_malloc_policy = false;
};

const EnvSettings& env_settings();

}  // namespace dsv3
