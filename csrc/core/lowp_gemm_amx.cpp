// The AMX-BF16 microkernel of the low-precision GEMM (core/lowp_gemm.h): the same packed
// operands and the same scaled / unscaled semantics as the avx512-bf16 kernel, on the tile unit
// (tdpbf16ps), for products of 32 rows or more.
//
// Legend:  tile = 16 rows x 64 bytes (8 tile registers, all configured 16 x 64)
//          step = 32 k (16 bf16 pairs: one tdpbf16ps)   P promotion chunk (scaled mode)
//   tmm0..3  C: a 32 x 32 fp32 block as 2 x 2 tiles, C(r, h) = tmm(2r + h), 16 x 16 each
//   tmm4,5   A(r): rows [16r, 16r + 16) of the block, one step of k (packed A in place,
//            row stride 2 Kp bytes)
//   tmm6,7   B(h): columns [16h, 16h + 16) of the 32: 16 pairs x 16 columns x 2 bf16, i.e. the
//            packed B panel read in place (pair row q at panel + 256 q bytes: the VNNI layout
//            tdpbf16ps wants)
//   per step: C(r, h) += A(r) . B(h) for r, h in {0, 1}   (4 tdpbf16ps on 2 KiB of A, 2 of B)
// Task = (kMA rows of A) x (one 64-column B panel). Its fp32 results live in `acc` (kMA x 64,
// row stride 256 bytes; it starts as C's block when accumulating) and go to C at the end:
//   unscaled  per chunk of kKC along K, the C tiles are loaded from acc (zeroed on the first
//             chunk unless accumulating), accumulate the chunk's steps, are stored back;
//   scaled    per chunk of P, the C tiles start from zero, accumulate the chunk, are stored to
//             `part`, and are promoted with AVX-512: acc = acc + (part * sa) * sb (the first
//             chunk writes (part * sa) * sb unless accumulating): the order of the avx512-bf16
//             kernel, so the two tiers differ only in the order of the additions in a chunk.
// The loop over chunks is outside the loop over 32 x 32 blocks, so a chunk's B sub-panel
// (16 KiB) and A rows (16 KiB) stay in L1 for the whole task.
// Numerics of tdpbf16ps (Intel SDM): bf16 products accumulated in fp32 with RNE; denormal
// inputs (operands and accumulator) count as zero, denormal results are flushed; MXCSR is
// ignored. As vdpbf16ps: core/lowp_gemm.h's denormal and NaN notes hold for both tiers.
// Emulation (DSV3_AMX_EMULATE=1, tests): the same task code with the tile instructions run in
// C++ (struct Emu) -- checks the layout, padding, promotion and edges on any CPU with the
// avx512-bf16 tier; only the instructions' own arithmetic is then not the hardware's.
#include "core/lowp_gemm_amx.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "core/bf16.h"
#include "core/parallel.h"

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define DSV3_AMX_X86 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace dsv3::lowp {

namespace {

constexpr int64_t kMA = 64;   // rows of A per task (2 blocks of 32)
constexpr int64_t kKC = 128;  // unscaled mode: K per pass (4 steps)
constexpr int64_t kAccLd = kNR;  // acc row stride (floats)

#if DSV3_AMX_X86

// ---- the tile instructions -----------------------------------------------------------------------
// Hardware: inline assembly (tile registers are named in the instruction, so each op is
// instantiated per register). "memory" clobbers order the tile loads / stores with the C++
// accesses to acc and part.
#define DSV3_TILE_CASES(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
struct Hw {
  static void config() {
    alignas(64) unsigned char cfg[64] = {};
    cfg[0] = 1;  // palette 1; start_row 0
    for (int t = 0; t < 8; ++t) {
      const uint16_t colsb = 64;
      std::memcpy(cfg + 16 + 2 * t, &colsb, 2);
      cfg[48 + t] = 16;
    }
    __asm__ volatile("ldtilecfg %0" ::"m"(cfg) : "memory");
  }
  static void release() { __asm__ volatile("tilerelease" ::: "memory"); }
  template <int T>
  static void load(const void* p, int64_t stride) {
    static_assert(T >= 0 && T < 8, "tile register");
#define DSV3_TL(n)                                                                   \
  if constexpr (T == n)                                                              \
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #n ::"r"(p), "r"((long)stride) : "memory");
    DSV3_TILE_CASES(DSV3_TL)
#undef DSV3_TL
  }
  template <int T>
  static void store(void* p, int64_t stride) {
    static_assert(T >= 0 && T < 8, "tile register");
#define DSV3_TS(n)                                                                   \
  if constexpr (T == n)                                                              \
    __asm__ volatile("tilestored %%tmm" #n ", (%0,%1,1)" ::"r"(p), "r"((long)stride) : "memory");
    DSV3_TILE_CASES(DSV3_TS)
#undef DSV3_TS
  }
  template <int T>
  static void zero() {
    static_assert(T >= 0 && T < 8, "tile register");
#define DSV3_TZ(n) \
  if constexpr (T == n) __asm__ volatile("tilezero %%tmm" #n ::);
    DSV3_TILE_CASES(DSV3_TZ)
#undef DSV3_TZ
  }
  template <int Cr, int Ar, int Br>  // Cr in 0..3, Ar in 4..5, Br in 6..7
  static void dp() {
    static_assert(Cr == 2 * (Ar - 4) + (Br - 6) && Ar >= 4 && Ar < 6 && Br >= 6 && Br < 8,
                  "C(r, h) = tmm(2r + h) += A(r) = tmm(4 + r) . B(h) = tmm(6 + h)");
#define DSV3_TDP(c, a, b) \
  if constexpr (Cr == c && Ar == a && Br == b) \
    __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::);
    DSV3_TDP(0, 4, 6) DSV3_TDP(1, 4, 7) DSV3_TDP(2, 5, 6) DSV3_TDP(3, 5, 7)
#undef DSV3_TDP
  }
};
#undef DSV3_TILE_CASES

// Emulation: eight 1 KiB registers per thread and the Intrinsics Guide's pseudo-code for
// tdpbf16ps (pair by pair, fp32 additions in k order, DAZ on every input, FTZ on every
// result). The SDM describes another order (per instruction an even and an odd partial sum,
// added together, then to the accumulator), so emulated and hardware results agree within the
// fp32 reassociation bound, and bit for bit only where every sum is exact (the self-check).
struct Emu {
  struct Regs {
    alignas(64) unsigned char t[8][1024];
  };
  static Regs& regs() {
    thread_local Regs r;
    return r;
  }
  static void config() { std::memset(regs().t, 0, sizeof(Regs::t)); }
  static void release() {}
  template <int T>
  static void load(const void* p, int64_t stride) {
    for (int r = 0; r < 16; ++r)
      std::memcpy(regs().t[T] + 64 * r, static_cast<const unsigned char*>(p) + r * stride, 64);
  }
  template <int T>
  static void store(void* p, int64_t stride) {
    for (int r = 0; r < 16; ++r)
      std::memcpy(static_cast<unsigned char*>(p) + r * stride, regs().t[T] + 64 * r, 64);
  }
  template <int T>
  static void zero() { std::memset(regs().t[T], 0, 1024); }
  static float flush(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.f, x) : x; }
  static float widen(uint16_t h) { return flush(bf16_decode(h)); }
  template <int Cr, int Ar, int Br>
  static void dp() {
    float c[16][16];
    uint16_t a[16][32], b[16][32];
    std::memcpy(c, regs().t[Cr], 1024);
    std::memcpy(a, regs().t[Ar], 1024);
    std::memcpy(b, regs().t[Br], 1024);
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 16; ++n) c[m][n] = flush(c[m][n]);
    for (int m = 0; m < 16; ++m)
      for (int k = 0; k < 16; ++k)
        for (int n = 0; n < 16; ++n)
          for (int h = 0; h < 2; ++h)
            c[m][n] = flush(c[m][n] + flush(widen(a[m][2 * k + h]) * widen(b[k][2 * n + h])));
    std::memcpy(regs().t[Cr], c, 1024);
  }
};

// ---- promotion, input and output of a task (AVX-512) ----------------------------------------------
#define DSV3_AVX512 __attribute__((target("avx512f")))

// acc[i][0:32] (= or +=) (part[i][0:32] * sa[i]) * sb[0:32] for i < 32; part row stride 32
DSV3_AVX512 void promote_block(float* acc, const float* part, const float* sa, const float* sb,
                               bool overwrite) {
  const __m512 b0 = _mm512_loadu_ps(sb), b1 = _mm512_loadu_ps(sb + 16);
  for (int i = 0; i < 32; ++i) {
    const __m512 s = _mm512_set1_ps(sa[i]);
    float* dst = acc + i * kAccLd;
    __m512 x0 = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(part + 32 * i), s), b0);
    __m512 x1 = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(part + 32 * i + 16), s), b1);
    if (!overwrite) {
      x0 = _mm512_add_ps(_mm512_loadu_ps(dst), x0);
      x1 = _mm512_add_ps(_mm512_loadu_ps(dst + 16), x1);
    }
    _mm512_storeu_ps(dst, x0);
    _mm512_storeu_ps(dst + 16, x1);
  }
}

