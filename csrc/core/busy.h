// Thread-safety policy for objects shared with Python (Model, KVCache): calls that only read
// an object may run concurrently from several threads (the GIL is released during compute);
// a call that modifies it (loading weights, a training step, decoding into a cache) needs it
// alone. Contention never blocks (blocking while holding the GIL could deadlock with a thread
// that needs the GIL to finish): it throws std::runtime_error naming the object -> Python
// RuntimeError, and the object is left untouched.
#pragma once
#include <mutex>
#include <shared_mutex>
#include <stdexcept>
#include <string>

namespace dsv3 {

class BusyGuard {
 public:
  // exclusive = true for modifying calls
  BusyGuard(std::shared_mutex& mu, bool exclusive, const char* what) : mu_(mu), excl_(exclusive) {
    const bool ok = exclusive ? mu_.try_lock() : mu_.try_lock_shared();
    if (!ok)
      throw std::runtime_error(std::string("[") + what + "] is in use by another thread" +
                               (exclusive ? " (this call modifies it and needs it alone)"
                                          : " that is modifying it") +
                               "; use one object per thread or serialise the calls");
  }
  ~BusyGuard() {
    if (excl_)
      mu_.unlock();
    else
      mu_.unlock_shared();
  }
  BusyGuard(const BusyGuard&) = delete;
  BusyGuard& operator=(const BusyGuard&) = delete;

 private:
  std::shared_mutex& mu_;
  bool excl_;
};

}  // namespace dsv3
