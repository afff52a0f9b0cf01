#include "kernels/balance.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/check.h"
#include "core/parallel.h"
#include "kernels/moe_gate.h"

namespace dsv3 {

namespace {

// Sizes, alpha and finite scores: everything the balance loss's formulas assume.
void check_balance_args(const float* scores, int64_t B, int64_t T, int64_t E, int64_t K,
                        double alpha, const char* op) {
  check_balance_alpha(alpha, op);
  DSV3_CHECK(E >= 1, "[", op, "] number of experts must be >= 1, got ", E);
  DSV3_CHECK(K >= 1 && K <= E, "[", op, "] topk_idx's last dimension (K = ", K,
             ") must be in [1, n_routed_experts = ", E, "]");
  DSV3_CHECK(B >= 1 && T >= 1, "[", op, "] need at least one sequence of at least one token, got ",
             B, " sequences of ", T);
  check_finite(scores, B * T * E, op, "scores");
}

// f[b, i] = E / (K T) * #{t in sequence b : i in topk_t}
std::vector<double> seq_fractions(const int64_t* topk_idx, int64_t B, int64_t T, int64_t E,
                                  int64_t K) {
  std::vector<double> f((size_t)(B * E), 0.0);
  std::vector<int64_t> load((size_t)E);
  for (int64_t b = 0; b < B; ++b) {
    expert_load(load.data(), topk_idx + b * T * K, T, K, E);
    for (int64_t i = 0; i < E; ++i) f[b * E + i] = (double)E / (double)(K * T) * (double)load[i];
  }
  return f;
}

}  // namespace

void check_balance_alpha(double alpha, const char* op) {
  DSV3_CHECK(std::isfinite(alpha) && alpha >= 0, "[", op,
             "] balance_alpha must be finite and >= 0, got ", alpha);
}

void expert_load(int64_t* load, const int64_t* topk_idx, int64_t R, int64_t K, int64_t E) {
  DSV3_CHECK(E >= 1, "[expert_load] n_routed_experts must be >= 1, got ", E);
  std::fill(load, load + E, 0);
  for (int64_t n = 0; n < R * K; ++n) {
    const int64_t i = topk_idx[n];
    DSV3_INDEX_CHECK(i >= 0 && i < E, "[expert_load] topk_idx ", i, " at row ", n / K,
                     " is out of range [0, ", E, ")");
    ++load[i];
  }
}

namespace {
// sum(load) exactly, after checking every load >= 0. 128 bits hold it (and E * load_i) for
// any E < 2^64, so loads summing beyond int64 still give exact statistics.
__int128 load_total(const int64_t* load, int64_t E, const char* op) {
  DSV3_CHECK(E >= 1, "[", op, "] need at least one expert");
  __int128 total = 0;
  for (int64_t i = 0; i < E; ++i) {
    DSV3_CHECK(load[i] >= 0, "[", op, "] load must be >= 0, got ", load[i], " at ", i);
    total += load[i];
  }
  return total;
}
}  // namespace

// max_i load_i / mean(load) - 1 = E max_i load_i / sum(load) - 1 (semantics §2.4): the
// excess E max - sum is exact in 128 bits, then one long double division: (E max - sum) / sum.
double max_violation(const int64_t* load, int64_t E) {
  const __int128 total = load_total(load, E, "max_violation");
  if (total == 0) return 0.0;
  const int64_t mx = *std::max_element(load, load + E);
  const __int128 excess = (__int128)mx * E - total;  // >= 0, exact
  return (double)((long double)excess / (long double)total);
}

// bias_i += gamma * sign(mean - load_i), the sign taken exactly: sign(sum - E load_i).
void update_expert_bias(float* bias, const int64_t* load, int64_t E, float gamma) {
  DSV3_CHECK(std::isfinite(gamma) && gamma >= 0,
             "[update_expert_bias] gamma must be finite and >= 0, got ", gamma);
  const __int128 total = load_total(load, E, "update_expert_bias");
  for (int64_t i = 0; i < E; ++i) {
    const __int128 diff = total - (__int128)E * load[i];  // E * (mean - load_i)
    const float sgn = diff > 0 ? 1.f : (diff < 0 ? -1.f : 0.f);
    bias[i] = bias[i] + gamma * sgn;
  }
}

double seq_balance_loss_forward(const float* scores, const int64_t* topk_idx, int64_t B,
                                int64_t T, int64_t E, int64_t K, double alpha) {
  const char* op = "moe_balance_loss";
  check_balance_args(scores, B, T, E, K, alpha, op);
  const std::vector<double> f = seq_fractions(topk_idx, B, T, E, K);
  std::vector<double> per_seq((size_t)B, 0.0);
  parallel_for(B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> P((size_t)E);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(P.begin(), P.end(), 0.0);
      for (int64_t t = 0; t < T; ++t) {
        const float* s = scores + (b * T + t) * E;
        double sum = 0.0;
        for (int64_t i = 0; i < E; ++i) sum += s[i];
        for (int64_t i = 0; i < E; ++i) P[i] += s[i] / sum;
      }
      double acc = 0.0;
      for (int64_t i = 0; i < E; ++i) acc += f[b * E + i] * (P[i] / (double)T);
      per_seq[b] = alpha * acc;
    }
  });
  double L = 0.0;
  for (int64_t b = 0; b < B; ++b) L += per_seq[b];
  return L / (double)B;
}

void seq_balance_loss_backward(float* d_scores, double d_loss, const float* scores,
                               const int64_t* topk_idx, int64_t B, int64_t T, int64_t E,
                               int64_t K, double alpha) {
  const char* op = "moe_balance_loss_backward";
  check_balance_args(scores, B, T, E, K, alpha, op);
  std::vector<double> g = seq_fractions(topk_idx, B, T, E, K);
  const double c = d_loss * alpha / ((double)T * (double)B);
  for (double& v : g) v *= c;
  parallel_for(B * T, std::max<int64_t>(1, 4096 / E), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const double* gb = g.data() + (r / T) * E;
      const float* s = scores + r * E;
      double sum = 0.0, dot = 0.0;
      for (int64_t i = 0; i < E; ++i) sum += s[i];
      for (int64_t i = 0; i < E; ++i) dot += gb[i] * s[i];
      dot /= sum;
      float* ds = d_scores + r * E;
      for (int64_t i = 0; i < E; ++i) ds[i] += (float)((gb[i] - dot) / sum);
    }
  });
}

}  // namespace dsv3
