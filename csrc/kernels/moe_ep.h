// Expert parallelism of the DeepSeekMoE layer (moe.h): the routed experts of a layer are
// computed by the EP ranks that own them (dist/comm.h), tokens travel there and back.
//
// Legend:  ep EP ranks   q an EP rank   El = E/ep experts per rank (rank q owns experts
//          [q*El, (q+1)*El))   N = T*K dispatched rows of this rank   Nr rows it receives
//
// Forward, on every rank of the EP group at once (moe_forward calls moe_ep_forward after its
// gate and counting sort; rows sorted by expert are sorted by owner too):
//   counts   all-to-all of expert_count[q*El .. +El) to rank q: q learns how many rows each
//            source sends for each of its experts
//   dispatch all-to-all of the rows [x_t | w_tk] (w: the routing weight, kept for the
//            backward), in dispatch order; with fp8_dispatch x_t travels as E4M3 codes with a
//            scale per 1x128 tile (DeepSeek-V3's dispatch: ~half the bytes of bf16), the
//            owner computes on the dequantized values
//   experts  the owner regroups the received rows expert-major (expert j: source 0's rows,
//            then source 1's, ...: a fixed order), runs its El experts as batched GEMMs
//            (moe_run_experts, the same code as single-process) and saves x, w, gate, up
//   combine  all-to-all of the expert outputs back, in the order received: the sender gets
//            ye[N, D] in its dispatch order and combines in k order as single-process does
// Backward: dispatch the unweighted row gradients dY (fp32), the owner runs the experts'
// backward (moe_run_experts_backward: expert weight gradients, dL/dw_tk, dx rows), and returns
// [dx | dL/dw] rows the same way. The fp8 dispatch is a forward quantization only; its backward
// is the identity (straight-through), as in DeepSeek-V3's FP8 framework where the dispatched
// activations are the FP8 inputs of the expert GEMMs.
// Results equal the single-process layer up to fp32 reassociation (each expert now sums a
// differently ordered set of rows; with fp8_dispatch, up to the quantization of x).
#pragma once
#include <cstdint>
#include <vector>

#include "dist/comm.h"
#include "kernels/mlp.h"

namespace dsv3 {

struct MoeActs;
struct MoeParams;
struct MoeGrads;
struct MoeConfig;

// The EP context of a training step (owned by the Trainer; one per process).
struct ExpertParallel {
  Comm* group = nullptr;      // the EP group (ParallelGroups::ep_group)
  bool fp8_dispatch = false;  // dispatch activations as E4M3 with 1x128 tile scales
  int size() const { return group ? group->size() : 1; }
  // statistics since the last reset (forwards only)
  int64_t tokens = 0, rank_visits = 0;  // rank_visits: sum over tokens of distinct owner ranks
  int64_t dispatch_bytes = 0, combine_bytes = 0;  // bytes this rank sent to other ranks
  double comm_seconds = 0;  // inside the dispatch/combine collectives (forward and backward)
};

// What one layer's forward keeps for the backward (owner side, expert-major rows).
struct MoeEpState {
  int64_t El = 0, Nr = 0;
  std::vector<int64_t> recv_cnt;        // [ep*El] rows source q sends for local expert j
  std::vector<int64_t> perm;            // [Nr] expert-major row -> source-major received row
  std::vector<int64_t> count, offset;   // [El], [El+1] expert-major blocks
  std::vector<int64_t> ident;           // [Nr] 0..Nr-1 (the dispatch of the local rows)
  std::vector<float> x, w, gate, up;    // [Nr,D] [Nr] [Nr,F] [Nr,F]
};

// Step 3 of moe_forward for routed experts [0, E) of acts a over token rows x (dispatched row
// p is x[dispatch_slot[p] / K]) and the shared expert (when shared is set; writes y_shared).
void moe_run_experts(float* ye, float* y_shared, const MoeActs& a, const float* x, int64_t K,
                     int64_t E, const SwiGluParams* experts, const SwiGluParams* shared,
                     int64_t T, int64_t D, int64_t F, int64_t S, const LinearMode& prec);
// Its backward: dxs[N,D] routed input gradients per dispatched row (set; may be null),
// dx_shared += the shared expert's (may be null), d_topk_weight[slot] = dL/dw.
void moe_run_experts_backward(float* dxs, float* dx_shared, float* d_topk_weight,
                              const SwiGluGrads* expert_grads, const SwiGluGrads* shared_grads,
                              const float* dy, const MoeActs& a, const float* x, int64_t K,
                              int64_t E, const SwiGluParams* experts,
                              const SwiGluParams* shared, int64_t T, int64_t D, int64_t F,
                              int64_t S, const LinearMode& prec);

// The values the experts compute on with fp8_dispatch: Q(x) dequantized, E4M3 with one scale
// per 1x128 tile of each row (fp8.h's quantizer). With ep == 1 (one process) moe_forward
// uses them to emulate the dispatch exactly.
std::vector<float> fp8_dispatch_values(const float* x, int64_t T, int64_t D);

// ye[N,D] = the routed experts' outputs of this rank's dispatched rows (a: after dispatch).
void moe_ep_forward(float* ye, const MoeActs& a, const float* x, const MoeParams& p,
                    const MoeConfig& c, int64_t T);
// dxs[N,D] (may be null) and d_topk_weight[N] of this rank's rows; the owned experts' weight
// gradients are accumulated into g.experts (others untouched).
void moe_ep_backward(float* dxs, float* d_topk_weight, const MoeGrads& g, const float* dy,
                     const MoeActs& a, const MoeParams& p, const MoeConfig& c, int64_t T);

}  // namespace dsv3
