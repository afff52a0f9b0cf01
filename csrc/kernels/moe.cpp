#include "kernels/moe.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <vector>

#include "core/blas.h"
#include "core/check.h"
#include "core/parallel.h"
#include "kernels/balance.h"
#include "kernels/nn.h"

namespace dsv3 {

namespace {

// The expert scheduling policy (see moe.h): heavy items alone with threaded BLAS, the rest in
// row-balanced contiguous ranges, one per thread, with single-threaded BLAS.
void for_each_expert(const std::vector<int64_t>& rows, const std::function<void(int64_t)>& fn) {
  const int64_t n = (int64_t)rows.size();
  int64_t total = 0;
  for (int64_t r : rows) total += r;
  const int nt = in_parallel() ? 1 : num_threads();
  if (nt <= 1 || total == 0) {
    for (int64_t i = 0; i < n; ++i)
      if (rows[i] > 0) fn(i);
    return;
  }
  std::vector<int64_t> light;
  int64_t light_total = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (rows[i] == 0) continue;
    if (rows[i] * nt > total) {
      fn(i);
    } else {
      light.push_back(i);
      light_total += rows[i];
    }
  }
  if (light.empty()) return;
  // bounds[t] = first light item whose row prefix reaches light_total * t / nt
  std::vector<int64_t> bounds((size_t)nt + 1, (int64_t)light.size());
  bounds[0] = 0;
  int64_t prefix = 0;
  size_t j = 0;
  for (int t = 1; t < nt; ++t) {
    const int64_t target = light_total * t / nt;
    while (j < light.size() && prefix + rows[light[j]] / 2 < target) prefix += rows[light[j++]];
    bounds[t] = (int64_t)j;
  }
  parallel_for(nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t q = bounds[t]; q < bounds[t + 1]; ++q) fn(light[q]);
  });
}

void gather_rows(float* dst, const float* src, const int64_t* slots, int64_t n, int64_t K,
                 int64_t D) {
  for (int64_t p = 0; p < n; ++p)
    std::memcpy(dst + p * D, src + (slots[p] / K) * D, sizeof(float) * D);
}

float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[j + l] * b[j + l];
  float s = 0.f;
  for (int l = 0; l < 8; ++l) s += acc[l];
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

}  // namespace

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
  for (size_t j = 0; j < p.experts.size(); ++j)
    DSV3_CHECK(p.experts[j].gate_proj && p.experts[j].up_proj && p.experts[j].down_proj, "[", op,
               "] experts.", j, " is missing a projection");
  if (c.shared_width() > 0)
    DSV3_CHECK(p.shared_experts.gate_proj && p.shared_experts.up_proj &&
                   p.shared_experts.down_proj,
               "[", op, "] shared_experts is missing a projection");
}

void moe_forward(float* y, const MoeActs& a, const float* x, const MoeParams& p,
                 const MoeConfig& c, int64_t T) {
  const char* op = "moe_forward";
  moe_layer_check(c, p, op);
  DSV3_CHECK(T >= 0, "[", op, "] number of tokens must be >= 0, got ", T);
  const int64_t E = c.n_routed_experts, K = c.num_experts_per_tok, D = c.hidden_size;
  const int64_t F = c.moe_intermediate_size, S = c.shared_width(), N = T * K;
  check_finite(x, T * D, op, "x");

  // 1. Gate (also validates the gate weight and the bias).
  moe_gate_forward(a.topk_idx, a.topk_weight, a.scores, x, p.gate_weight,
                   p.gate_e_score_correction_bias, c, T);
  if (T == 0) return;

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

  // 3. Experts: item e < E is routed expert e, item E the shared expert (writes y directly).
  std::vector<float> ye((size_t)(N * D));
  std::vector<int64_t> rows(a.expert_count, a.expert_count + E);
  if (S > 0) rows.push_back(T);
  for_each_expert(rows, [&](int64_t e) {
    if (e == E) {
      const SwiGluParams& w = p.shared_experts;
      std::vector<float> h((size_t)(T * S));
      linear_forward(a.shared_gate, x, w.gate_proj, T, D, S);
      linear_forward(a.shared_up, x, w.up_proj, T, D, S);
      swiglu_forward(h.data(), a.shared_gate, a.shared_up, T * S);
      linear_forward(y, h.data(), w.down_proj, T, S, D);
      return;
    }
    const SwiGluParams& w = p.experts[e];
    const int64_t o = a.expert_offset[e], n = a.expert_count[e];
    std::vector<float> xs((size_t)(n * D)), h((size_t)(n * F));
    gather_rows(xs.data(), x, a.dispatch_slot + o, n, K, D);
    float *g = a.expert_gate + o * F, *u = a.expert_up + o * F;
    linear_forward(g, xs.data(), w.gate_proj, n, D, F);
    linear_forward(u, xs.data(), w.up_proj, n, D, F);
    swiglu_forward(h.data(), g, u, n * F);
    linear_forward(ye.data() + o * D, h.data(), w.down_proj, n, F, D);
  });

  // 4. Combine in k order.
  parallel_for(T, std::max<int64_t>(1, 8192 / (K * D)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* yr = y + t * D;
      if (S == 0) std::fill(yr, yr + D, 0.f);
      for (int64_t k = 0; k < K; ++k) {
        const float wk = a.topk_weight[t * K + k];
        const float* src = ye.data() + a.slot_row[t * K + k] * D;
        for (int64_t j = 0; j < D; ++j) yr[j] += wk * src[j];
      }
    }
  });
}