// ---- one task ----------------------------------------------------------------------------------------
// A task's buffers: acc (kMA x 64) and part (32 x 32), on the stack of the chunk's lambda
// (not thread_local: a TLS lookup is a call, and tile registers are caller-saved in the psABI,
// so none may run while the tiles hold data).
struct Scratch {
  float* acc;
  float* part;
};

// Rows [i0, i0 + rows) of C (rows <= kMA; A holds packed_rows(M) rows, so whole 32-row blocks
// are read) x panel j.
template <class T>
void task(float* C, int64_t ldc, const uint16_t* A, int64_t M, int64_t i0, const Bf16PackedB& B,
          int64_t j, const LowpScales* s, bool accumulate, const Scratch& scratch) {
  float* const acc = scratch.acc;
  float* const part = scratch.part;
  const int64_t N = B.N, K = B.K, Kp = packed_k(K), lda = 2 * Kp;  // lda in bytes
  const int64_t rows = std::min(kMA, M - i0), blocks = (rows + 31) / 32;
  const int64_t n0 = j * kNR, w = std::min(kNR, N - n0), halves = w > 32 ? 2 : 1;
  const uint16_t* panel = B.data.data() + j * (Kp / 2) * kNR * 2;
  if (accumulate)
    for (int64_t i = 0; i < rows; ++i)
      std::memcpy(acc + i * kAccLd, C + (i0 + i) * ldc + n0, (size_t)w * 4);
  const int64_t chunk = s ? std::min(s->P, K) : kKC;
  float sa[kMA], sb[kNR];
  for (int64_t k0 = 0; k0 < K; k0 += chunk) {
    const int64_t st0 = k0 / kKStep, st1 = (std::min(K, k0 + chunk) + kKStep - 1) / kKStep;
    const bool first = k0 == 0 && !accumulate;
    if (s) {
      for (int64_t l = 0; l < kNR; ++l) {
        const int64_t n = std::min(n0 + l, N - 1);
        sb[l] = s->b[(n / s->b_rows) * s->b_ld + k0 / s->b_cols];
      }
      for (int64_t i = 0; i < 32 * blocks; ++i) {
        const int64_t m = std::min(i0 + i, M - 1);
        sa[i] = s->a[(m / s->a_rows) * s->a_ld + k0 / s->a_cols];
      }
    }
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const uint16_t* a0 = A + (i0 + 32 * blk) * Kp;
      const uint16_t* a1 = a0 + 16 * Kp;
      for (int64_t h = 0; h < halves; ++h) {
        float* out = acc + 32 * blk * kAccLd + 32 * h;
        if (s || first) {
          T::template zero<0>(); T::template zero<1>(); T::template zero<2>(); T::template zero<3>();
        } else {
          T::template load<0>(out, 4 * kAccLd);
          T::template load<1>(out + 16, 4 * kAccLd);
          T::template load<2>(out + 16 * kAccLd, 4 * kAccLd);
          T::template load<3>(out + 16 * kAccLd + 16, 4 * kAccLd);
        }
        const uint16_t* b = panel + 64 * h;  // columns 32h.. of each pair row (2 words each)
        for (int64_t st = st0; st < st1; ++st) {
          T::template load<4>(a0 + st * kKStep, lda);
          T::template load<6>(b + st * (kKStep / 2) * kNR * 2, 4 * kNR);
          T::template load<5>(a1 + st * kKStep, lda);
          T::template load<7>(b + st * (kKStep / 2) * kNR * 2 + 32, 4 * kNR);
          T::template dp<0, 4, 6>();
          T::template dp<1, 4, 7>();
          T::template dp<2, 5, 6>();
          T::template dp<3, 5, 7>();
        }
        if (s) {
          T::template store<0>(part, 128);
          T::template store<1>(part + 16, 128);
          T::template store<2>(part + 16 * 32, 128);
          T::template store<3>(part + 16 * 32 + 16, 128);
          promote_block(out, part, sa + 32 * blk, sb + 32 * h, first);
        } else {
          T::template store<0>(out, 4 * kAccLd);
          T::template store<1>(out + 16, 4 * kAccLd);
          T::template store<2>(out + 16 * kAccLd, 4 * kAccLd);
          T::template store<3>(out + 16 * kAccLd + 16, 4 * kAccLd);
        }
      }
    }
  }
  for (int64_t i = 0; i < rows; ++i)
    std::memcpy(C + (i0 + i) * ldc + n0, acc + i * kAccLd, (size_t)w * 4);
}

