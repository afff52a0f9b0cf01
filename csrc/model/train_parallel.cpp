// The parallel half of Trainer::step (train.h, dist/comm.h):
//
//   failure agreement  after the last micro-batch's forward every rank tells whether its
//                      local work failed (one int64 all-reduce); a failed rank's error is
//                      raised on every rank instead of leaving them waiting for it. With ep > 1
//                      the layers themselves communicate, and a failure after the agreement
//                      (in the last backward) leaves collectives unmatched: then the job is
//                      aborted (MPI_Abort), never left hanging.
//   overlap            during the last micro-batch's backward, block l's gradient slice is
//                      all-reduced on the communication thread as soon as block l is done,
//                      while blocks l-1, ... run; the rest of the slab (embedding, norm, head,
//                      MTP modules) and the statistics follow after the backward.
//   scaling            grads = (sum over ranks and micro-batches) * 1/(A W): the mean loss's
//                      gradient over the global batch.
#include <chrono>
#include <cstdio>
#include <stdexcept>

#include "core/check.h"
#include "model/train.h"

namespace dsv3 {

namespace {
double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

void Trainer::set_parallel(std::shared_ptr<ParallelGroups> g, bool fp8_dispatch) {
  if (g) {
    const int64_t E = model_.config().E;
    DSV3_CHECK(g->layout.ep == 1 || (E > 0 && E % g->layout.ep == 0), "[Trainer] ep (",
               g->layout.ep, ") must divide n_routed_experts (", E, ")");
  }
  par_ = std::move(g);
  ep_ = ExpertParallel{};
  ep_.fp8_dispatch = fp8_dispatch;
  queue_.reset();
  ep_queued_.reset();
  block_range_.clear();
  rest_range_.clear();
  if (!par_ || par_->world->size() == 1) return;
  queue_ = std::make_shared<CommQueue>();
  if (par_->layout.ep > 1) {
    ep_queued_ = std::make_shared<QueuedComm>(par_->ep_group, queue_);
    ep_.group = ep_queued_.get();
  }
  // Slab ranges: main block l's entries are contiguous (layout.h); the rest in between.
  const ParamLayout& L = model_.layout();
  const int64_t layers = model_.config().layers;
  block_range_.assign((size_t)layers, {L.total, 0});
  for (const ParamEntry& e : L.entries)
    if (e.block >= 0 && e.block < layers) {
      auto& r = block_range_[(size_t)e.block];
      r.first = std::min(r.first, e.offset);
      r.second = std::max(r.second, e.offset + e.size);
    }
  int64_t at = 0;
  for (const auto& r : block_range_) {
    DSV3_CHECK(r.first >= at, "[Trainer] block gradient ranges overlap");
    if (r.first > at) rest_range_.push_back({at, r.first});
    at = std::max(at, r.second);
  }
  if (at < L.total) rest_range_.push_back({at, L.total});
}

void Trainer::agree(ParallelStep& ps, bool failed_here) {
  ps.agreed = true;
  int64_t failed[2] = {failed_here ? 1 : 0, failed_here ? par_->world->rank() : 0};
  queue_->run([&] { par_->world->allreduce_sum(failed, 2); });
  if (failed[0] > 0 && !failed_here)
    throw std::runtime_error(str_cat("[Trainer.step] ", failed[0], " rank(s) failed this step (",
                                     failed[0] == 1 ? "rank " : "ranks summing to ", failed[1],
                                     "); nothing was applied"));
}

LossHooks Trainer::parallel_hooks(ParallelStep& ps, bool last) {
  LossHooks h;
  if (!last) return h;
  h.forward_done = [this, &ps] { agree(ps, false); };
  h.block_grads_done = [this, &ps](int64_t l) {
    const auto r = block_range_[(size_t)l];
    if (r.second <= r.first) return;
    float* g = grads_.data() + r.first;
    const int64_t n = r.second - r.first;
    Comm* w = par_->world.get();
    ps.pending.push_back(queue_->submit([w, g, n] { w->allreduce_sum(g, n); }));
  };
  ps.busy0 = queue_->busy_seconds();
  return h;
}

void Trainer::parallel_failed(ParallelStep& ps, const std::string& what) {
  // past the agreement (or with the layers communicating) the others cannot be told: end all
  if (ps.agreed || par_->layout.ep > 1) {
    std::fprintf(stderr, "[dsv3 rank %d] training step failed: %s; aborting the job\n",
                 par_->world->rank(), what.c_str());
    std::fflush(stderr);
    for (auto& f : ps.pending) f.wait();
    mpi_abort(1);
    std::abort();  // mpi_abort does not return; in case MPI is not initialised
  }
  agree(ps, true);
  throw std::runtime_error(what);
}

void Trainer::reduce_over_world(ParallelStep& ps, TrainStepStats& st, float scale) {
  Comm& w = *par_->world;
  const double t0 = now();
  for (auto& f : ps.pending) f.get();
  for (const auto& r : rest_range_)
    queue_->run([&] { w.allreduce_sum(grads_.data() + r.first, r.second - r.first); });
  // the time the step was blocked on the gradient all-reduce, against its whole duration on
  // the communication thread (the difference ran behind the backward)
  st.allreduce_wait_seconds = now() - t0;
  st.allreduce_seconds = queue_->busy_seconds() - ps.busy0;
  scale_inplace(grads_.data(), model_.layout().total, scale);
  const double W = (double)w.size();
  double parts[4] = {st.loss, st.main, st.mtp, st.balance};
  queue_->run([&] { w.allreduce_sum(parts, 4); });
  st.loss = parts[0] / W;
  st.main = parts[1] / W;
  st.mtp = parts[2] / W;
  st.balance = parts[3] / W;
  if (!st.expert_load.empty())
    queue_->run([&] { w.allreduce_sum(st.expert_load.data(), (int64_t)st.expert_load.size()); });
}

}  // namespace dsv3
