#include "dist/comm_queue.h"

#include <chrono>

namespace dsv3 {

CommQueue::CommQueue() : thread_([this] { loop(); }) {}

CommQueue::~CommQueue() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

std::shared_future<void> CommQueue::submit(std::function<void()> fn) {
  std::packaged_task<void()> task(std::move(fn));
  std::shared_future<void> f = task.get_future().share();
  {
    std::lock_guard<std::mutex> lk(mu_);
    tasks_.push_back(std::move(task));
  }
  cv_.notify_one();
  return f;
}

double CommQueue::busy_seconds() const {
  std::lock_guard<std::mutex> lk(mu_);
  return busy_;
}

void CommQueue::loop() {
  for (;;) {
    std::packaged_task<void()> task;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stop_ || !tasks_.empty(); });
      if (tasks_.empty()) return;  // stop_ and nothing left
      task = std::move(tasks_.front());
      tasks_.pop_front();
    }
    const auto t0 = std::chrono::steady_clock::now();
    task();
    const double dt =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::lock_guard<std::mutex> lk(mu_);
    busy_ += dt;
  }
}

}  // namespace dsv3
