#include "kernels/moe.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "core/blas.h"
#include "core/check.h"
#include "core/env.h"
#include "core/mathfn.h"
#include "core/memory.h"
#include "core/parallel.h"
#include "core/simd.h"
#include "kernels/balance.h"
#include "kernels/moe_ep.h"
#include "kernels/nn.h"
#include "kernels/precision.h"

namespace dsv3 {

namespace {

// The expert scheduling policy (see moe.h). Items holding more than 1/threads of all rows run
// alone, one after the other, with threaded BLAS. The others are claimed by the threads from a
// shared counter, largest first, and run with single-threaded BLAS. Every item writes only its
// own outputs and its arithmetic does not depend on the thread that runs it, so dynamic
// claiming keeps the results bit-identical from run to run (the counter hands out work; no
// float is reduced across threads) while adapting to threads that are slowed down by other
// processes.
void for_each_expert(const std::vector<int64_t>& rows, const std::function<void(int64_t)>& fn) {
  const int64_t n = (int64_t)rows.size();
  int64_t total = 0;
  for (int64_t r : rows) total += r;
  const int nt = in_parallel() ? 1 : num_threads();
  std::vector<int64_t> light;
  for (int64_t i = 0; i < n; ++i) {
    if (rows[i] == 0) continue;
    if (nt > 1 && rows[i] * nt > total)
      fn(i);
    else
      light.push_back(i);
  }
  std::stable_sort(light.begin(), light.end(),
                   [&](int64_t a, int64_t b) { return rows[a] > rows[b]; });
  if (nt <= 1 || light.size() <= 1) {
    for (int64_t i : light) fn(i);
    return;
  }
  std::atomic<size_t> next{0};
  parallel_for(std::min<int64_t>(nt, (int64_t)light.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (size_t q = next++; q < light.size(); q = next++) fn(light[q]);
  });
}

// Rows of `n` floats that live in ws->rows when a workspace is given (kept between calls:
// fresh buffers of this size are page-faulted in on every call), else in `local`.
float* workspace_rows(MoeWorkspace* ws, Buf& local, int64_t n) {
  if (!ws) {
    local = buf(n);
    return local.get();
  }
  if ((int64_t)ws->rows.size() < n) ws->rows.resize((size_t)n);
  return ws->rows.data();
}

void gather_rows(float* dst, const float* src, const int64_t* slots, int64_t n, int64_t K,
                 int64_t D) {
  for (int64_t p = 0; p < n; ++p)
    std::memcpy(dst + p * D, src + (slots[p] / K) * D, sizeof(float) * D);
}

// y[j] += w * x[j]
DSV3_SIMD_CLONES void axpy_row(float* __restrict__ y, float w, const float* __restrict__ x,
                               int64_t D) {
  for (int64_t j = 0; j < D; ++j) y[j] += w * x[j];
}

// One dispatched row of the expert backward, fused so that silu is evaluated once:
//   h = silu(g) u ;  dh = w a ;  dg = dh u s (1 + g (1 - s)) ;  du = dh silu(g)
// Returns <a, h> (= dL/dw of the routing weight that scales this row's output).
DSV3_SIMD_CLONES float swiglu_backward_row(float* __restrict__ h, float* __restrict__ dg,
                                           float* __restrict__ du, const float* __restrict__ a,
                                           const float* __restrict__ g,
                                           const float* __restrict__ u, float w, int64_t W) {
  for (int64_t j = 0; j < W; ++j) {
    const float s = sigmoid_f32(g[j]), silu = g[j] * s;
    h[j] = silu * u[j];
    const float dh = w * a[j];
    dg[j] = dh * u[j] * (s * (1.f + g[j] * (1.f - s)));
    du[j] = dh * silu;
  }
  return dot_lanes(a, h, W);
}

// Decoding's few tokens: every expert's product is a GEMV (linear_forward's path for R <=
// kLinearGemvRows), so instead of one expert per thread (5 items over 2 threads leave one idle
// for a fifth of the layer) all gate / up GEMVs of the step run as one parallel pass over their
// weights, then all down GEMVs: the same kernel per matrix, hence the same bits.
bool decode_shaped(const MoeActs& a, int64_t E, int64_t T, const LinearMode& prec) {
  if (!env_settings().moe_decode_pass) return false;  // DSV3_MOE_DECODE_PASS=0 (tests, A/B)
  if (prec != GemmPrecision::fp32 || in_parallel() || T > kLinearGemvRows) return false;
  for (int64_t e = 0; e < E; ++e)
    if (a.expert_count[e] > kLinearGemvRows) return false;
  return true;
}

void run_experts_gemv(float* ye, float* y_shared, const MoeActs& a, const float* x, int64_t K,
                      int64_t E, const SwiGluParams* experts, const SwiGluParams* shared,
                      int64_t T, int64_t D, int64_t F, int64_t S) {
  std::vector<int64_t> items;  // routed experts with rows, then E for the shared one
  int64_t rows = 0;
  for (int64_t e = 0; e < E; ++e)
    if (a.expert_count[e] > 0) items.push_back(e), rows += a.expert_count[e];
  if (shared && T > 0) items.push_back(E);
  Buf xs = buf(rows * D), h = buf(rows * F + (shared ? T * S : 0));
  std::vector<WlinearJob> up, down;
  std::vector<float*> hs;
  for (int64_t e : items) {
    const bool sh = e == E;
    const SwiGluParams& w = sh ? *shared : experts[e];
    const int64_t o = sh ? 0 : a.expert_offset[e], n = sh ? T : a.expert_count[e];
    const int64_t W = sh ? S : F;
    check_weight_shape(w.gate_proj, W, D, "linear"), check_weight_shape(w.up_proj, W, D, "linear");
    check_weight_shape(w.down_proj, D, W, "linear");
    const float* xe = x;
    if (!sh) {
      gather_rows(xs.get() + o * D, x, a.dispatch_slot + o, n, K, D);
      xe = xs.get() + o * D;
    }
    float* g = sh ? a.shared_gate : a.expert_gate + o * F;
    float* u = sh ? a.shared_up : a.expert_up + o * F;
    float* he = sh ? h.get() + rows * F : h.get() + o * F;
    up.push_back({g, xe, w.gate_proj, n});
    up.push_back({u, xe, w.up_proj, n});
    down.push_back({sh ? y_shared : ye + o * D, he, w.down_proj, n});
    hs.push_back(he);
  }
  wlinear_forward_many(up.data(), (int64_t)up.size());
  for (size_t i = 0; i < down.size(); ++i)
    swiglu_forward(hs[i], up[2 * i].y, up[2 * i + 1].y, down[i].R * down[i].w.K);
  wlinear_forward_many(down.data(), (int64_t)down.size());
}

}  // namespace

void moe_run_experts(float* ye, float* y_shared, const MoeActs& a, const float* x, int64_t K,
                     int64_t E, const SwiGluParams* experts, const SwiGluParams* shared,
                     int64_t T, int64_t D, int64_t F, int64_t S, const LinearMode& prec) {
  if (decode_shaped(a, E, T, prec))
    return run_experts_gemv(ye, y_shared, a, x, K, E, experts, shared, T, D, F, S);
  // item e < E is routed expert e, item E the shared expert (writes y_shared directly)
  std::vector<int64_t> rows(a.expert_count, a.expert_count + E);
  if (shared) rows.push_back(T);
  for_each_expert(rows, [&](int64_t e) {
    if (e == E) {
      const SwiGluParams& w = *shared;
      Buf h = buf(T * S);
      linear_forward(a.shared_gate, x, w.gate_proj, T, D, S, prec);
      linear_forward(a.shared_up, x, w.up_proj, T, D, S, prec);
      swiglu_forward(h.get(), a.shared_gate, a.shared_up, T * S);
      linear_forward(y_shared, h.get(), w.down_proj, T, S, D, prec);
      return;
    }
    const SwiGluParams& w = experts[e];
    const int64_t o = a.expert_offset[e], n = a.expert_count[e];
    Buf xs = buf(n * D), h = buf(n * F);
    gather_rows(xs.get(), x, a.dispatch_slot + o, n, K, D);
    float *g = a.expert_gate + o * F, *u = a.expert_up + o * F;
    linear_forward(g, xs.get(), w.gate_proj, n, D, F, prec);
    linear_forward(u, xs.get(), w.up_proj, n, D, F, prec);
    swiglu_forward(h.get(), g, u, n * F);
    linear_forward(ye + o * D, h.get(), w.down_proj, n, F, D, prec);
  });
}

void moe_run_experts_backward(float* dxs, float* dx_shared, float* d_topk_weight,
                              const SwiGluGrads* expert_grads, const SwiGluGrads* shared_grads,
                              const float* dy, const MoeActs& a, const float* x, int64_t K,
                              int64_t E, const SwiGluParams* experts,
                              const SwiGluParams* shared, int64_t T, int64_t D, int64_t F,
                              int64_t S, const LinearMode& prec) {
  std::vector<int64_t> rows(a.expert_count, a.expert_count + E);
  if (shared) rows.push_back(T);
  for_each_expert(rows, [&](int64_t e) {
    const bool is_shared = e == E;
    const SwiGluParams& w = is_shared ? *shared : experts[e];
    const float *wg = w.gate_proj.as_f32(), *wu = w.up_proj.as_f32(), *wd = w.down_proj.as_f32();
    const SwiGluGrads gw = is_shared ? (shared_grads ? *shared_grads : SwiGluGrads{})
                                     : (expert_grads ? expert_grads[e] : SwiGluGrads{});
    const int64_t n = is_shared ? T : a.expert_count[e], o = is_shared ? 0 : a.expert_offset[e];
    const int64_t W = is_shared ? S : F;
    const float* gg = is_shared ? a.shared_gate : a.expert_gate + o * F;
    const float* uu = is_shared ? a.shared_up : a.expert_up + o * F;
    const int64_t* slots = a.dispatch_slot + o;
    Buf dys, A = buf(n * W), h = buf(n * W), dg = buf(n * W), du = buf(n * W);
    const float* dY = dy;  // dL/d(expert output), this item's rows
    if (!is_shared) {
      dys = buf(n * D);
      gather_rows(dys.get(), dy, slots, n, K, D);
      dY = dys.get();
    }
    const bool lowp = prec != GemmPrecision::fp32;
    if (lowp) {
      std::fill(A.get(), A.get() + n * W, 0.f);
      lowp_linear_backward(A.get(), nullptr, dY, nullptr, wd, n, W, D, prec);
    } else {
      sgemm(false, false, n, W, D, 1.f, dY, D, wd, W, 0.f, A.get(), W);  // dY Wd
    }
    // The routing weight w_p scales row p's output: dL/dw_p = <dY_p Wd, h_p>, dh_p = w_p dY_p Wd
    for (int64_t q = 0; q < n; ++q) {
      const float wp = is_shared ? 1.f : a.topk_weight[slots[q]];
      const float d_w = swiglu_backward_row(h.get() + q * W, dg.get() + q * W, du.get() + q * W,
                                            A.get() + q * W, gg + q * W, uu + q * W, wp, W);
      if (!is_shared) {
        d_topk_weight[slots[q]] = d_w;
        float* dq = dys.get() + q * D;
        for (int64_t j = 0; j < D; ++j) dq[j] *= wp;  // dL/d(weighted output) for dWd
      }
    }
    if (gw.down_proj && lowp)
      lowp_linear_backward(nullptr, gw.down_proj, dY, h.get(), wd, n, W, D, prec);
    else if (gw.down_proj)
      sgemm(true, false, D, W, n, 1.f, dY, D, h.get(), W, 1.f, gw.down_proj, W);
    const float* xs = x;
    if (!is_shared && (gw.gate_proj || gw.up_proj)) {
      gather_rows(dys.get(), x, slots, n, K, D);  // dys is free again: reuse it for x rows
      xs = dys.get();
    }
    if (lowp) {
      float* dst = is_shared ? dx_shared : dxs ? dxs + o * D : nullptr;
      if (dst && !is_shared) std::fill(dst, dst + n * D, 0.f);
      lowp_linear_backward(dst, gw.gate_proj, dg.get(), xs, wg, n, D, W, prec);
      lowp_linear_backward(dst, gw.up_proj, du.get(), xs, wu, n, D, W, prec);
      return;
    }
    if (gw.gate_proj) sgemm(true, false, W, D, n, 1.f, dg.get(), W, xs, D, 1.f, gw.gate_proj, D);
    if (gw.up_proj) sgemm(true, false, W, D, n, 1.f, du.get(), W, xs, D, 1.f, gw.up_proj, D);
    if (is_shared ? dx_shared != nullptr : dxs != nullptr) {
      float* dst = is_shared ? dx_shared : dxs + o * D;  // shared: accumulate straight into dx
      const float beta = is_shared ? 1.f : 0.f;
      sgemm(false, false, n, D, W, 1.f, dg.get(), W, wg, D, beta, dst, D);
      sgemm(false, false, n, D, W, 1.f, du.get(), W, wu, D, 1.f, dst, D);
    }
  });
}

MoeActsSize moe_acts_size(const MoeConfig& c, int64_t T) {
  const int64_t E = c.n_routed_experts, K = c.num_experts_per_tok, N = T * K;
  const int64_t F = c.moe_intermediate_size, S = c.shared_width();
  return {N + T * E + 2 * N * F + 2 * T * S, N + E + (E + 1) + 2 * N};
}

MoeActs moe_acts_view(float* f, int64_t* i, const MoeConfig& c, int64_t T) {
  const int64_t E = c.n_routed_experts, K = c.num_experts_per_tok, N = T * K;
  const int64_t F = c.moe_intermediate_size, S = c.shared_width();
  MoeActs a;
  a.topk_weight = f;
  a.scores = (f += N);
  a.expert_gate = (f += T * E);
  a.expert_up = (f += N * F);
  a.shared_gate = (f += N * F);
  a.shared_up = (f += T * S);
  a.topk_idx = i;
  a.expert_count = (i += N);
  a.expert_offset = (i += E);
  a.dispatch_slot = (i += E + 1);
  a.slot_row = (i += N);
  return a;
}

void moe_layer_check(const MoeConfig& c, const MoeParams& p, const char* op) {
  moe_config_check(c, op);
  DSV3_CHECK(c.moe_intermediate_size >= 1, "[", op, "] moe_intermediate_size must be >= 1, got ",
             c.moe_intermediate_size);
  DSV3_CHECK(c.n_shared_experts >= 0, "[", op, "] n_shared_experts must be >= 0, got ",
             c.n_shared_experts);
  DSV3_CHECK(p.gate_weight, "[", op, "] gate.weight is missing");
  DSV3_CHECK(c.has_bias() == (p.gate_e_score_correction_bias != nullptr), "[", op,
             "] gate.e_score_correction_bias ",
             c.has_bias() ? "is required for topk_method noaux_tc"
                          : "exists only for topk_method noaux_tc");
  DSV3_CHECK((int64_t)p.experts.size() == c.n_routed_experts, "[", op, "] expected ",
             c.n_routed_experts, " routed experts, got ", p.experts.size());
  // expert parallel: only the owned experts are computed here (an expert shard holds no others)
  const bool ep = p.ep && p.ep->size() > 1 && c.n_routed_experts % p.ep->size() == 0;
  const int64_t El = ep ? c.n_routed_experts / p.ep->size() : 0;
  const int64_t me = ep ? p.ep->group->rank() : 0;
  for (size_t j = 0; j < p.experts.size(); ++j) {
    if (ep && (int64_t)j / El != me) continue;
    DSV3_CHECK(p.experts[j].gate_proj.data && p.experts[j].up_proj.data &&
                   p.experts[j].down_proj.data, "[", op,
               "] experts.", j, " is missing a projection");
  }
  if (c.shared_width() > 0)
    DSV3_CHECK(p.shared_experts.gate_proj.data && p.shared_experts.up_proj.data &&
                   p.shared_experts.down_proj.data,
               "[", op, "] shared_experts is missing a projection");
}

void moe_forward(float* y, const MoeActs& a, const float* x, const MoeParams& p,
                 const MoeConfig& c, int64_t T, MoeWorkspace* ws) {
  const char* op = "moe_forward";
  moe_layer_check(c, p, op);
  DSV3_CHECK(T >= 0, "[", op, "] number of tokens must be >= 0, got ", T);
  const int64_t E = c.n_routed_experts, K = c.num_experts_per_tok, D = c.hidden_size;
  const int64_t F = c.moe_intermediate_size, S = c.shared_width(), N = T * K;
  check_finite(x, T * D, op, "x");

  // 1. Gate (also validates the gate weight and the bias).
  moe_gate_forward(a.topk_idx, a.topk_weight, a.scores, x, p.gate_weight,
                   p.gate_e_score_correction_bias, c, T);
  if (T == 0 && !(p.ep && p.ep->size() > 1)) return;  // EP: still take part in the exchange

  // 2. Dispatch: counting sort of the slots by expert, stable in (t, k).
  expert_load(a.expert_count, a.topk_idx, T, K, E);
  a.expert_offset[0] = 0;
  for (int64_t e = 0; e < E; ++e) a.expert_offset[e + 1] = a.expert_offset[e] + a.expert_count[e];
  {
    std::vector<int64_t> cursor(a.expert_offset, a.expert_offset + E);
    for (int64_t slot = 0; slot < N; ++slot) {
      const int64_t row = cursor[a.topk_idx[slot]]++;
      a.dispatch_slot[row] = slot;
      a.slot_row[slot] = row;
    }
  }

  // 3. Experts: here, or (expert parallel) on the ranks that own them (moe_ep.h).
  Buf ye_local;
  float* ye = workspace_rows(ws, ye_local, N * D);
  if (p.ep && p.ep->size() > 1) {
    if (S > 0) moe_run_experts(nullptr, y, a, x, K, 0, nullptr, &p.shared_experts, T, D, F, S,
                               p.precision);
    moe_ep_forward(ye, a, x, p, c, T);
  } else if (p.ep && p.ep->fp8_dispatch) {  // one process: the routed experts see Q(x)
    if (S > 0) moe_run_experts(nullptr, y, a, x, K, 0, nullptr, &p.shared_experts, T, D, F, S,
                               p.precision);
    const std::vector<float> xq = fp8_dispatch_values(x, T, D);
    moe_run_experts(ye, nullptr, a, xq.data(), K, E, p.experts.data(), nullptr, T, D, F, S,
                    p.precision);
  } else {
    moe_run_experts(ye, y, a, x, K, E, p.experts.data(), S > 0 ? &p.shared_experts : nullptr, T,
                    D, F, S, p.precision);
  }

  // 4. Combine in k order.
  parallel_for(T, std::max<int64_t>(1, 8192 / (K * D)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* yr = y + t * D;
      if (S == 0) std::fill(yr, yr + D, 0.f);
      for (int64_t k = 0; k < K; ++k)
        axpy_row(yr, a.topk_weight[t * K + k], ye + a.slot_row[t * K + k] * D, D);
    }
  });
}

