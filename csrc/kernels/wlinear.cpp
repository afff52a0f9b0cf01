// wlinear.h: argument checks, the tier choice, the decode / prefill split and the prefill and
// embedding-row paths. The per-tier kernels are in wlinear_tier_body.inc (wlinear_tiers.h).
//
// Legend:  tier    avx512 | avx2 | scalar: the best the CPU offers, capped by DSV3_ISA
//                  (avx512* / amx* -> avx512, avx2 -> avx2, anything else -> scalar);
//                  avx512-gfni only when DSV3_ISA=avx512-gfni asks for it (and the CPU has
//                  GFNI): its fp8 GEMV is faster at R = 1 but slower at R >= 2 on Zen 4 (one
//                  tier serves every R, so that a row's bits do not depend on R)
//          decode  R <= kMaxGemvR (bf16: R <= kBf16GemvR, measured faster there): GEMV
//                  streaming every weight byte once from memory for all R rows: super groups
//                  of kSuperRows weight rows split over the pool, each visited by the x row
//                  blocks (<= 4 rows) in turn (wlinear_tiers.h)
//          prefill larger R: tasks (x row block of kRB rows) x (weight panel). Vector
//                  tiers (avx512*, avx2): the panel's weights dequantized and transposed into
//                  register-tile order and multiplied there (TierKernels::prefill_panel,
//                  wlinear_tier_prefill.inc), panels balanced over the threads (prefill_panels);
//                  scalar: panels of kPB rows dequantized kKC columns at a time into a
//                  thread-local fp32 buffer and single-threaded sgemm on it (fp32 weights:
//                  sgemm on the weight rows in place, whole K)
//
// Exactness of prefill against the definition in wlinear.h: the dequantized weight
// e4m3(code) * sinv is rounded to fp32 once per element (the definition instead multiplies
// each block's sum by sinv); bf16 / fp32 weights are exact. Both are within the fp32
// reassociation bound gamma_{K+2} * sum_k |x w| of the linear of the dequantized weight. On
// the vector tiers each y element of a prefill is one FMA chain over k in order, so its bits
// do not depend on R, the panel split or the thread count (only on the path, GEMV or not).
// (Prefill therefore needs every e4m3(code) * sinv finite in fp32; decode does not: its block
// sums meet sinv only after the sum.)
// Decode and prefill differ in summation order, so y depends on R through the path taken
// (R <= kMaxGemvR, or kBf16GemvR for bf16, or not). Within decode a row's summation order
// does not depend on R or on its register block (wlinear_tier_body.inc); for fp8 on the
// vector tiers its bits can depend on the other rows only through the prescale exponent a
// (taken over the whole input), i.e. only when products fall in the subnormal range. For
// fixed (R, K, O, tier) every y element is computed by one thread in a fixed order whatever
// the thread count: the groups, tasks, panels and K chunks are fixed by the shape (the vector
// tiers' prefill panels follow the thread count, but its sums do not depend on them).
#include "kernels/wlinear.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/blas.h"
#include "core/check.h"
#include "core/parallel.h"
#include "kernels/wlinear_tiers.h"

