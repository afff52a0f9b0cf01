// One training step of the model, entirely in C++ (called with the GIL released):
//
//   grads = 0
//   for each of the A micro-batches (B/A sequences each):  grads += d(loss_micro)/dw
//   grads /= A                       (the gradient of the mean loss over the B sequences)
//   norm  = ||grads||_2 over the trainable entries;  if clip > 0 and norm > clip:
//           grads *= clip / (norm + 1e-6)                      (torch.nn.utils.clip_grad_norm_)
//   AdamW (optim.h) on every trainable entry, weight decay on the `decay` entries only
//   parallel (dist/comm.h, set_parallel): each rank runs the lines above on its own micro-batches;
//           grads, the loss parts and the expert loads are summed over the world before the
//           norm (grads and losses then divided by W), so every rank takes the same step
//   aux-free balancing (semantics §2.4), gamma > 0:  per MoE block, with load = the tokens routed
//           to each expert over the whole step,  b_i += gamma * sign(mean(load) - load_i)
//
// The linear layers' GEMMs run in `precision` (precision.h) for the whole step. A step whose
// loss or gradient norm is not finite changes nothing (weights, moments, biases, step count)
// and reports finite = false, so the caller can stop with the last good state intact.
#pragma once
#include <cstdint>
#include <exception>
#include <functional>
#include <future>
#include <string>
#include <utility>
#include <shared_mutex>
#include <vector>

#include "dist/comm.h"
#include "dist/comm_queue.h"
#include "kernels/moe_ep.h"
#include "kernels/optim.h"
#include "kernels/precision.h"
#include "model/model.h"

namespace dsv3 {

struct TrainStepOptions {
  float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.1f;
  float grad_clip = 1.f;      // <= 0: no clipping
  int64_t grad_accum = 1;     // micro-batches per step; must divide B
  double alpha = 0;           // sequence-wise balance loss weight (0: off)
  double mtp_weight = 0;      // lambda
  float gamma = 0;            // aux-free bias update speed (0: biases untouched)
  GemmPrecision precision = GemmPrecision::fp32;
};

struct TrainStepStats {
  double loss = 0, main = 0, mtp = 0, balance = 0, grad_norm = 0;
  // parallel: seconds the communication thread spent in the gradient all-reduce, and
  // seconds the step waited for it after its backward (the rest was hidden behind compute)
  double allreduce_seconds = 0, allreduce_wait_seconds = 0;
  double dispatch_seconds = 0;  // inside expert dispatch/combine calls (ep > 1)
  std::vector<int64_t> expert_load;  // [moe_blocks, E], summed over the micro-batches
  int64_t moe_blocks = 0;
  bool finite = true;
};

class Trainer {
 public:
  Trainer(Model& model, bool bf16_moments);

  TrainStepStats step(const int64_t* tokens, int64_t B, int64_t N, const TrainStepOptions& o);

