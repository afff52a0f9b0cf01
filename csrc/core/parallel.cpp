#include "core/parallel.h"

#include <omp.h>

#include <algorithm>
#include <exception>
#include <mutex>

#include "core/blas.h"
#include "core/check.h"

namespace dsv3 {

ThreadState& thread_state() {
  thread_local ThreadState s;
  return s;
}

int num_threads() { return omp_get_max_threads(); }

void set_num_threads(int n) {
  DSV3_CHECK(n >= 1, "[set_num_threads] n must be >= 1, got ", n);
  omp_set_num_threads(n);
  blas_set_num_threads(n);
}

bool in_parallel() { return omp_in_parallel() != 0; }

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  int nt = in_parallel() ? 1 : num_threads();
  nt = (int)std::min<int64_t>(nt, std::max<int64_t>(1, n / grain));
  if (nt <= 1) {
    fn(0, n);
    return;
  }
  std::exception_ptr error;
  std::mutex error_mutex;
  const ThreadState caller = thread_state();
#pragma omp parallel num_threads(nt)
  {
    const ThreadState own = thread_state();
    thread_state() = caller;
    const int t = omp_get_thread_num(), team = omp_get_num_threads();
    const int64_t chunk = n / team, rem = n % team;
    const int64_t begin = t * chunk + std::min<int64_t>(t, rem);
    const int64_t end = begin + chunk + (t < rem ? 1 : 0);
    try {
      if (begin < end) fn(begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
    thread_state() = own;
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace dsv3
