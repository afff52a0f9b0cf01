#include "core/parallel.h"

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <mutex>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "core/check.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DSV3_PAUSE() _mm_pause()
#else
#define DSV3_PAUSE() std::this_thread::yield()
#endif

namespace dsv3 {

namespace {

thread_local bool t_in_region = false;

// Runs fn(b, e) as a chunk: in a region (nested parallel_for calls run inline).
void run_chunk(const std::function<void(int64_t, int64_t)>& fn, int64_t b, int64_t e) {
  t_in_region = true;
  try {
    fn(b, e);
  } catch (...) {
    t_in_region = false;
    throw;
  }
  t_in_region = false;
}

// ---- the default thread count --------------------------------------------------------------

int affinity_cpus() {
#ifdef __linux__
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1, (int)std::thread::hardware_concurrency());
}

// The quota (CPUs) in one cgroup directory: v2 "cpu.max" ("max 100000" or "150000 100000") or
// v1 "cpu.cfs_quota_us" (-1 = none) over "cpu.cfs_period_us"; 0 = none or unreadable.
double quota_in(const std::string& dir) {
  std::ifstream v2(dir + "/cpu.max");
  std::string quota;
  double period = 0;
  if (v2 >> quota >> period) return quota != "max" && period > 0 ? std::atof(quota.c_str()) / period : 0;
  std::ifstream q(dir + "/cpu.cfs_quota_us"), per(dir + "/cpu.cfs_period_us");
  double us = 0;
  return q >> us && per >> period && us > 0 && period > 0 ? us / period : 0;
}

// The tightest CPU quota on the path from this process's cgroup to the root, in CPUs (0 =
// none): cgroup v2 (the "0::" line, /sys/fs/cgroup or /sys/fs/cgroup/unified) or v1 (the
// line naming the cpu controller, /sys/fs/cgroup/cpu or cpu,cpuacct).
double cgroup_quota_cpus() {
  std::ifstream self("/proc/self/cgroup");
  std::string line;
  std::vector<std::pair<std::string, std::string>> places;  // (mount, path)
  while (std::getline(self, line)) {
    const size_t a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string ctrl = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
    if (ctrl.empty()) {
      places.push_back({"/sys/fs/cgroup", path});
      places.push_back({"/sys/fs/cgroup/unified", path});
    } else if (("," + ctrl + ",").find(",cpu,") != std::string::npos) {
      places.push_back({"/sys/fs/cgroup/" + ctrl, path});
      places.push_back({"/sys/fs/cgroup/cpu", path});
    }
  }
  double best = 0;
  for (auto& [mount, start] : places)
    for (std::string path = start;;) {
      const double cpus = quota_in(mount + (path == "/" ? "" : path));
      if (cpus > 0 && (best == 0 || cpus < best)) best = cpus;
      if (path.empty() || path == "/") break;
      const size_t slash = path.rfind('/');
      path = slash == 0 || slash == std::string::npos ? "/" : path.substr(0, slash);
    }
  return best;
}

int omp_num_threads_env() {  // first entry of OMP_NUM_THREADS, 0 if unset or not a number
  const char* s = std::getenv("OMP_NUM_THREADS");
  if (!s) return 0;
  char* end = nullptr;
  const long v = std::strtol(s, &end, 10);
  return end != s && v >= 1 && v < 4096 ? (int)v : 0;
}

struct Defaults {
  int threads;
  std::string source;
  double cpus;  // what this process may use: affinity, or a tighter (fractional) cgroup quota
};

const Defaults& defaults() {
  static const Defaults d = [] {
    const int aff = affinity_cpus();
    const double quota = cgroup_quota_cpus();
    int n = aff;
    const double cpus = quota > 0 ? std::min<double>(aff, quota) : aff;
    std::string src = str_cat("affinity ", aff, " CPUs");
    if (quota > 0) {
      n = std::min(n, std::max(1, (int)std::ceil(quota - 1e-9)));
      src += str_cat(", cgroup quota ", quota, " CPUs");
    }
    if (const int env = omp_num_threads_env()) {
      n = env;
      src += str_cat(", OMP_NUM_THREADS=", env);
    }
    return Defaults{n, str_cat(src, " -> ", n), cpus};
  }();
  return d;
}

// ---- the pool ------------------------------------------------------------------------------
// state packs the region's generation (high 32 bits), its chunk count (16) and the next
// unclaimed chunk (16): a claim is one compare-and-swap that fails once the region is over or
// a new one has started, so a late worker can never run a chunk of the wrong region.

constexpr int kMaxChunks = 1 << 15;

uint32_t gen_of(uint64_t s) { return (uint32_t)(s >> 32); }
int chunks_of(uint64_t s) { return (int)((s >> 16) & 0xffff); }
int next_of(uint64_t s) { return (int)(s & 0xffff); }

struct Pool {
  // A thread that cannot start (the process's thread or memory limit) stops the ones that did
  // and raises RuntimeError: std::thread's exception escaping here would be std::terminate.
  explicit Pool(int threads) {
    try {
      for (int i = 1; i < threads; ++i) workers.emplace_back([this] { work(); });
    } catch (const std::system_error& e) {
      const size_t started = workers.size();
      shut_down();
      throw std::runtime_error(str_cat("[parallel] could not start ", threads - 1,
                                       " worker threads (", started, " started: ", e.what(),
                                       "); use dsv3.set_num_threads with fewer"));
    }
  }
  ~Pool() { shut_down(); }

