// The parallel half of Trainer::step (train.h, dist/comm.h):
//
//   failure agreement  after the last micro-batch's forward every rank tells whether its
//                      local work failed (one int64 all-reduce); then every rank raises (the
//                      failed one its own exception, the others PeerFailed) and nothing is
//                      applied. Past that point (a failure in the last backward, whose
//                      gradient all-reduces are already in flight), or with ep > 1 (the
//                      layers themselves communicate, so a rank that stops leaves the others
//                      inside a collective), the others cannot be told: the job is aborted
//                      (MPI_Abort with a message on stderr). This is the one place the library
//                      ends the process: a hang of the whole job is the alternative.
//   groups             a sharded model's owned experts (their ranges: train_shard.cpp) are
//                      summed over the DP group of its EP index (the ranks holding the same
//                      experts), everything else over the world.
//   overlap            with MPI_THREAD_SERIALIZED or better, block l's gradient slice is
//                      all-reduced on the communication thread (comm_queue.h) as soon as block
//                      l's backward is done, while blocks l-1, ... run; the rest of the slab
//                      (embedding, norm, head, MTP modules) and the statistics follow after the
//                      backward. With MPI_THREAD_MULTIPLE the expert dispatch runs on the
//                      calling thread, beside those all-reduces (another communicator); with
//                      SERIALIZED it queues behind them. Below SERIALIZED: no thread, no
//                      overlap, everything after the backward.
//   scaling            grads = (sum over ranks and micro-batches) * 1/(A W): the mean loss's
//                      gradient over the global batch.
//   time               allreduce_seconds: the gradient all-reduce's own duration;
//                      allreduce_wait_seconds: how long the step waited for it after its
//                      backward (the rest ran hidden behind the backward); dispatch_seconds:
//                      the time the layers spent inside expert dispatch/combine calls
//                      (ExpertParallel::comm_seconds, queueing included).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <stdexcept>

#include "core/check.h"
#include "model/train.h"