// Over 80 lines: one parallel loop over the experts (the shared expert last) whose body is the
// backward of one expert's SwiGLU on its gathered rows, then the scatter back to the tokens;
// split up, each piece would take a dozen of the loop's locals. It is hot code, kept whole.
void moe_backward(float* dx, const MoeGrads& g, const float* dy, const float* d_scores_extra,
                  const MoeActs& a, const float* x, const MoeParams& p, const MoeConfig& c,
                  int64_t T, MoeWorkspace* ws) {
  const char* op = "moe_backward";
  moe_layer_check(c, p, op);
  DSV3_CHECK(g.experts.empty() || (int64_t)g.experts.size() == c.n_routed_experts, "[", op,
             "] grads.experts must be empty or hold ", c.n_routed_experts, " entries, got ",
             g.experts.size());
  // a training path: fp32 weights only (f32_weight refuses a resident bf16 / fp8 expert)
  const auto check_f32 = [&](const SwiGluParams& w) {
    f32_weight(w.gate_proj, op), f32_weight(w.up_proj, op), f32_weight(w.down_proj, op);
  };
  for (const SwiGluParams& w : p.experts) check_f32(w);
  if (c.shared_width() > 0) check_f32(p.shared_experts);
  if (T <= 0 && !(p.ep && p.ep->size() > 1)) return;  // EP: still take part
  const int64_t E = c.n_routed_experts, K = c.num_experts_per_tok, D = c.hidden_size;
  const int64_t F = c.moe_intermediate_size, S = c.shared_width(), N = T * K;

  std::vector<float> d_topk_weight((size_t)N);  // each slot written once, by its expert
  Buf dxs_local;
  float* dxs = dx ? workspace_rows(ws, dxs_local, N * D) : nullptr;
  if (p.ep && (p.ep->size() > 1 || p.ep->fp8_dispatch)) {
    if (S > 0)
      moe_run_experts_backward(nullptr, dx, nullptr, nullptr, &g.shared_experts, dy, a, x, K,
                               0, nullptr, &p.shared_experts, T, D, F, S, p.precision);
    if (p.ep->size() > 1) {
      moe_ep_backward(dxs, d_topk_weight.data(), g, dy, a, p, c, T);
    } else {
      const std::vector<float> xq = fp8_dispatch_values(x, T, D);
      moe_run_experts_backward(dxs, nullptr, d_topk_weight.data(),
                               g.experts.empty() ? nullptr : g.experts.data(), nullptr, dy, a,
                               xq.data(), K, E, p.experts.data(), nullptr, T, D, F, S,
                               p.precision);
    }
  } else {
    moe_run_experts_backward(dxs, dx, d_topk_weight.data(),
                             g.experts.empty() ? nullptr : g.experts.data(),
                             S > 0 ? &g.shared_experts : nullptr, dy, a, x, K, E,
                             p.experts.data(), S > 0 ? &p.shared_experts : nullptr, T, D, F, S,
                             p.precision);
  }

  if (dx)  // routed input gradients back to tokens, in k order
    parallel_for(T, std::max<int64_t>(1, 8192 / (K * D)), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t k = 0; k < K; ++k)
          axpy_row(dx + t * D, 1.f, dxs + a.slot_row[t * K + k] * D, D);
    });

  moe_gate_backward(dx, g.gate_weight, d_topk_weight.data(), d_scores_extra, a.scores,
                    a.topk_idx, x, p.gate_weight, c, T);
}

}  // namespace dsv3