template <class T>
void run(float* C, int64_t ldc, const uint16_t* A, int64_t M, const Bf16PackedB& B,
         const LowpScales* s, bool accumulate) {
  const int64_t mb = (M + kMA - 1) / kMA, panels = (B.N + kNR - 1) / kNR;
  // row block outer, panel inner: a thread's consecutive tasks share one A block
  parallel_for(mb * panels, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) float acc[kMA * kAccLd];  // 16 KiB
    alignas(64) float part[32 * 32];      // 4 KiB
    const Scratch scratch{acc, part};
    T::config();  // per chunk of tasks: whichever thread runs it has its tiles configured
    for (int64_t t = t0; t < t1; ++t)
      task<T>(C, ldc, A, M, (t / panels) * kMA, B, t % panels, s, accumulate, scratch);
    T::release();
  });
}

// ---- detection -----------------------------------------------------------------------------------
bool request_tile_permission(std::string& why) {
  constexpr long kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023;
  constexpr long kXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXtiledata) != 0) {
    why = "the kernel refused AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM failed; Linux >= 5.16 "
          "needed)";
    return false;
  }
  unsigned long mask = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &mask) != 0 || !(mask & (1ul << kXtiledata))) {
    why = "the kernel did not grant AMX tile data (ARCH_GET_XCOMP_PERM)";
    return false;
  }
  return true;
}

