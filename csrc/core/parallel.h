// The threading policy, in one place.
//
// - One knob: set_num_threads(n) sets the OpenMP team size and OpenBLAS's thread count together.
// - Big GEMMs run outside parallel regions and use threaded BLAS (blas.h).
// - Loops over rows / heads / experts use parallel_for; BLAS calls made inside them run on one
//   thread (OpenBLAS's OpenMP build detects the enclosing region; see blas.cpp).
// - Work is split statically, so results are bit-identical for a given thread count. No atomics
//   in float reductions: per-thread partials are combined in a fixed order.
#pragma once
#include <cstdint>
#include <functional>

namespace dsv3 {

// Per-thread call state that follows the work into parallel_for's worker threads: each thread
// has its own, and parallel_for gives every worker the caller's for the duration of fn. It
// carries the GEMM precision of the training step running on this thread
// (kernels/precision.h), so a forward on another thread keeps its own.
struct ThreadState {
  int gemm_precision = 0;
};
ThreadState& thread_state();

int num_threads();
void set_num_threads(int n);
bool in_parallel();

// Calls fn(begin, end) on contiguous chunks of [0, n) in parallel (static schedule). Exceptions
// thrown by fn are caught inside the region and the first one is rethrown afterwards.
// `grain` is the smallest chunk worth a thread: n < 2*grain runs inline.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace dsv3
