// Load balancing of the routed experts (semantics §2.4): statistics, the aux-loss-free bias update
// and the sequence-wise balance loss.
//
// Legend:  B sequences   T tokens per sequence   E routed experts   K experts per token
//          topk_idx[B*T, K] (from the gate)   scores[B*T, E] = s (unbiased gate scores)
//
// Aux-loss-free balancing (DeepSeek-V3): after each optimizer step, with load_i the number of
// tokens routed to expert i in the whole step, b_i += gamma * sign(mean(load) - load_i).
// Overloaded experts become less attractive to the selection, underloaded ones more; the
// weights never see the bias. It is an update rule, not a gradient.
//
// Sequence-wise balance loss (complementary, tiny alpha), per sequence of T tokens:
//   f_i = E / (K T) * #{t : i in topk_t}      (constant w.r.t. the parameters)
//   P_i = (1/T) sum_t s'_{i,t},   s'_{i,t} = s_{i,t} / sum_j s_{j,t}
//   L_seq = alpha * sum_i f_i P_i ;   L = mean over the B sequences
// A perfectly balanced router has f_i = 1 and sum_i P_i = 1, so L = alpha.
#pragma once
#include <cstdint>

namespace dsv3 {

// Refuses alpha unless finite and >= 0 ("[op] balance_alpha must be ...").
void check_balance_alpha(double alpha, const char* op);

// load[E] = #{(t, k) : topk_idx[t, k] == i}   (overwritten; ids outside [0,E) -> out_of_range)
void expert_load(int64_t* load, const int64_t* topk_idx, int64_t R, int64_t K, int64_t E);

// MaxVio = max_i load_i / mean(load) - 1   (0 when the loads are all zero)
double max_violation(const int64_t* load, int64_t E);

// bias[E] += gamma * sign(mean(load) - load_i), in place (sign(0) = 0: an expert exactly at
// the mean keeps its bias). The comparison is exact (integers), so it is order-independent.
void update_expert_bias(float* bias, const int64_t* load, int64_t E, float gamma);

// L (the mean over sequences), accumulated in double. Both functions refuse a bad alpha, K
// outside [1, E] and non-finite scores (NonFiniteError).
double seq_balance_loss_forward(const float* scores, const int64_t* topk_idx, int64_t B,
                                int64_t T, int64_t E, int64_t K, double alpha);
// d_scores[B*T, E] += d_loss * dL/ds :   with g_i = alpha f_i / (T B),
//   dL/ds_{j,t} = (g_j - sum_i g_i s'_{i,t}) / sum_i s_{i,t}
void seq_balance_loss_backward(float* d_scores, double d_loss, const float* scores,
                               const int64_t* topk_idx, int64_t B, int64_t T, int64_t E,
                               int64_t K, double alpha);

}  // namespace dsv3
