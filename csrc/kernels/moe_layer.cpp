#include "kernels/moe_layer.h"

#include <cmath>
#include <vector>

#include "core/check.h"
#include "kernels/balance.h"
#include "kernels/moe_gate.h"

namespace dsv3 {

namespace {

struct LayerScratch {
  std::vector<float> f;
  std::vector<int64_t> i;
  MoeWorkspace ws;
};
LayerScratch& layer_scratch() {
  static thread_local LayerScratch s;
  return s;
}

MoeActs forward(float* y, const float* x, const MoeParams& p, const MoeConfig& c, int64_t R) {
  const MoeActsSize sz = moe_acts_size(c, R);
  LayerScratch& sc = layer_scratch();
  if ((int64_t)sc.f.size() < sz.floats) sc.f.resize((size_t)sz.floats);
  if ((int64_t)sc.i.size() < sz.ints) sc.i.resize((size_t)sz.ints);
  const MoeActs acts = moe_acts_view(sc.f.data(), sc.i.data(), c, R);
  moe_forward(y, acts, x, p, c, R, &sc.ws);
  return acts;
}

}  // namespace

MoeActs moe_layer_forward(float* y, double* balance_loss, const float* x, const MoeParams& p,
                          const MoeConfig& c, int64_t B, int64_t T, double alpha) {
  check_balance_alpha(alpha, "moe_forward");
  const int64_t R = B * T;
  const MoeActs acts = forward(y, x, p, c, R);
  if (balance_loss)
    *balance_loss = alpha > 0 && R > 0
                        ? seq_balance_loss_forward(acts.scores, acts.topk_idx, B, T,
                                                   c.n_routed_experts, c.num_experts_per_tok,
                                                   alpha)
                        : 0.0;
  return acts;
}

void moe_layer_backward(float* dx, const MoeGrads& g, const float* dy, const float* x,
                        const MoeParams& p, const MoeConfig& c, int64_t B, int64_t T,
                        double alpha) {
  check_balance_alpha(alpha, "moe_backward");
  const int64_t R = B * T, E = c.n_routed_experts;
  check_finite(x, R * c.hidden_size, "moe_backward", "x");  // named as this call, not the forward
  std::vector<float> y((size_t)(R * c.hidden_size));
  const MoeActs acts = forward(y.data(), x, p, c, R);
  std::vector<float> d_scores;
  if (alpha > 0 && R > 0) {
    d_scores.assign((size_t)(R * E), 0.f);
    seq_balance_loss_backward(d_scores.data(), 1.0, acts.scores, acts.topk_idx, B, T, E,
                              c.num_experts_per_tok, alpha);
  }
  moe_backward(dx, g, dy, d_scores.empty() ? nullptr : d_scores.data(), acts, x, p, c, R,
               &layer_scratch().ws);
}

}  // namespace dsv3
