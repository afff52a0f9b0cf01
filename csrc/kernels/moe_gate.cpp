#include "kernels/moe_gate.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "core/blas.h"
#include "core/check.h"
#include "core/mathfn.h"
#include "core/parallel.h"
#include "core/simd.h"
#include "kernels/nn.h"

namespace dsv3 {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Index of the first element whose exponent bits are all ones (NaN or +-inf), or n.
DSV3_SIMD_CLONES int64_t first_nonfinite_block(const float* a, int64_t n) {
  constexpr int64_t kBlock = 1024;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = b + kBlock < n ? b + kBlock : n;
    uint32_t bad = 0;
    for (int64_t i = b; i < e; ++i) {
      uint32_t bits;
      std::memcpy(&bits, a + i, 4);
      bad |= (uint32_t)((bits & 0x7f800000u) == 0x7f800000u);
    }
    if (bad)
      for (int64_t i = b; i < e; ++i)
        if (!std::isfinite(a[i])) return i;
  }
  return n;
}

DSV3_SIMD_CLONES void sigmoid_inplace(float* a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = sigmoid_f32(a[i]);
}

DSV3_SIMD_CLONES void softmax_row_inplace(float* a, int64_t E) {
  float m = a[0];
  for (int64_t i = 1; i < E; ++i) m = a[i] > m ? a[i] : m;
  float sum = 0.f;
  for (int64_t i = 0; i < E; ++i) {
    a[i] = exp_f32(a[i] - m);
    sum += a[i];
  }
  const float inv = 1.f / sum;
  for (int64_t i = 0; i < E; ++i) a[i] = a[i] * inv;
}

// Position of the largest v[i] with !taken[i]; the first one wins ties (lower index).
inline int64_t argmax_free(const float* v, const uint8_t* taken, int64_t n) {
  int64_t best = -1;
  for (int64_t i = 0; i < n; ++i)
    if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
  return best;
}

struct RouteScratch {
  std::vector<float> sel, group_score;
  std::vector<uint8_t> taken, group_kept;
  explicit RouteScratch(const MoeConfig& c)
      : sel((size_t)c.n_routed_experts), group_score((size_t)c.n_group),
        taken((size_t)c.n_routed_experts), group_kept((size_t)c.n_group) {}
};

// One token: s[E] -> idx[K], w[K] (semantics §2.3 steps 2-5).
void route_token(int64_t* idx, float* w, const float* s, const float* bias, const MoeConfig& c,
                 RouteScratch& sc) {
  const int64_t E = c.n_routed_experts, K = c.num_experts_per_tok;
  float* sel = sc.sel.data();
  for (int64_t i = 0; i < E; ++i) sel[i] = bias ? s[i] + bias[i] : s[i];
  if (c.grouped()) {
    const int64_t G = c.n_group, per = E / G;
    for (int64_t g = 0; g < G; ++g) {
      const float* v = sel + g * per;
      if (c.topk_method == TopkMethod::noaux_tc) {  // sum of the two largest (with repeats)
        float top1 = kNegInf, top2 = kNegInf;
        for (int64_t j = 0; j < per; ++j) {
          if (v[j] > top1) {
            top2 = top1;
            top1 = v[j];
          } else if (v[j] > top2) {
            top2 = v[j];
          }
        }
        sc.group_score[g] = top1 + top2;
      } else {
        float mx = v[0];
        for (int64_t j = 1; j < per; ++j) mx = v[j] > mx ? v[j] : mx;
        sc.group_score[g] = mx;
      }
    }
    std::fill(sc.group_kept.begin(), sc.group_kept.end(), 0);
    for (int64_t r = 0; r < c.topk_group; ++r)
      sc.group_kept[argmax_free(sc.group_score.data(), sc.group_kept.data(), G)] = 1;
    for (int64_t g = 0; g < G; ++g)
      if (!sc.group_kept[g])
        for (int64_t j = 0; j < per; ++j) sel[g * per + j] = kNegInf;
  }
  std::fill(sc.taken.begin(), sc.taken.end(), 0);
  float sum = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t i = argmax_free(sel, sc.taken.data(), E);
    sc.taken[i] = 1;
    idx[k] = i;
    w[k] = s[i];
    sum += s[i];
  }
  if (c.norm_topk_prob) {
    const float denom = sum + 1e-20f;
    for (int64_t k = 0; k < K; ++k) w[k] = w[k] / denom;
  }
  for (int64_t k = 0; k < K; ++k) w[k] *= c.routed_scaling_factor;
}

}  // namespace