// An exact product on the tiles: small integers (every sum exact in fp32), pow2 scales, a
// ragged K and N, the scaled, unscaled and accumulating modes, against a double loop.
bool self_check(AmxMode mode) {
  const int64_t M = 64, N = 80, K = 150, P = 64;
  std::vector<float> a(M * K), b(N * K), sa(M * 3), sb(3), C(M * N), want(M * N);
  for (int64_t i = 0; i < M * K; ++i) a[i] = (float)((i * 7 + 3) % 7 - 3);
  for (int64_t i = 0; i < N * K; ++i) b[i] = (float)((i * 5 + 1) % 5 - 2);
  for (int64_t i = 0; i < M * 3; ++i) sa[i] = std::ldexp(1.f, (int)(i % 9) - 4);
  for (int64_t i = 0; i < 3; ++i) sb[i] = std::ldexp(1.f, (int)i - 1);
  Bf16Buf pa;
  Bf16PackedB pb;
  bf16_pack_a(pa, Bf16Src{a.data(), nullptr, nullptr, false, K, 1}, M, K);
  bf16_pack_b(pb, Bf16Src{b.data(), nullptr, nullptr, false, K, 1}, N, K);
  LowpScales s;
  s.a = sa.data(); s.a_rows = 1; s.a_cols = P; s.a_ld = 3;
  s.b = sb.data(); s.b_rows = 128; s.b_cols = P; s.b_ld = 3; s.P = P;
  for (int variant = 0; variant < 3; ++variant) {  // unscaled, accumulate, scaled
    const LowpScales* sc = variant == 2 ? &s : nullptr;
    for (int64_t i = 0; i < M * N; ++i) C[i] = variant == 1 ? (float)(i % 11 - 5) : 1e30f;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double t = variant == 1 ? C[m * N + n] : 0.0;
        for (int64_t c = 0; c * P < K; ++c) {
          double part = 0;
          for (int64_t k = c * P; k < std::min(K, (c + 1) * P); ++k) part += (double)a[m * K + k] * b[n * K + k];
          t += sc ? part * sa[m * 3 + c] * sb[c] : part;
        }
        want[m * N + n] = (float)t;
      }
    if (mode == AmxMode::hardware) run<Hw>(C.data(), N, pa.data(), M, pb, sc, variant == 1);
    else run<Emu>(C.data(), N, pa.data(), M, pb, sc, variant == 1);
    if (std::memcmp(C.data(), want.data(), C.size() * 4) != 0) return false;
  }
  return true;
}

