// The DeepSeekMoE layer (semantics §2.3): gate, dispatch, routed SwiGLU experts, weighted combine,
// shared expert. No token dropping, no capacity factor.
//
// Legend:  T tokens   D hidden   E routed experts   K experts per token   F routed expert width
//          (moe_intermediate_size)   S shared width (n_shared_experts * F)
//          N = T*K dispatched rows
//
//   y[t] = Shared(x[t]) + sum_{k<K} w[t,k] * Expert_{idx[t,k]}(x[t])
//   Expert(x) = down_proj(silu(gate_proj x) * up_proj x)     gate/up [F,D], down [D,F]
//   Shared(x) likewise with gate/up [S,D], down [D,S]
//
// Dispatch: a counting sort of the N (token, choice) slots by expert, stable in t then k, gives
// each expert a contiguous block of rows (expert_offset[e] .. expert_offset[e+1]). Each
// expert's gathered rows go through three GEMMs, not a per-token loop. The combine adds the
// K expert outputs of a token in k order, so y is deterministic.
//
// Threads (core/parallel.h policy): the E routed experts and the shared expert are work items
// weighed by their rows. An item holding more than 1/threads of all rows runs alone with
// threaded BLAS; the others are claimed by the threads, largest first, and run with
// single-threaded BLAS inside. Each item writes only its own outputs, so the claiming order
// does not change any value: for a given thread count the results are bit-identical run to
// run (no atomics in float reductions; the only atomic is the work counter).
//
// Names are Hugging Face's, relative to the layer (`model.layers.{i}.mlp.`): gate.weight,
// gate.e_score_correction_bias, experts.{j}.{gate,up,down}_proj.weight,
// shared_experts.{gate,up,down}_proj.weight. Structs hold pointers into the caller's slabs.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/mlp.h"
#include "kernels/moe_ep.h"
#include "kernels/moe_gate.h"

namespace dsv3 {

struct MoeParams {
  const float* gate_weight = nullptr;                   // gate.weight [E,D]
  const float* gate_e_score_correction_bias = nullptr;  // [E], noaux_tc only (else null)
  std::vector<SwiGluParams> experts;                    // E entries, width F
  SwiGluParams shared_experts;                          // width S (unused when S == 0)
  LinearMode precision = LinearMode();  // of every expert's projections (not the router
                                        // gate, always fp32; precision.h)
  ExpertParallel* ep = nullptr;  // expert-parallel training (moe_ep.h); null: all experts here
};
// The correction bias gets no gradient (it is moved by update_expert_bias, balance.h).
struct MoeGrads {
  float* gate_weight = nullptr;
  std::vector<SwiGluGrads> experts;  // empty, or E entries
  SwiGluGrads shared_experts;
};

// What the forward saves for the backward: views into caller memory (see moe_acts_view).
struct MoeActs {
  int64_t* topk_idx = nullptr;       // [T,K]
  float* topk_weight = nullptr;      // [T,K]
  float* scores = nullptr;           // [T,E]  s, unbiased (also feeds the balance loss)
  int64_t* expert_count = nullptr;   // [E]    rows per expert (this call's load)
  int64_t* expert_offset = nullptr;  // [E+1]  start of each expert's block
  int64_t* dispatch_slot = nullptr;  // [N]    dispatched row p holds slot t*K+k
  int64_t* slot_row = nullptr;       // [N]    slot t*K+k -> its dispatched row
  float* expert_gate = nullptr;      // [N,F]  gate_proj output per dispatched row
  float* expert_up = nullptr;        // [N,F]  up_proj output per dispatched row
  float* shared_gate = nullptr;      // [T,S]
  float* shared_up = nullptr;        // [T,S]
  MoeEpState* ep_state = nullptr;    // expert parallel (MoeParams::ep): the owner's saved rows
};
struct MoeActsSize {
  int64_t floats, ints;
};
MoeActsSize moe_acts_size(const MoeConfig& c, int64_t T);
// Carves MoeActs out of f[floats] and i[ints] (sizes from moe_acts_size).
MoeActs moe_acts_view(float* f, int64_t* i, const MoeConfig& c, int64_t T);

// Scratch reused between calls (N*D floats: the routed outputs in the forward, the routed
// input gradients in the backward). Optional: without one each call allocates its own, and
// fresh buffers of this size are page-faulted in on every call.
struct MoeWorkspace {
  std::vector<float> rows;
};

// Validates the config (moe_config_check plus F >= 1, n_shared >= 0) and that every weight
// pointer the config needs is present.
void moe_layer_check(const MoeConfig& c, const MoeParams& p, const char* op);

// y[T,D] (overwritten); fills acts. x must be finite (std::invalid_argument otherwise).
void moe_forward(float* y, const MoeActs& acts, const float* x, const MoeParams& p,
                 const MoeConfig& c, int64_t T, MoeWorkspace* ws = nullptr);

// Gradients of L given dy = dL/dy, ACCUMULATED: dx[T,D] (may be null), every non-null member
// of grads. d_scores_extra[T,E] (may be null) is an extra dL/ds added before the gate's
// backward, e.g. seq_balance_loss_backward's output. acts are those of the forward of x.
void moe_backward(float* dx, const MoeGrads& grads, const float* dy, const float* d_scores_extra,
                  const MoeActs& acts, const float* x, const MoeParams& p, const MoeConfig& c,
                  int64_t T, MoeWorkspace* ws = nullptr);

}  // namespace dsv3
