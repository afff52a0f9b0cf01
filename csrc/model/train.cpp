#include "model/train.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/check.h"
#include "kernels/balance.h"

namespace dsv3 {

Trainer::Trainer(Model& model, bool bf16_moments) : model_(model), bf16_(bf16_moments) {
  const size_t n = (size_t)model.layout().total;
  mode_.assign(n, 0);
  for (const ParamEntry& e : model.layout().entries)
    if (e.trainable)
      std::fill(mode_.begin() + e.offset, mode_.begin() + e.offset + e.size, e.decay ? 2 : 1);
  if (bf16_) {
    m16.assign(n, 0);
    v16.assign(n, 0);
  } else {
    m32.assign(n, 0.f);
    v32.assign(n, 0.f);
  }
}

TrainStepStats Trainer::step(const int64_t* tokens, int64_t B, int64_t N,
                             const TrainStepOptions& o) {
  const char* op = "Trainer.step";
  DSV3_CHECK(B >= 1 && N >= 2, "[", op, "] batch must be (B, T+1) with T+1 >= 2 tokens per ",
             "sequence, got B=", B, " T+1=", N);
  DSV3_CHECK(o.grad_accum >= 1 && B % o.grad_accum == 0, "[", op, "] grad_accum (",
             o.grad_accum, ") must be >= 1 and divide the batch size ", B);
  const ParamLayout& L = model_.layout();
  const int64_t E = model_.config().E, A = o.grad_accum, Bm = B / A;
  grads_.assign((size_t)L.total, 0.f);
  TrainStepStats st;
  // A rank whose local work fails tells the others before they wait for its gradients: every
  // rank then raises (the failing one its own error) instead of hanging in the all-reduce.
  std::string failure;
  try {
    for (int64_t a = 0; a < A; ++a) {
      const LossParts lp = model_.loss(tokens + a * Bm * N, Bm, N, grads_.data(), o.alpha,
                                       o.mtp_weight, o.precision,
                                       ep_.group || ep_.fp8_dispatch ? &ep_ : nullptr);
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
  } catch (const std::exception& e) {
    if (!par_ || par_->world->size() == 1) throw;
    failure = e.what();
  }
  if (par_ && par_->world->size() > 1) {
    int64_t failed[2] = {failure.empty() ? 0 : 1, failure.empty() ? 0 : par_->world->rank()};
    par_->world->allreduce_sum(failed, 2);
    if (!failure.empty()) throw std::runtime_error(failure);
    if (failed[0] > 0)
      throw std::runtime_error(str_cat("[Trainer.step] ", failed[0], " rank(s) failed this step ",
                                       "(e.g. rank ", failed[1], " if only one); nothing applied"));
  }
  if (A > 1) scale_inplace(grads_.data(), L.total, 1.f / (float)A);
  reduce_over_world(st, L.total);
  // Frozen entries (the gate biases) have no gradient: their slots stay 0, so the norm over
  // the whole slab is the norm over the trainable entries (one parallel pass).
  st.grad_norm = std::sqrt(sum_squares(grads_.data(), L.total));
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

void Trainer::set_parallel(std::shared_ptr<ParallelGroups> g, bool fp8_dispatch) {
  if (g) {
    const int64_t E = model_.config().E;
    DSV3_CHECK(g->layout.ep == 1 || (E > 0 && E % g->layout.ep == 0), "[Trainer] ep (",
               g->layout.ep, ") must divide n_routed_experts (", E, ")");
  }
  par_ = std::move(g);
  ep_ = ExpertParallel{};
  ep_.group = par_ && par_->layout.ep > 1 ? par_->ep_group.get() : nullptr;
  ep_.fp8_dispatch = fp8_dispatch;
}

void Trainer::reduce_over_world(TrainStepStats& st, int64_t n) {
  if (!par_ || par_->world->size() == 1) return;
  Comm& w = *par_->world;
  const double W = (double)w.size();
  w.allreduce_sum(grads_.data(), n);
  scale_inplace(grads_.data(), n, (float)(1.0 / W));
  double parts[4] = {st.loss, st.main, st.mtp, st.balance};
  w.allreduce_sum(parts, 4);
  st.loss = parts[0] / W;
  st.main = parts[1] / W;
  st.mtp = parts[2] / W;
  st.balance = parts[3] / W;
  if (!st.expert_load.empty()) w.allreduce_sum(st.expert_load.data(), (int64_t)st.expert_load.size());
}

}  // namespace dsv3