namespace {
struct TopkName {
  const char* name;
  TopkMethod method;
};
constexpr TopkName kTopkMethods[] = {{"noaux_tc", TopkMethod::noaux_tc},
                                     {"greedy", TopkMethod::greedy},
                                     {"group_limited_greedy", TopkMethod::group_limited_greedy}};
}  // namespace

std::vector<std::string> topk_method_names() {
  std::vector<std::string> out;
  for (const TopkName& t : kTopkMethods) out.push_back(t.name);
  return out;
}

TopkMethod topk_method_from(const std::string& s, const char* op) {
  std::string all;
  for (const TopkName& t : kTopkMethods) {
    if (s == t.name) return t.method;
    all += (all.empty() ? "'" : ", '") + std::string(t.name) + "'";
  }
  throw std::invalid_argument(str_cat("[", op, "] topk_method must be one of ", all, ", got '",
                                      s, "'"));
}

ScoringFunc scoring_func_from(const std::string& s, const char* op) {
  if (s == "sigmoid") return ScoringFunc::sigmoid;
  DSV3_CHECK(s == "softmax", "[", op, "] scoring_func must be 'sigmoid' or 'softmax', got '", s,
             "'");
  return ScoringFunc::softmax;
}

void moe_config_check(const MoeConfig& c, const char* op) {
  const int64_t E = c.n_routed_experts, K = c.num_experts_per_tok, G = c.n_group;
  DSV3_CHECK(E >= 1, "[", op, "] n_routed_experts must be >= 1, got ", E);
  DSV3_CHECK(K >= 1 && K <= E, "[", op, "] num_experts_per_tok (topk) must be in [1, ",
             "n_routed_experts = ", E, "], got ", K);
  DSV3_CHECK(G >= 1 && E % G == 0, "[", op, "] n_group must be >= 1 and divide n_routed_experts (",
             E, "), got ", G);
  DSV3_CHECK(c.topk_group >= 1 && c.topk_group <= G, "[", op,
             "] topk_group must be in [1, n_group = ", G, "], got ", c.topk_group);
  if (c.grouped()) {
    const int64_t per = E / G;
    DSV3_CHECK(K <= c.topk_group * per, "[", op, "] num_experts_per_tok (", K, ") must be <= ",
               "topk_group * experts per group (", c.topk_group, " * ", per,
               "): only the kept groups' experts can be chosen");
    DSV3_CHECK(c.topk_method != TopkMethod::noaux_tc || per >= 2, "[", op, "] n_group: noaux_tc ",
               "scores a group by its top-2 experts, so each group needs >= 2 experts (",
               "n_routed_experts / n_group = ", per, ")");
  }
  DSV3_CHECK(std::isfinite(c.routed_scaling_factor) && c.routed_scaling_factor > 0, "[", op,
             "] routed_scaling_factor must be finite and > 0, got ", c.routed_scaling_factor);
  DSV3_CHECK(c.hidden_size >= 1, "[", op, "] hidden size must be >= 1, got ", c.hidden_size);
}

void check_finite(const float* a, int64_t n, const char* op, const char* name) {
  const int64_t i = first_nonfinite_block(a, n);
  DSV3_FINITE_CHECK(i == n, "[", op, "] ", name, " must be finite, found ", a[i < n ? i : 0],
             " at flat index ", i);
}

