// The expert-shard half of the parallel Trainer (train.h, model/shard.h):
//
//   shard      with ep > 1, set_parallel shards an unsharded model (the weights, moments and
//              decay modes of the other EP ranks' experts are dropped); a model built as a
//              shard (Model(c, seed, shard), a checkpoint loaded into an EP rank) must be this
//              rank's shard
//   ranges     the gradient slab as ranges of consecutive entries of one kind: per main block
//              (all-reduced as soon as its backward is done, train_parallel.cpp) and the rest;
//              a sharded model's routed experts form their own ranges, summed over the DP
//              group (the ranks of the same EP index hold the same experts), the others over
//              the world. (Summing the experts over the world as before, zeros of the
//              non-owners included, gives the same bits: x + 0 = x.)
//   norm       ||g||^2 = replicated part (identical on every rank) + the EP group's sum of
//              each rank's owned-expert part (identical inside a DP group, so every rank
//              computes the same norm and takes the same step)
//   gather     full-layout copies of the weights, moments and gradients for checkpoints and
//              tests: every EP rank contributes its experts (gather_expert_shards), on the
//              communication thread when there is one; a checkpoint's copy goes to world
//              rank 0 only (to_main), so no other rank ever holds the whole model.
#include <algorithm>
#include <cstdlib>
#include <new>

#include "core/check.h"
#include "model/train.h"

namespace dsv3 {

void Trainer::use_shard(const ExpertShard& want) {
  check_model("Trainer");
  const ExpertShard have = model_.expert_shard();
  if (have.sharded()) {
    DSV3_CHECK(have.ep == want.ep && have.index == want.index, "[Trainer] the model holds the ",
               "routed experts of EP rank ", have.index, " of ep=", have.ep, ", but parallel ",
               "puts this rank at EP index ", want.index, " of ep=", want.ep);
    return;
  }
  if (!want.sharded()) return;
  const ParamLayout full = model_.layout();
  const auto remap = [&](auto& v, const ParamLayout& L) {
    if (v.empty()) return;
    std::remove_reference_t<decltype(v)> out((size_t)L.total, 0);
    copy_entries(full, v.data(), L, out.data());
    v.swap(out);
  };
  model_.shard_experts(want);
  shard_ = want;
  const ParamLayout& L = model_.layout();
  remap(m32, L);
  remap(v32, L);
  remap(m16, L);
  remap(v16, L);
  remap(mode_, L);
  grads_.clear();
  grads_.shrink_to_fit();
  full_layout_ = full;
}

void Trainer::build_grad_ranges() {
  const ParamLayout& L = model_.layout();
  const int64_t layers = model_.config().layers;
  const bool split = sharded();
  block_range_.assign((size_t)layers, {});
  rest_range_.clear();
  int64_t prev = -1;
  for (size_t k = 0; k < L.entries.size(); ++k) {
    const ParamEntry& e = L.entries[k];
    DSV3_CHECK(e.offset > prev, "[Trainer] slab entries out of offset order");
    prev = e.offset;
    const int64_t lo = e.offset, hi = k + 1 < L.entries.size() ? L.entries[k + 1].offset : L.total;
    const bool experts = split && e.expert >= 0;
    auto& v = e.block >= 0 && e.block < layers ? block_range_[(size_t)e.block] : rest_range_;
    if (!v.empty() && v.back().hi == lo && v.back().experts == experts)
      v.back().hi = hi;
    else
      v.push_back({lo, hi, experts});
  }
}

void Trainer::reduce_range(const GradRange& r) {
  Comm& c = r.experts ? *par_->dp_group : *par_->world;
  if (c.size() > 1 && r.hi > r.lo) c.allreduce_sum(grads_.data() + r.lo, r.hi - r.lo);
}

double Trainer::grad_sum_squares() {
  const int64_t n = model_.layout().total;
  if (!sharded() || !par_) return sum_squares(grads_.data(), n);
  double rep = 0, ex = 0;
  const auto add = [&](const GradRange& r) {
    (r.experts ? ex : rep) += sum_squares(grads_.data() + r.lo, r.hi - r.lo);
  };
  for (const auto& b : block_range_)
    for (const GradRange& r : b) add(r);
  for (const GradRange& r : rest_range_) add(r);
  world_call([&] { par_->ep_group->allreduce_sum(&ex, 1); });
  return rep + ex;
}

namespace {
template <class T>
std::vector<T> gather_slab(const Trainer& t, const ParallelGroups* par, const Model& m,
                           const ParamLayout& full, const std::vector<T>& local, bool to_main,
                           const std::function<void(const std::function<void()>&)>& call,
                           const std::function<void(std::exception_ptr)>& agree) {
  t.check_model("Trainer");
  if (!t.sharded()) return to_main && par && par->world->rank() != 0 ? std::vector<T>{} : local;
  DSV3_CHECK(par, "[Trainer] a sharded model's full weights need its parallel groups");
  DSV3_CHECK((int64_t)local.size() == m.layout().total, "[Trainer] slab of ", local.size(),
             " elements, expected ", m.layout().total);
  // world rank 0's EP group is ranks [0, ep) (groups.cpp): with to_main the others only agree
  const bool skip = to_main && par->world->rank() >= par->ep_group->size();
  const bool receives = !to_main || par->world->rank() == 0;
  std::vector<T> out;
  std::exception_ptr error;
  try {
    // tests: DSV3_TEST_FAIL_GATHER_RANK=r makes world rank r fail a save's gather here as if
    // out of memory
    static const char* fail = std::getenv("DSV3_TEST_FAIL_GATHER_RANK");
    if (to_main && fail && *fail && std::atoi(fail) == par->world->rank()) throw std::bad_alloc();
    out.resize(receives ? (size_t)full.total : 0);
  } catch (...) {
    error = std::current_exception();
  }
  agree(error);  // a rank that cannot hold the copy stops every rank before the collective
  if (skip) return {};
  call([&] {
    gather_expert_shards(*par->ep_group, full, m.config().E, m.layout(), local.data(),
                         receives ? out.data() : nullptr, sizeof(T), to_main);
  });
  return out;
}
}  // namespace

std::vector<float> Trainer::gather_full(const std::vector<float>& local, bool to_main) {
  return gather_slab(*this, par_.get(), model_, full_layout(), local, to_main,
                     [this](const std::function<void()>& f) { world_call(f); },
                     [this](std::exception_ptr e) { world_agree("Trainer", e); });
}
std::vector<uint16_t> Trainer::gather_full(const std::vector<uint16_t>& local, bool to_main) {
  return gather_slab(*this, par_.get(), model_, full_layout(), local, to_main,
                     [this](const std::function<void()>& f) { world_call(f); },
                     [this](std::exception_ptr e) { world_agree("Trainer", e); });
}

LossParts Trainer::eval_loss(const int64_t* tokens, int64_t B, int64_t N, double alpha,
                             double mtp_weight) {
  check_model("Trainer.evaluate");
  const ExpertParallel saved = ep_;  // an evaluation does not count in the step statistics
  ExpertParallel* ep = ep_.group || ep_.fp8_dispatch ? &ep_ : nullptr;
  LossParts lp;
  try {
    lp = model_.loss(tokens, B, N, nullptr, alpha, mtp_weight, GemmPrecision::fp32, ep);
  } catch (...) {
    ep_ = saved;
    throw;
  }
  ep_ = saved;
  return lp;
}

}  // namespace dsv3