  void run(int64_t n, int chunks, const std::function<void(int64_t, int64_t)>& f);

 private:
  void shut_down() {
    {
      std::lock_guard<std::mutex> lk(mu);
      stop = true;
    }
    wake.notify_all();
    for (auto& t : workers) t.join();
    workers.clear();
  }
  void work();
  void run_chunks(uint32_t gen);
  void chunk(int c);

  std::vector<std::thread> workers;
  std::atomic<uint64_t> state{0};
  std::atomic<int> done{0};
  std::atomic<int> sleepers{0};
  std::atomic<bool> caller_sleeps{false};
  std::mutex mu;  // guards only the sleeps below (and stop)
  std::condition_variable wake, finished;
  bool stop = false;
  // The region's job, written by the caller before it publishes `state`, read after a claim.
  const std::function<void(int64_t, int64_t)>* fn = nullptr;
  int64_t n_ = 0;
  int chunks_ = 0;
  std::mutex error_mu;
  std::exception_ptr error;
};

std::atomic<int> g_threads{0};  // 0 = not set yet: defaults()
std::atomic<int> g_spin_us{-1};
std::mutex g_pool_mu;           // held by the caller of a region (and by resizing)
Pool* g_pool = nullptr;         // never destroyed at exit: workers may still sleep on it

}  // namespace

// The spin budget: spin_us(), or none when the pool has more threads than the CPUs this process
// may use (a spinning thread would then hold a CPU another of ours needs, or burn a fractional
// cgroup quota: 2 threads under a 1.5-CPU quota do not spin).
int spin_budget_us() { return num_threads() > defaults().cpus ? 0 : spin_us(); }

namespace {

template <class Done>
bool spin_until(Done&& ok) {  // true if ok() became true within the spin budget
  const auto budget = std::chrono::microseconds(spin_budget_us());
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0;; ++i) {
    if (ok()) return true;
    DSV3_PAUSE();
    if ((i & 63) == 63 && std::chrono::steady_clock::now() - t0 >= budget) return ok();
  }
}

void chunk_bounds(int64_t n, int chunks, int c, int64_t* b, int64_t* e) {
  const int64_t q = n / chunks, r = n % chunks;
  *b = c * q + std::min<int64_t>(c, r);
  *e = *b + q + (c < r ? 1 : 0);
}

void Pool::chunk(int c) {
  const int chunks = chunks_;  // the caller may start the next region once this one is done
  int64_t b, e;
  chunk_bounds(n_, chunks, c, &b, &e);
  try {
    if (b < e) run_chunk(*fn, b, e);
  } catch (...) {
    std::lock_guard<std::mutex> lk(error_mu);
    if (!error) error = std::current_exception();
  }
  if (done.fetch_add(1) + 1 == chunks && caller_sleeps.load()) {
    { std::lock_guard<std::mutex> lk(mu); }
    finished.notify_one();
  }
}