namespace dsv3 {

namespace {
using wlin::kBk;
using wlin::Tier;
using wlin::TierKernels;

constexpr int64_t kRB = 256;   // prefill: x rows per task
constexpr int64_t kPB = 256;   // prefill: weight rows per panel
constexpr int64_t kKC = 512;   // prefill: K columns dequantized at a time (kPB x kKC = 512 KiB; x is
                               // packed by sgemm once per panel, so wide panels pack it less often)

struct TierChoice {
  Tier tier = Tier::scalar;
  TierKernels k{};
  std::string reason;
};

TierChoice choose() {
  TierChoice c;
  int cap = 2;
  std::string note;
  if (const char* isa = std::getenv("DSV3_ISA"); isa && *isa) {
    const std::string s(isa);
    note = " (DSV3_ISA=" + s + ")";
    cap = s == "avx512-gfni"                                   ? 3
          : s.rfind("avx512", 0) == 0 || s.rfind("amx", 0) == 0 ? 2
          : s == "avx2"                                        ? 1
                                                               : 0;
  }
  bool has512 = false, has2 = false, gfni = false;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  gfni = __builtin_cpu_supports("gfni");
  has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#endif
  if (has512 && gfni && cap >= 3) {
    c = {Tier::avx512_gfni, wlin::kernels_avx512_gfni(),
         "avx512-gfni: AVX-512F/BW/VL, 16 lanes, fp8 codes decoded with GFNI" + note};
  } else if (has512 && cap >= 2) {
    const std::string why = cap >= 3 ? " (the CPU has no GFNI)" : "";
    c = {Tier::avx512, wlin::kernels_avx512(), "avx512: AVX-512F/BW/VL, 16 lanes" + why + note};
  } else if ((has512 || has2) && cap >= 1) {
    c = {Tier::avx2, wlin::kernels_avx2(), "avx2: AVX2 + FMA + F16C, 8 lanes" + note};
  } else {
    const std::string why = cap < 2 ? "forced" + note : "the CPU has no AVX2 + FMA + F16C";
    c = {Tier::scalar, wlin::kernels_scalar(), "scalar: " + why};
  }
  if (!c.k.gemv) c = {Tier::scalar, wlin::kernels_scalar(), "scalar: tier not built"};
  return c;
}

const TierChoice& tier() {
  static const TierChoice t = choose();
  return t;
}

void check_view(const WeightView& w, const char* op) {
  if (!w.data || w.O < 1 || w.K < 1 || (w.fmt == WeightFormat::fp8_e4m3 && !w.scale_inv))
    throw std::invalid_argument(std::string("[") + op + "] weight view is empty or lacks its "
                                "scales (fp8 needs scale_inv)");
}

// fp8 on a prescaled tier: x[R,K] times 2^a, a = min(120, 126 - e) for max|x| in [2^(e-1),
// 2^e) (0 when max|x| >= 2^126 or is inf; NaN entries are skipped: they propagate anyway), in
// rows of *ldx; perm: rows padded with zeros to whole groups of 64 and each group reordered
// (wlinear_tiers.h, perm_index). Returns the unscale 2^(120 - a) (wlinear_tier_body.inc).
float prescale_x(std::vector<float>& out, int64_t* ldx, const float* x, int64_t R, int64_t K,
                 bool perm) {
  const int64_t n = R * K;
  float mx = 0.f;
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, std::fabs(x[i]));
  int e = 0;
  if (mx > 0.f) std::frexp(mx, &e);  // inf: e is unspecified; clamped below
  int a = 120;
  if (!std::isfinite(mx)) a = 0;
  else if (mx > 0.f) a = std::max(0, std::min(120, 126 - e));
  const float s = std::ldexp(1.f, a);
  if (!perm) {
    *ldx = K;
    out.resize((size_t)n);
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] * s;
  } else {
    *ldx = (K + wlin::kPermGroup - 1) / wlin::kPermGroup * wlin::kPermGroup;
    out.assign((size_t)(R * *ldx), 0.f);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t k = 0; k < K; ++k) out[r * *ldx + wlin::perm_index(k)] = x[r * K + k] * s;
  }
  return std::ldexp(1.f, 120 - a);
}

// The GEMVs of several decode-shaped jobs (R <= kMaxGemvR; bf16 kBf16GemvR) as one
// parallel_for over the concatenation of their super groups; a super group's y rows depend
// only on its own job, so the chunking changes no result.
void decode(const WlinearJob* jobs, int64_t n) {
  const TierKernels& k = tier().k;
  std::vector<float> unscale((size_t)n, 1.f);
  std::vector<std::vector<float>> xs((size_t)n);
  std::vector<const float*> x((size_t)n);
  std::vector<int64_t> ldx((size_t)n), first((size_t)n + 1, 0);  // first super group of each job
  int64_t bytes = 0;
  for (int64_t j = 0; j < n; ++j) {
    const WlinearJob& jb = jobs[j];
    x[j] = jb.x;
    ldx[j] = jb.w.K;
    if (jb.w.fmt == WeightFormat::fp8_e4m3 && k.prescaled) {
      unscale[j] = prescale_x(xs[j], &ldx[j], jb.x, jb.R, jb.w.K, k.fp8_perm);
      x[j] = xs[j].data();
    }
    first[j + 1] = first[j] + (jb.w.O + wlin::kSuperRows - 1) / wlin::kSuperRows;
    bytes += weight_format_bytes(jb.w.fmt, jb.w.O, jb.w.K);
  }
  const int64_t supers = first[n];
  if (supers == 0) return;
  // a chunk worth a thread: >= 64 KiB of weights
  const int64_t grain = std::max<int64_t>(1, 65536 * supers / std::max<int64_t>(1, bytes));
  parallel_for(supers, grain, [&](int64_t s0, int64_t s1) {
    int64_t j = std::upper_bound(first.begin(), first.end(), s0) - first.begin() - 1;
    for (int64_t s = s0; s < s1; ++j) {
      const int64_t e = std::min(s1, first[j + 1]);
      if (e > s) {
        const WlinearJob& jb = jobs[j];
        k.gemv(jb.y, x[j], ldx[j], jb.w, unscale[j], jb.R, s - first[j], e - first[j]);
      }
      s = std::max(s, e);
    }
  });
}