#endif  // DSV3_AMX_X86

}  // namespace

AmxMode amx_detect(std::string& why) {
#if DSV3_AMX_X86
  const char* emu = std::getenv("DSV3_AMX_EMULATE");
  AmxMode mode = AmxMode::off;
  if (emu && std::strcmp(emu, "1") == 0) {
    mode = AmxMode::emulated;
    why = "tile instructions emulated in C++ (DSV3_AMX_EMULATE=1; for tests, slow)";
  } else {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-bf16") || !__builtin_cpu_supports("amx-tile")) {
      // libgcc also checks that the OS enables the tile state (XCR0); CPUID.(7,0):EDX bit 22
      // is AMX-BF16 itself. A CPU without it is the usual case: nothing to report.
      unsigned a = 0, b = 0, c = 0, d = 0;
      const bool cpu_has = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1u);
      why = cpu_has ? "the OS does not enable the AMX tile state (XCR0)" : "";
      return AmxMode::off;
    }
    if (!request_tile_permission(why)) return AmxMode::off;
    mode = AmxMode::hardware;
    why = "AMX tiles (tdpbf16ps) for products of >= 32 rows, vdpbf16ps below";
  }
  if (!self_check(mode)) {
    why = "AMX-BF16 present but its self-check failed (an exact small GEMM gave other values); "
          "please report this CPU";
    return AmxMode::off;
  }
  return mode;
#else
  why = "not an x86-64 Linux build";
  return AmxMode::off;
#endif
}

bool amx_takes(int64_t M, int64_t K, const LowpScales* s) {
  return M >= 32 && (!s || s->P >= K || s->P % kKStep == 0);
}

void amx_gemm(float* C, int64_t ldc, const uint16_t* A, int64_t M, const Bf16PackedB& B,
              const LowpScales* s, bool accumulate, AmxMode mode) {
#if DSV3_AMX_X86
  if (mode == AmxMode::hardware) return run<Hw>(C, ldc, A, M, B, s, accumulate);
  if (mode == AmxMode::emulated) return run<Emu>(C, ldc, A, M, B, s, accumulate);
#endif
  (void)C, (void)ldc, (void)A, (void)M, (void)B, (void)s, (void)accumulate, (void)mode;
}

}  // namespace dsv3::lowp