void Pool::run_chunks(uint32_t gen) {
  uint64_t s = state.load();
  while (gen_of(s) == gen && next_of(s) < chunks_of(s)) {
    if (state.compare_exchange_weak(s, s + 1)) {
      chunk(next_of(s));
      s = state.load();
    }
  }
}

void Pool::work() {
  uint32_t seen = 0;
  for (;;) {
    uint64_t s = state.load();
    if (!spin_until([&] { return gen_of(s = state.load()) != seen; })) {
      sleepers.fetch_add(1);
      std::unique_lock<std::mutex> lk(mu);
      wake.wait(lk, [&] { return stop || gen_of(s = state.load()) != seen; });
      sleepers.fetch_sub(1);
      if (stop) return;
    }
    seen = gen_of(s);
    run_chunks(seen);
  }
}

void Pool::run(int64_t n, int chunks, const std::function<void(int64_t, int64_t)>& f) {
  fn = &f;
  n_ = n;
  chunks_ = chunks;
  error = nullptr;
  done.store(0);
  const uint32_t gen = gen_of(state.load()) + 1;
  state.store((uint64_t)gen << 32 | (uint64_t)chunks << 16);
  if (sleepers.load() > 0) {
    { std::lock_guard<std::mutex> lk(mu); }
    wake.notify_all();
  }
  run_chunks(gen);
  if (!spin_until([&] { return done.load() == chunks; })) {
    caller_sleeps.store(true);
    std::unique_lock<std::mutex> lk(mu);
    finished.wait(lk, [&] { return done.load() == chunks; });
    caller_sleeps.store(false);
  }
  if (error) std::rethrow_exception(error);
}

void reset_after_fork() {  // the child has no worker threads: forget the pool (leaked)
  new (&g_pool_mu) std::mutex();
  g_pool = nullptr;
}

void register_fork_reset() {  // before the first pool starts
  static const bool registered = [] { return pthread_atfork(nullptr, nullptr, reset_after_fork) == 0; }();
  (void)registered;
}

}  // namespace

int num_threads() {
  const int n = g_threads.load();
  return n > 0 ? n : defaults().threads;
}

// The new pool starts here, not at the next parallel loop, so that a count the process cannot
// start (its thread or memory limit) raises now and leaves the recorded count, and with it
// num_threads() and build_info(), at the previous value (the old pool is gone; it restarts
// lazily at that count).
void set_num_threads(int64_t n) {
  DSV3_CHECK(n >= 1, "[set_num_threads] n must be >= 1, got ", n);
  DSV3_CHECK(n <= 4096, "[set_num_threads] n must be <= 4096, got ", n);
  std::lock_guard<std::mutex> lk(g_pool_mu);
  if (g_threads.load() == n) return;
  delete g_pool;  // idle: the pool lock is held, so no region is running
  g_pool = nullptr;
  register_fork_reset();
  if (n > 1) g_pool = new Pool((int)n);
  g_threads.store((int)n);
}

bool in_parallel() { return t_in_region; }

std::string thread_default_source() { return defaults().source; }

int spin_us() {
  int v = g_spin_us.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* s = std::getenv("DSV3_SPIN_US");
    v = s ? std::max(0, std::atoi(s)) : 200;
    g_spin_us.store(v);
  }
  return v;
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int nt = in_parallel() ? 1 : num_threads();
  const int chunks = (int)std::min<int64_t>({nt, std::max<int64_t>(1, n / grain), kMaxChunks});
  if (chunks <= 1) {
    fn(0, n);
    return;
  }
  std::unique_lock<std::mutex> lk(g_pool_mu, std::try_to_lock);
  if (!lk.owns_lock()) {  // another thread's region holds the pool: same chunks, inline
    for (int c = 0; c < chunks; ++c) {
      int64_t b, e;
      chunk_bounds(n, chunks, c, &b, &e);
      run_chunk(fn, b, e);
    }
    return;
  }
  register_fork_reset();
  if (!g_pool) g_pool = new Pool(num_threads());
  g_pool->run(n, chunks, fn);
}

}  // namespace dsv3