  Model& model() { return model_; }
  // Data/expert-parallel training over these groups (null: single process).
  // With ep > 1 the routed experts are computed by their owners (kernels/moe_ep.h) and
  // held only there (model/shard.h): an unsharded model is sharded here (its other experts,
  // their moments, freed); a sharded one must be the shard of this rank's EP index.
  void set_parallel(std::shared_ptr<ParallelGroups> g, bool fp8_dispatch);
  // ---- expert shards (train_shard.cpp)
  bool sharded() const { return model_.expert_shard().sharded(); }
  // The full model's layout (the model's own when not sharded).
  const ParamLayout& full_layout() const { return sharded() ? full_layout_ : model_.layout(); }
  // The full-layout copy of a slab (a sharded model: collective over the EP group). to_main:
  // only world rank 0 gets it (for the checkpoint it writes); the other ranks get an empty
  // vector, and the EP groups without rank 0 do not communicate at all. Collective over the
  // EP group when sharded (every EP rank calls it at the same point); a copy otherwise.
  std::vector<float> gather_full(const std::vector<float>& local, bool to_main = false);
  std::vector<uint16_t> gather_full(const std::vector<uint16_t>& local, bool to_main = false);
  // A full-layout slab (checkpointed moments) mapped onto this model's layout.
  template <class T>
  void from_full(const T* full, std::vector<T>& local) const {
    copy_entries(full_layout(), full, model_.layout(), local.data());
  }
  // The loss of tokens[B,N] without gradients, through the EP context (a sharded model's
  // evaluation: collective over the EP group, like a step).
  LossParts eval_loss(const int64_t* tokens, int64_t B, int64_t N, double alpha,
                      double mtp_weight);
  const ParallelGroups* parallel() const { return par_.get(); }
  ExpertParallel& expert_parallel() { return ep_; }
  // The last step's gradient as applied (averaged over the global batch, clipped), slab layout.
  const std::vector<float>& last_gradients() const { return grads_; }
  bool bf16_moments() const { return bf16_; }
  // Throws std::runtime_error naming op when the model was made an expert shard behind this
  // Trainer's back (by another Trainer given the same model with ep > 1): its moments and
  // gradients are laid out for the model as it was, so no step, evaluation or state read
  // may use them.
  void check_model(const char* op) const;
  // Before a collective that some rank may not be able to enter (its guards refused, its
  // buffer could not be allocated): every rank of the world says whether it can (one
  // all-reduce); if any cannot, every rank throws std::runtime_error (that rank's own error
  // where it has one) instead of leaving the others waiting in the collective. No-op without
  // a parallel layout.
  void world_agree(const char* op, std::exception_ptr error_here);
  int64_t steps_done = 0;  // optimizer steps applied (AdamW's t of the next step is this + 1)
  // Moments in the parameter slab's layout (entries that are not trainable stay 0).
  std::vector<float> m32, v32;
  std::vector<uint16_t> m16, v16;
  // Concurrency (core/busy.h) of the Trainer's own state (moments, steps_done); a step also
  // holds the model exclusively. Taken by the bindings, never inside step().
  mutable std::shared_mutex busy;

 private:
  Model& model_;
  bool bf16_;
  std::vector<float> grads_;
  std::vector<uint8_t> mode_;  // per slab element: 0 frozen, 1 no decay, 2 decay (optim.h)
  // ---- parallel training (train_parallel.cpp)
  std::shared_ptr<ParallelGroups> par_;
  ExpertParallel ep_;
  std::shared_ptr<CommQueue> queue_;           // the communication thread
  std::shared_ptr<Comm> ep_queued_;            // the EP group, its calls run on queue_
  ParamLayout full_layout_;  // of the unsharded model (sharded models only)
  ExpertShard shard_;        // the model's shard when this Trainer's state was laid out
  // [lo, hi) of gradient slab; experts: an owned routed expert range (summed over the DP
  // group when sharded, else over the world)
  struct GradRange {
    int64_t lo, hi;
    bool experts;
  };
  std::vector<std::vector<GradRange>> block_range_;  // main block l's ranges
  std::vector<GradRange> rest_range_;                 // the slab outside the main blocks
  void use_shard(const ExpertShard& want);  // shards the model (and moments) if needed
  void build_grad_ranges();
  void reduce_range(const GradRange& r);  // the all-reduce of one range (its group)
  void reset_state();                     // mode_, moments for the model's layout (zeros)
  double grad_sum_squares();              // over the global model (EP group sum of experts)
  struct ParallelStep {
    bool agreed = false;  // the failure agreement of this step is done
    std::vector<std::shared_future<void>> pending;  // block all-reduces in flight
    double allreduce_busy = 0;  // their durations (written on the communication thread)
  };
  LossHooks parallel_hooks(ParallelStep& ps, bool last_micro_batch);
  [[noreturn]] void parallel_failed(ParallelStep& ps, std::exception_ptr error);
  void agree(ParallelStep& ps, bool failed_here);
  void world_call(const std::function<void()>& fn);  // on the queue when there is one
  // Sums the step's gradients (times scale) and statistics over the world.
  void reduce_over_world(ParallelStep& ps, TrainStepStats& st, float scale);
};

}  // namespace dsv3