void moe_backward(float* dx, const MoeGrads& g, const float* dy, const float* d_scores_extra,
                  const MoeActs& a, const float* x, const MoeParams& p, const MoeConfig& c,
                  int64_t T) {
  const char* op = "moe_backward";
  moe_layer_check(c, p, op);
  DSV3_CHECK(g.experts.empty() || (int64_t)g.experts.size() == c.n_routed_experts, "[", op,
             "] grads.experts must be empty or hold ", c.n_routed_experts, " entries, got ",
             g.experts.size());
  if (T <= 0) return;
  const int64_t E = c.n_routed_experts, K = c.num_experts_per_tok, D = c.hidden_size;
  const int64_t F = c.moe_intermediate_size, S = c.shared_width(), N = T * K;

  std::vector<float> d_topk_weight((size_t)N, 0.f);  // each slot written by its expert only
  std::vector<float> dxs(dx ? (size_t)(N * D) : 0);
  std::vector<int64_t> rows(a.expert_count, a.expert_count + E);
  if (S > 0) rows.push_back(T);
  for_each_expert(rows, [&](int64_t e) {
    const bool shared = e == E;
    const SwiGluParams& w = shared ? p.shared_experts : p.experts[e];
    const SwiGluGrads gw = shared ? g.shared_experts
                                  : (g.experts.empty() ? SwiGluGrads{} : g.experts[e]);
    const int64_t n = shared ? T : a.expert_count[e], o = shared ? 0 : a.expert_offset[e];
    const int64_t W = shared ? S : F;
    const float* gg = shared ? a.shared_gate : a.expert_gate + o * F;
    const float* uu = shared ? a.shared_up : a.expert_up + o * F;
    const int64_t* slots = a.dispatch_slot + o;
    std::vector<float> dys, xs_buf;
    const float* dY = dy;  // dL/d(expert output), rows of this item
    if (!shared) {
      dys.resize((size_t)(n * D));
      gather_rows(dys.data(), dy, slots, n, K, D);
      dY = dys.data();
    }
    std::vector<float> A((size_t)(n * W)), h((size_t)(n * W));
    sgemm(false, false, n, W, D, 1.f, dY, D, w.down_proj, W, 0.f, A.data(), W);  // dy_e Wd
    swiglu_forward(h.data(), gg, uu, n * W);
    if (!shared) {  // w_p scales the expert output: dw_p = <dy_p Wd, h_p>, dh_p = w_p (dy_p Wd)
      for (int64_t q = 0; q < n; ++q) {
        const int64_t slot = slots[q];
        const float wp = a.topk_weight[slot];
        float *Aq = A.data() + q * W, *dq = dys.data() + q * D;
        d_topk_weight[slot] = dot(Aq, h.data() + q * W, W);
        for (int64_t j = 0; j < W; ++j) Aq[j] *= wp;
        for (int64_t j = 0; j < D; ++j) dq[j] *= wp;
      }
    }
    if (gw.down_proj) sgemm(true, false, D, W, n, 1.f, dY, D, h.data(), W, 1.f, gw.down_proj, W);
    std::vector<float> dg((size_t)(n * W), 0.f), du((size_t)(n * W), 0.f);
    swiglu_backward(dg.data(), du.data(), A.data(), gg, uu, n * W);
    const float* xs = x;
    if (!shared && (gw.gate_proj || gw.up_proj)) {
      gather_rows(dys.data(), x, slots, n, K, D);  // dys is free again: reuse it for x rows
      xs = dys.data();
    }
    if (gw.gate_proj) sgemm(true, false, W, D, n, 1.f, dg.data(), W, xs, D, 1.f, gw.gate_proj, D);
    if (gw.up_proj) sgemm(true, false, W, D, n, 1.f, du.data(), W, xs, D, 1.f, gw.up_proj, D);
    if (dx) {
      float* dst = shared ? dx : dxs.data() + o * D;  // shared: accumulate straight into dx
      const float beta = shared ? 1.f : 0.f;
      sgemm(false, false, n, D, W, 1.f, dg.data(), W, w.gate_proj, D, beta, dst, D);
      sgemm(false, false, n, D, W, 1.f, du.data(), W, w.up_proj, D, 1.f, dst, D);
    }
  });

  if (dx)  // routed input gradients back to tokens, in k order
    parallel_for(T, std::max<int64_t>(1, 8192 / (K * D)), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        float* dr = dx + t * D;
        for (int64_t k = 0; k < K; ++k) {
          const float* src = dxs.data() + a.slot_row[t * K + k] * D;
          for (int64_t j = 0; j < D; ++j) dr[j] += src[j];
        }
      }
    });

  moe_gate_backward(dx, g.gate_weight, d_topk_weight.data(), d_scores_extra, a.scores,
                    a.topk_idx, x, p.gate_weight, c, T);
}

}  // namespace dsv3
