// Internal to the low-precision GEMM (lowp_gemm.cpp, lowp_gemm_amx.cpp): the packed layout both
// microkernels read, and the AMX-BF16 kernel's entry points. Not for other callers: they use
// core/lowp_gemm.h.
#pragma once
#include <cstdint>
#include <string>

#include "core/lowp_gemm.h"

namespace dsv3::lowp {

// The packed layout (bf16_pack_a / bf16_pack_b):
//   A  [packed_rows(M)][packed_k(K)] bf16, row-major; rows >= M and columns >= K are zero
//   B  [ceil(N/kNR)][packed_k(K)/2][kNR][2] bf16 pairs; columns >= N and k >= K are zero
// K is padded to whole AMX steps (32 k) and A's rows to whole pairs of 16-row tiles, so the
// AMX kernel reads every tile whole and in bounds, and the pad adds exact zeros; the
// avx512-bf16 kernel reads only k < K and rows < M.
constexpr int64_t kNR = 64;     // columns per B panel
constexpr int64_t kKStep = 32;  // K padding: one tdpbf16ps step (16 bf16 pairs)
constexpr int64_t kMPad = 32;   // A row padding: the AMX kernel's 2 x 16-row tiles
inline int64_t packed_k(int64_t K) { return (K + kKStep - 1) / kKStep * kKStep; }
inline int64_t packed_rows(int64_t M) { return (M + kMPad - 1) / kMPad * kMPad; }

// How the AMX tier runs: on the tile unit, or (tests only) with the tile instructions emulated
// in C++ on a CPU without AMX.
enum class AmxMode { off, hardware, emulated };

// Decides the mode once per process: DSV3_AMX_EMULATE=1 gives `emulated`; otherwise a CPU with
// AMX-BF16 whose kernel grants the tile data permission (Linux: arch_prctl
// ARCH_REQ_XCOMP_PERM for XTILEDATA) and passes a self-check (an exact small GEMM on the tiles
// vs a float64 loop) gives `hardware`. `why` says what was found, and is empty when the CPU
// simply has no AMX (nothing to report).
AmxMode amx_detect(std::string& why);

// Whether a product of M rows with these scales takes the AMX kernel: M >= 32 (below that the
// vdpbf16ps kernel's 6-row tiles waste less), and scaled promotion chunks that are whole steps.
bool amx_takes(int64_t M, int64_t K, const LowpScales* scales);

// bf16_gemm_packed on the AMX kernel (same contract; the caller checked amx_takes).
void amx_gemm(float* C, int64_t ldc, const uint16_t* A, int64_t M, const Bf16PackedB& B,
              const LowpScales* scales, bool accumulate, AmxMode mode);

}  // namespace dsv3::lowp
