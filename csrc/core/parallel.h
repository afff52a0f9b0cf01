// The threading policy, in one place.
//
// - One knob: set_num_threads(n). The default is the number of CPUs this process may use
//   (sched_getaffinity, capped by a cgroup CPU quota: v2 cpu.max or v1 cpu.cfs_quota_us, rounded
//   up); OMP_NUM_THREADS (its first value)
//   overrides the default, set_num_threads overrides both.
// - All parallel work runs on dsv3's own pool (parallel.cpp), never on OpenMP teams: loops over
//   rows / heads / experts use parallel_for, and big GEMMs are split across the pool by sgemm
//   (blas.cpp), each piece on single-threaded BLAS. So whichever OpenBLAS build is loaded
//   (OpenMP, pthreads, serial) runs the same single-threaded kernels on the same pieces: the
//   same speed, and the same results.
// - Work is cut into chunks whose bounds depend only on n, grain and the thread count; the
//   pool's threads claim chunks from a shared counter, so a thread slowed down by another
//   process leaves its chunks to the others, and the caller finishes as soon as every chunk is
//   done (a worker that wakes up late finds nothing left). Each chunk's arithmetic does not
//   depend on which thread runs it, so results are bit-identical for a given thread count.
//   No atomics in float reductions: per-chunk partials are combined in a fixed order.
// - Waiting: an idle worker spins for spin_us() microseconds (DSV3_SPIN_US, default below) for
//   the next region, then sleeps; the caller waiting for a chunk spins as long, then sleeps.
//   With more threads than CPUs this process may use, nobody spins.
//   The README's Threads section has the measurements behind the default.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

namespace dsv3 {

int num_threads();
void set_num_threads(int64_t n);
bool in_parallel();  // true inside a parallel_for chunk (nested calls then run inline)

// Calls fn(begin, end) on contiguous chunks of [0, n) (at most num_threads() chunks, bounds
// fixed by n, grain and the thread count). Exceptions thrown by fn are caught and the first
// one is rethrown in the caller. `grain` is the smallest chunk worth a thread: n < 2*grain runs
// inline. A call made while another thread's parallel_for holds the pool runs its chunks one
// after the other on the calling thread (same bounds, same results).
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// Where the default thread count came from, e.g. "affinity 2 CPUs, cgroup quota 1.5 CPUs -> 2"
// (build_info's "threads_default"); the spin budget in microseconds; the budget in effect at
// the current thread count (0 when the threads outnumber the CPUs this process may use).
std::string thread_default_source();
int spin_us();
int spin_budget_us();

}  // namespace dsv3
