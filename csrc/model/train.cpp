#include "model/train.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>

#include "core/check.h"
#include "kernels/balance.h"
#include "kernels/lowp_weights.h"

namespace dsv3 {

Trainer::Trainer(Model& model, bool bf16_moments)
    : model_(model), bf16_(bf16_moments), shard_(model.expert_shard()) {
  if (sharded()) full_layout_ = build_layout(model.config());
  reset_state();
}

void Trainer::check_model(const char* op) const {
  const ExpertShard& now = model_.expert_shard();
  if (now.ep != shard_.ep || now.index != shard_.index)  // a state error, not a bad argument
    throw std::runtime_error(str_cat(
        "[", op, "] the model was made an expert shard (EP rank ", now.index, " of ep=", now.ep,
        ") after this Trainer was created for it (by another Trainer given the same model with ",
        "a parallel layout): this Trainer's moments no longer match the model; use that ",
        "Trainer, or build a new one (Trainer(model, config, parallel=...))"));
}

void Trainer::reset_state() {
  const size_t n = (size_t)model_.layout().total;
  mode_.assign(n, 0);
  for (const ParamEntry& e : model_.layout().entries)
    if (e.trainable)
      std::fill(mode_.begin() + e.offset, mode_.begin() + e.offset + e.size, e.decay ? 2 : 1);
  m32.clear();
  v32.clear();
  m16.clear();
  v16.clear();
  if (bf16_) {
    m16.assign(n, 0);
    v16.assign(n, 0);
  } else {
    m32.assign(n, 0.f);
    v32.assign(n, 0.f);
  }
  m32.shrink_to_fit();
  v32.shrink_to_fit();
  m16.shrink_to_fit();
  v16.shrink_to_fit();
}

TrainStepStats Trainer::step(const int64_t* tokens, int64_t B, int64_t N,
                             const TrainStepOptions& o) {
  const char* op = "Trainer.step";
  check_model(op);
  DSV3_CHECK(B >= 1 && N >= 2, "[", op, "] batch must be (B, T+1) with T+1 >= 2 tokens per ",
             "sequence, got B=", B, " T+1=", N);
  DSV3_CHECK(o.grad_accum >= 1 && B % o.grad_accum == 0, "[", op, "] grad_accum (",
             o.grad_accum, ") must be >= 1 and divide the batch size ", B);
  const ParamLayout& L = model_.layout();
  const int64_t E = model_.config().E, A = o.grad_accum, Bm = B / A;
  grads_.assign((size_t)L.total, 0.f);
  TrainStepStats st;
  const bool par = par_ && par_->world->size() > 1;
  ParallelStep ps;  // the parallel bookkeeping of this step (train_parallel.cpp)
  const double ep_seconds0 = ep_.comm_seconds;
  // Q(W) (fp8) once per step; with several micro-batches the packed panels too (lowp_weights.h)
  std::unique_ptr<LowpWeightCache> weights;
  if (o.precision != GemmPrecision::fp32) weights = std::make_unique<LowpWeightCache>(A > 1);
  try {
    for (int64_t a = 0; a < A; ++a) {
      LossHooks hooks;
      if (par) hooks = parallel_hooks(ps, a == A - 1);
      const LossParts lp = model_.loss(tokens + a * Bm * N, Bm, N, grads_.data(), o.alpha,
                                       o.mtp_weight, o.precision,
                                       ep_.group || ep_.fp8_dispatch ? &ep_ : nullptr,
                                       par ? &hooks : nullptr, weights.get());
      st.loss += lp.loss / (double)A;
      st.main += lp.main / (double)A;
      st.mtp += lp.mtp / (double)A;
      st.balance += lp.balance / (double)A;
      if (a == 0) {
        st.moe_blocks = lp.moe_blocks;
        st.expert_load.assign(lp.expert_load.size(), 0);
      }
      for (size_t i = 0; i < lp.expert_load.size(); ++i) st.expert_load[i] += lp.expert_load[i];
    }
  } catch (...) {
    if (!par) throw;
    parallel_failed(ps, std::current_exception());  // raises on every rank, or aborts the job
  }
  if (par) {
    reduce_over_world(ps, st, (float)(1.0 / ((double)A * par_->world->size())));
    st.dispatch_seconds = ep_.comm_seconds - ep_seconds0;
  }
  else if (A > 1)
    scale_inplace(grads_.data(), L.total, 1.f / (float)A);
  // Frozen entries (the gate biases) have no gradient: their slots stay 0, so the norm over
  // the whole slab is the norm over the trainable entries (one parallel pass; a sharded
  // model adds the other EP ranks' experts).
  st.grad_norm = std::sqrt(grad_sum_squares());
  st.finite = std::isfinite(st.loss) && std::isfinite(st.grad_norm);
  if (!st.finite) return st;
  if (o.grad_clip > 0 && st.grad_norm > o.grad_clip)
    scale_inplace(grads_.data(), L.total, (float)(o.grad_clip / (st.grad_norm + 1e-6)));

  AdamWParams p;
  p.lr = o.lr;
  p.beta1 = o.beta1;
  p.beta2 = o.beta2;
  p.eps = o.eps;
  p.weight_decay = o.weight_decay;
  p.step = steps_done + 1;
  float* w = model_.params().data();
  if (bf16_)
    adamw_update_bf16(w, grads_.data(), m16.data(), v16.data(), L.total, p, mode_.data());
  else
    adamw_update(w, grads_.data(), m32.data(), v32.data(), L.total, p, mode_.data());
  if (o.gamma > 0 && E > 0) {
    const std::vector<float*> bias = model_.expert_biases();
    for (int64_t j = 0; j < st.moe_blocks && j < (int64_t)bias.size(); ++j)
      if (bias[j]) update_expert_bias(bias[j], st.expert_load.data() + j * E, E, o.gamma);
  }
  ++steps_done;
  return st;
}

}  // namespace dsv3
