// A communication thread: collective calls submitted from the training step run on it, one
// at a time, in submission order (so every rank issues them in the same order, as MPI
// requires, and MPI needs only MPI_THREAD_SERIALIZED). The step overlaps the gradient
// all-reduce of block l (submitted as soon as its backward is done) with the backward of
// blocks l-1, l-2, ...; collectives the step must wait for (the expert dispatch) go through
// the same queue via QueuedComm.
#pragma once
#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <thread>

#include "dist/comm.h"

namespace dsv3 {

class CommQueue {
 public:
  CommQueue();
  ~CommQueue();
  CommQueue(const CommQueue&) = delete;
  CommQueue& operator=(const CommQueue&) = delete;
  // Runs fn on the communication thread after everything submitted before; the future
  // carries fn's exception.
  std::shared_future<void> submit(std::function<void()> fn);
  void run(std::function<void()> fn) { submit(std::move(fn)).get(); }
  double busy_seconds() const;  // time spent running submitted calls

 private:
  void loop();
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::packaged_task<void()>> tasks_;
  bool stop_ = false;
  double busy_ = 0;
  std::thread thread_;
};

// A Comm whose every call runs on a CommQueue's thread (blocking the caller until done).
class QueuedComm final : public Comm {
 public:
  QueuedComm(std::shared_ptr<Comm> inner, std::shared_ptr<CommQueue> q)
      : inner_(std::move(inner)), q_(std::move(q)) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  void allreduce_sum(float* x, int64_t n) override { q_->run([=] { inner_->allreduce_sum(x, n); }); }
  void allreduce_sum(double* x, int64_t n) override { q_->run([=] { inner_->allreduce_sum(x, n); }); }
  void allreduce_sum(int64_t* x, int64_t n) override { q_->run([=] { inner_->allreduce_sum(x, n); }); }
  void alltoallv(const void* s, const int64_t* sc, const int64_t* sd, void* r, const int64_t* rc,
                 const int64_t* rd) override {
    q_->run([=] { inner_->alltoallv(s, sc, sd, r, rc, rd); });
  }
  void allgather(const int64_t* x, int64_t n, int64_t* out) override {
    q_->run([=] { inner_->allgather(x, n, out); });
  }
  void barrier() override { q_->run([=] { inner_->barrier(); }); }
  std::shared_ptr<Comm> split(int color, int key) override {
    std::shared_ptr<Comm> c;
    q_->run([&] { c = inner_->split(color, key); });
    return std::make_shared<QueuedComm>(c, q_);
  }
  Comm& inner() { return *inner_; }

 private:
  std::shared_ptr<Comm> inner_;
  std::shared_ptr<CommQueue> q_;
};

}  // namespace dsv3