void moe_gate_forward(int64_t* topk_idx, float* topk_weight, float* scores, const float* x,
                      const float* weight, const float* bias, const MoeConfig& c, int64_t T) {
  const char* op = "moe_gate";
  moe_config_check(c, op);
  DSV3_CHECK(T >= 0, "[", op, "] number of tokens must be >= 0, got ", T);
  DSV3_CHECK(c.has_bias() == (bias != nullptr), "[", op, "] bias (e_score_correction_bias) ",
             c.has_bias() ? "is required for topk_method noaux_tc"
                          : "is only defined for topk_method noaux_tc; pass None");
  const int64_t E = c.n_routed_experts, D = c.hidden_size, K = c.num_experts_per_tok;
  // logits (decoding's few rows: the GEMV, no BLAS call; kernels/nn.h). A NaN or inf in x or
  // weight always makes a logit non-finite (NaN or inf times any value, zero included, is not
  // finite, and adding any value keeps it so: inf + -inf is NaN), so the T x E logits are
  // scanned in place of the E x D weight (a decoded token's gate then reads its weight once,
  // not twice); non-finite logits, or no tokens at all, send us to scan x and then weight, to
  // name the culprit as before. Finite inputs whose logits overflow pass, as before.
  if (T > 0) linear_forward(scores, x, weight, T, D, E, GemmPrecision::fp32);
  if (T == 0 || first_nonfinite_block(scores, T * E) < T * E) {
    check_finite(x, T * D, op, "x");
    check_finite(weight, E * D, op, "weight");
  }
  if (bias) check_finite(bias, E, op, "bias");
  if (T == 0) return;
  parallel_for(T, std::max<int64_t>(1, 4096 / E), [&](int64_t t0, int64_t t1) {
    RouteScratch sc(c);
    for (int64_t t = t0; t < t1; ++t) {
      float* s = scores + t * E;
      if (c.scoring_func == ScoringFunc::sigmoid)
        sigmoid_inplace(s, E);
      else
        softmax_row_inplace(s, E);
      route_token(topk_idx + t * K, topk_weight + t * K, s, bias, c, sc);
    }
  });
}

void moe_gate_backward(float* dx, float* d_weight, const float* d_topk_weight,
                       const float* d_scores_extra, const float* scores, const int64_t* topk_idx,
                       const float* x, const float* weight, const MoeConfig& c, int64_t T) {
  moe_config_check(c, "moe_gate_backward");
  const int64_t E = c.n_routed_experts, D = c.hidden_size, K = c.num_experts_per_tok;
  if (T <= 0 || (!dx && !d_weight)) return;
  const float rsf = c.routed_scaling_factor;
  std::vector<float> dlogits((size_t)(T * E));
  parallel_for(T, std::max<int64_t>(1, 4096 / E), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* s = scores + t * E;
      float* ds = dlogits.data() + t * E;  // dL/ds first, turned into dL/dlogits in place
      if (d_scores_extra)
        std::memcpy(ds, d_scores_extra + t * E, sizeof(float) * E);
      else
        std::fill(ds, ds + E, 0.f);
      if (d_topk_weight) {
        const int64_t* idx = topk_idx + t * K;
        const float* dw = d_topk_weight + t * K;
        if (c.norm_topk_prob) {
          // w_k = rsf s_k / S with S = sum_j s_j + 1e-20:
          //   dL/ds_m = rsf (dw_m S - sum_k dw_k s_k) / S^2
          //           = rsf (sum_k (dw_m - dw_k) s_k + 1e-20 dw_m) / S^2
          // (the second form has no cancellation: K = 1 gives exactly ~0, as it should).
          float sum = 0.f;
          for (int64_t k = 0; k < K; ++k) sum += s[idx[k]];
          const float S = sum + 1e-20f;
          for (int64_t m = 0; m < K; ++m) {
            float acc = 0.f;
            for (int64_t k = 0; k < K; ++k) acc += (dw[m] - dw[k]) * s[idx[k]];
            ds[idx[m]] += rsf * (((acc + 1e-20f * dw[m]) / S) / S);
          }
        } else {
          for (int64_t k = 0; k < K; ++k) ds[idx[k]] += rsf * dw[k];
        }
      }
      if (c.scoring_func == ScoringFunc::sigmoid) {
        for (int64_t i = 0; i < E; ++i) ds[i] = ds[i] * (s[i] * (1.f - s[i]));
      } else {
        float dot = 0.f;
        for (int64_t i = 0; i < E; ++i) dot += ds[i] * s[i];
        for (int64_t i = 0; i < E; ++i) ds[i] = s[i] * (ds[i] - dot);
      }
    }
  });
  if (dx) sgemm(false, false, T, D, E, 1.f, dlogits.data(), E, weight, D, 1.f, dx, D);
  if (d_weight) sgemm(true, false, E, D, T, 1.f, dlogits.data(), E, x, D, 1.f, d_weight, D);
}

}  // namespace dsv3