namespace dsv3 {

namespace {
double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Raised on the ranks whose own work succeeded when another rank's failed (after the
// agreement): distinguishes them from a local failure.
struct PeerFailed : std::runtime_error {
  using std::runtime_error::runtime_error;
};
}  // namespace

void Trainer::set_parallel(std::shared_ptr<ParallelGroups> g, bool fp8_dispatch) {
  ExpertShard want;
  if (g) {
    const int64_t E = model_.config().E;
    DSV3_CHECK(g->layout.ep == 1 || (E > 0 && E % g->layout.ep == 0), "[Trainer] ep (",
               g->layout.ep, ") must divide n_routed_experts (", E, ")");
    if (g->layout.ep > 1) want = ExpertShard{g->layout.ep, g->ep_index()};
  }
  use_shard(want);  // train_shard.cpp
  par_ = std::move(g);
  ep_ = ExpertParallel{};
  ep_.fp8_dispatch = fp8_dispatch;
  queue_.reset();
  ep_queued_.reset();
  block_range_.clear();
  rest_range_.clear();
  if (!par_ || par_->world->size() == 1) return;
  const int level = mpi_thread_level();
  if (level >= 2) queue_ = std::make_shared<CommQueue>();
  if (par_->layout.ep > 1) {
    if (queue_ && level < 3) {  // SERIALIZED: one thread in MPI at a time, through the queue
      ep_queued_ = std::make_shared<QueuedComm>(par_->ep_group, queue_);
      ep_.group = ep_queued_.get();
    } else {
      ep_.group = par_->ep_group.get();
    }
  }
  build_grad_ranges();
}

void Trainer::world_call(const std::function<void()>& fn) {
  if (queue_)
    queue_->run(fn);  // after the block all-reduces already queued
  else
    fn();
}

void Trainer::world_agree(const char* op, std::exception_ptr error_here) {
  if (!par_ || par_->world->size() == 1) {
    if (error_here) std::rethrow_exception(error_here);
    return;
  }
  int64_t failed[2] = {error_here ? 1 : 0, error_here ? par_->world->rank() : 0};
  world_call([&] { par_->world->allreduce_sum(failed, 2); });
  if (error_here) std::rethrow_exception(error_here);
  if (failed[0] > 0)
    throw std::runtime_error(str_cat("[", op, "] ", failed[0], " other rank(s) could not take ",
                                     "part (rank ", failed[1], " among them: its error is its ",
                                     "own); nothing was gathered"));
}

void Trainer::agree(ParallelStep& ps, bool failed_here) {
  ps.agreed = true;
  int64_t failed[2] = {failed_here ? 1 : 0, failed_here ? par_->world->rank() : 0};
  world_call([&] { par_->world->allreduce_sum(failed, 2); });
  if (failed[0] > 0 && !failed_here)
    throw PeerFailed(str_cat("[Trainer.step] ", failed[0], " other rank(s) failed this step (",
                             failed[0] == 1 ? "rank " : "ranks summing to ", failed[1],
                             "; its error is on its stderr); nothing was applied"));
}

LossHooks Trainer::parallel_hooks(ParallelStep& ps, bool last) {
  LossHooks h;
  if (!last) return h;
  h.forward_done = [this, &ps] { agree(ps, false); };
  if (queue_)
    h.block_grads_done = [this, &ps](int64_t l) {
      const std::vector<GradRange>* ranges = &block_range_[(size_t)l];
      if (ranges->empty()) return;
      double* busy = &ps.allreduce_busy;  // written on the communication thread only
      ps.pending.push_back(queue_->submit([this, ranges, busy] {
        const double t0 = now();
        for (const GradRange& r : *ranges) reduce_range(r);
        *busy += now() - t0;
      }));
    };
  return h;
}

void Trainer::parallel_failed(ParallelStep& ps, std::exception_ptr error) {
  std::string what = "unknown error";
  try {
    std::rethrow_exception(error);
  } catch (const PeerFailed&) {
    throw;  // the agreement is done: every rank raises, nothing is applied
  } catch (const std::exception& e) {
    what = e.what();
  } catch (...) {
  }
  if (ps.agreed || par_->layout.ep > 1) {
    std::fprintf(stderr, "[dsv3 rank %d] training step failed: %s; the other ranks cannot be "
                 "told at this point: aborting the job\n", par_->world->rank(), what.c_str());
    std::fflush(stderr);
    for (auto& f : ps.pending) f.wait();
    mpi_abort(1);
    std::abort();  // mpi_abort does not return; in case MPI is not initialised
  }
  agree(ps, true);
  std::rethrow_exception(error);  // the local error, its type kept (e.g. NonFiniteError)
}

void Trainer::reduce_over_world(ParallelStep& ps, TrainStepStats& st, float scale) {
  Comm& w = *par_->world;
  const double t0 = now();
  for (auto& f : ps.pending) f.get();
  const double t1 = now();
  if (!queue_)  // no communication thread (MPI below SERIALIZED): the blocks' ranges here
    for (const auto& b : block_range_)
      for (const GradRange& r : b) reduce_range(r);
  for (const GradRange& r : rest_range_) world_call([&] { reduce_range(r); });
  const double t2 = now();
  st.allreduce_wait_seconds = t2 - t0;
  st.allreduce_seconds = ps.allreduce_busy + (t2 - t1);
  scale_inplace(grads_.data(), model_.layout().total, scale);
  const double W = (double)w.size();
  double parts[4] = {st.loss, st.main, st.mtp, st.balance};
  world_call([&] { w.allreduce_sum(parts, 4); });
  st.loss = parts[0] / W;
  st.main = parts[1] / W;
  st.mtp = parts[2] / W;
  st.balance = parts[3] / W;
  if (!st.expert_load.empty())
    world_call([&] { w.allreduce_sum(st.expert_load.data(), (int64_t)st.expert_load.size()); });
}

}  // namespace dsv3