// The vector tiers' prefill (TierKernels::prefill_panel): a y element's bits do not depend on
// the split, so it is chosen for balance: the O rows in kPanelRows-row blocks spread evenly
// over np panels of <= kPanelBlocks blocks, np a multiple of the thread count where there are
// blocks enough (e.g. O = 576, 2 threads: 4 panels of 2, 2, 2, 3 blocks instead of 256, 256,
// 64 rows)
void prefill_panels(float* y, const float* x, const WeightView& w, int64_t R) {
  using wlin::kPanelBlocks;
  constexpr int64_t kBlock = wlin::kPanelRows;
  const int64_t O = w.O, K = w.K, T = num_threads();
  const int64_t nb = (O + kBlock - 1) / kBlock;
  const int64_t np = std::min(nb, ((nb + kPanelBlocks - 1) / kPanelBlocks + T - 1) / T * T);
  const int64_t nrb = (R + kRB - 1) / kRB;
  const TierKernels& tk = tier().k;
  parallel_for(nrb * np, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = (t / np) * kRB, rn = std::min(kRB, R - r0), p = t % np;
      // panel p: blocks [p * nb / np, (p + 1) * nb / np)
      const int64_t o0 = p * nb / np * kBlock, o1 = std::min(O, (p + 1) * nb / np * kBlock);
      tk.prefill_panel(y + r0 * O + o0, O, x + r0 * K, K, rn, w, o0, o1 - o0);
    }
  });
}

void prefill(float* y, const float* x, const WeightView& w, int64_t R) {
  if (tier().k.prefill_panel) return prefill_panels(y, x, w, R);
  const int64_t O = w.O, K = w.K;
  const int64_t nrb = (R + kRB - 1) / kRB, np = (O + kPB - 1) / kPB;
  const TierKernels& tk = tier().k;
  parallel_for(nrb * np, 1, [&](int64_t t0, int64_t t1) {
    static thread_local std::vector<float> buf;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = (t / np) * kRB, o0 = (t % np) * kPB;
      const int64_t rn = std::min(kRB, R - r0), on = std::min(kPB, O - o0);
      float* yt = y + r0 * O + o0;
      const float* xt = x + r0 * K;
      if (w.fmt == WeightFormat::fp32) {
        sgemm(false, true, rn, on, K, 1.f, xt, K, (const float*)w.data + o0 * K, K, 0.f, yt, O);
        continue;
      }
      for (int64_t k0 = 0; k0 < K; k0 += kKC) {
        const int64_t kn = std::min(kKC, K - k0);
        buf.resize((size_t)(kPB * kKC));
        for (int64_t i = 0; i < on; ++i) tk.dequant(buf.data() + i * kn, w, o0 + i, k0, kn);
        sgemm(false, true, rn, on, kn, 1.f, xt + k0, K, buf.data(), kn, k0 ? 1.f : 0.f, yt, O);
      }
    }
  });
}
}  // namespace

bool fp8_codes_nan_free(const uint8_t* codes, int64_t n) {
  std::atomic<bool> ok{true};
  parallel_for(n, 1 << 20, [&](int64_t a, int64_t b) {
    if (tier().k.has_nan(codes + a, b - a)) ok.store(false);  // the GEMV's own check
  });
  return ok.load();
}

