// DeepSeekMoE routing (semantics §2.3): the gate that picks K of E routed experts per token.
//
// Legend:  T tokens (rows; B*T flattened)   D hidden size   E routed experts
//          K experts per token (num_experts_per_tok)   G groups (n_group)   Gk groups kept
//          (topk_group)   F moe_intermediate_size   S shared width = n_shared_experts * F
//
// Per token, in fp32:
//   logits = x W^T                                  x[T,D]  W[E,D] (gate.weight)
//   s      = sigmoid(logits) | softmax(logits)      (scoring_func)
//   s_sel  = s + b                                  b[E] (e_score_correction_bias; noaux_tc only,
//                                                   used for selection, never for the weights)
//   grouped methods (G > 1): group score = sum of the two largest s_sel of the group (noaux_tc)
//     or its max (group_limited_greedy); the Gk best groups are kept, the others' s_sel = -inf
//   idx    = topk(s_sel, K), sorted by decreasing s_sel, ties toward the lower index
//   w      = s[idx] (UNBIASED); if norm_topk_prob: w /= sum(w) + 1e-20; w *= routed_scaling_factor
// The selection is piecewise constant, so the backward flows through w = s[idx] only.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dsv3 {

// Hugging Face's topk_method: noaux_tc = DeepSeek-V3 (bias + top-2-sum groups); greedy =
// plain top-k (V2); group_limited_greedy = groups scored by their max (V2).
enum class TopkMethod { noaux_tc, greedy, group_limited_greedy };
enum class ScoringFunc { sigmoid, softmax };
// The config strings -> enums, the one mapping; unknown values throw std::invalid_argument
// ("[op] topk_method must be ...").
TopkMethod topk_method_from(const std::string& s, const char* op);
std::vector<std::string> topk_method_names();  // the strings topk_method_from accepts
ScoringFunc scoring_func_from(const std::string& s, const char* op);

struct MoeConfig {
  int64_t n_routed_experts = 0;     // E
  int64_t num_experts_per_tok = 0;  // K
  int64_t n_group = 1;              // G
  int64_t topk_group = 1;           // Gk
  TopkMethod topk_method = TopkMethod::noaux_tc;
  ScoringFunc scoring_func = ScoringFunc::sigmoid;
  bool norm_topk_prob = true;
  float routed_scaling_factor = 1.f;
  int64_t hidden_size = 0;            // D
  int64_t moe_intermediate_size = 0;  // F (width of one routed expert)
  int64_t n_shared_experts = 0;       // the shared expert is one SwiGLU of width S = n_shared * F

  int64_t shared_width() const { return n_shared_experts * moe_intermediate_size; }
  bool grouped() const { return n_group > 1 && topk_method != TopkMethod::greedy; }
  bool has_bias() const { return topk_method == TopkMethod::noaux_tc; }
};

// Throws std::invalid_argument ("[op] field ...") for an inconsistent config: K > E, G not
// dividing E, Gk > G, K more than the kept groups hold, noaux_tc groups of one expert, ...
void moe_config_check(const MoeConfig& c, const char* op);

// Throws NonFiniteError (core/check.h) naming `name` when a[0..n) holds a NaN or an infinity.
void check_finite(const float* a, int64_t n, const char* op, const char* name);

// topk_idx[T,K] (int64), topk_weight[T,K] and scores[T,E] = s (unbiased, saved for the
// backward and the balance loss). bias[E] must be given for noaux_tc and null otherwise.
void moe_gate_forward(int64_t* topk_idx, float* topk_weight, float* scores, const float* x,
                      const float* weight, const float* bias, const MoeConfig& c, int64_t T);

// Backward through w = rsf * s[idx] (/ (sum + 1e-20)) and s = sigmoid|softmax(x W^T):
//   d_scores_extra[T,E] (may be null) is an additional dL/ds, e.g. from the balance loss.
//   dx[T,D] += dlogits W ;  d_weight[E,D] += dlogits^T x      (either may be null)
void moe_gate_backward(float* dx, float* d_weight, const float* d_topk_weight,
                       const float* d_scores_extra, const float* scores, const int64_t* topk_idx,
                       const float* x, const float* weight, const MoeConfig& c, int64_t T);

}  // namespace dsv3