const char* weight_format_name(WeightFormat f) {
  switch (f) {
    case WeightFormat::fp32: return "fp32";
    case WeightFormat::bf16: return "bf16";
    case WeightFormat::fp8_e4m3: return "fp8";
  }
  return "?";
}

WeightFormat parse_weight_format(const char* s) {
  const std::string v = s ? s : "";
  if (v == "fp32") return WeightFormat::fp32;
  if (v == "bf16") return WeightFormat::bf16;
  if (v == "fp8") return WeightFormat::fp8_e4m3;
  throw std::invalid_argument("weight format must be 'fp32', 'bf16' or 'fp8', got '" + v + "'");
}

int64_t weight_format_bytes(WeightFormat f, int64_t O, int64_t K) {
  switch (f) {
    case WeightFormat::fp32: return 4 * O * K;
    case WeightFormat::bf16: return 2 * O * K;
    case WeightFormat::fp8_e4m3:
      return O * K + 4 * ((O + kBk - 1) / kBk) * ((K + kBk - 1) / kBk);
  }
  return 0;
}

const char* wlinear_tier_name() {
  switch (tier().tier) {
    case Tier::avx512_gfni: return "avx512-gfni";
    case Tier::avx512: return "avx512";
    case Tier::avx2: return "avx2";
    case Tier::scalar: return "scalar";
  }
  return "?";
}
const std::string& wlinear_tier_reason() { return tier().reason; }
bool wlinear_prefill_tiles() { return tier().k.prefill_panel != nullptr; }

namespace {
// wlinear_forward(_many): checks, then the GEMV jobs in one pass and the prefill ones in turn
void run_jobs(const WlinearJob* jobs, int64_t n, const char* op) {
  std::vector<WlinearJob> gemv;
  for (int64_t j = 0; j < n; ++j) {
    const WlinearJob& jb = jobs[j];
    check_view(jb.w, op);
    if (jb.R < 0) throw std::invalid_argument(std::string("[") + op + "] R must be >= 0");
    if (jb.R == 0) continue;
    if (jb.R <= (jb.w.fmt == WeightFormat::bf16 ? wlin::kBf16GemvR : wlin::kMaxGemvR))
      gemv.push_back(jb);
    else
      prefill(jb.y, jb.x, jb.w, jb.R);
  }
  decode(gemv.data(), (int64_t)gemv.size());
}
}  // namespace

void wlinear_forward(float* y, const float* x, const WeightView& w, int64_t R) {
  const WlinearJob job{y, x, w, R};
  run_jobs(&job, 1, "wlinear_forward");
}

void wlinear_forward_many(const WlinearJob* jobs, int64_t n) {
  run_jobs(jobs, n, "wlinear_forward_many");
}

void wlinear_rows(float* out, const int64_t* ids, const WeightView& w, int64_t R) {
  check_view(w, "wlinear_rows");
  const int64_t K = w.K;
  for (int64_t r = 0; r < R; ++r)
    if (ids[r] < 0 || ids[r] >= w.O) throw std::out_of_range("[wlinear_rows] id out of range");
  const TierKernels& tk = tier().k;
  const int64_t grain = std::max<int64_t>(1, 16384 / K);
  parallel_for(R, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) tk.dequant(out + r * K, w, ids[r], 0, K);
  });
}

void wlinear_rows_product(float* y, int64_t ldy, const float* x, int64_t ldx,
                          const WeightView& w, int64_t r0, int64_t n, int64_t R) {
  check_view(w, "wlinear_rows_product");
  if (r0 < 0 || n < 0 || r0 > w.O - n)  // (not r0 + n > O: no overflow)
    throw std::out_of_range(str_cat("[wlinear_rows_product] rows r0 .. r0 + n must lie in "
                                    "[0, O = ", w.O, "], got r0 = ", r0, ", n = ", n));
  if (n == 0)
    for (int64_t r = 0; r < R; ++r) std::fill_n(y + r * ldy, w.K, 0.f);
  else if (R > 0)
    tier().k.rows_product(y, ldy, x, ldx, w, r0, n, R);
}

}  // namespace dsv3
