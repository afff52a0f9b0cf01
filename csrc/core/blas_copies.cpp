#include "core/blas_copies.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <mutex>

#include "core/parallel.h"

namespace dsv3 {

namespace {

constexpr int kMaxCopies = 64;

struct Slot {
  std::mutex mu;
  SgemmFn fn = nullptr;
};

Slot g_slots[kMaxCopies];
std::atomic<int> g_count{0};  // slots [0, g_count) have fn set
std::mutex g_grow_mu;         // one thread loads a copy at a time
std::string g_path, g_symbol, g_error;  // g_error written once, before g_failed
std::atomic<bool> g_failed{false};
thread_local int t_last = 0;

// The library's bytes in an anonymous in-memory file, loaded as an object of its own.
SgemmFn load_copy(std::string& error) {
#if defined(__linux__) && defined(MFD_CLOEXEC)
  const int src = open(g_path.c_str(), O_RDONLY | O_CLOEXEC);
  if (src < 0) return error = "cannot open " + g_path + ": " + std::strerror(errno), nullptr;
  const int fd = memfd_create("dsv3-blas-copy", MFD_CLOEXEC);
  if (fd < 0) {
    close(src);
    return error = std::string("memfd_create: ") + std::strerror(errno), nullptr;
  }
  char buf[1 << 16];
  ssize_t n;
  bool ok = true;
  while (ok && (n = read(src, buf, sizeof buf)) != 0) {
    if (n < 0) {
      if (errno == EINTR) continue;
      ok = false;
      break;
    }
    for (ssize_t done = 0; ok && done < n;) {
      const ssize_t w = write(fd, buf + done, (size_t)(n - done));
      if (w < 0 && errno == EINTR) continue;
      ok = w > 0;
      done += ok ? w : 0;
    }
  }
  close(src);
  void* handle = nullptr;
  if (ok) {
    const std::string proc = "/proc/self/fd/" + std::to_string(fd);
    handle = dlopen(proc.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) error = std::string("dlopen of a copy: ") + dlerror();
  } else {
    error = "copying " + g_path + " failed: " + std::strerror(errno);
  }
  close(fd);  // the mapping keeps the bytes
  if (!handle) return nullptr;
  auto fn = reinterpret_cast<SgemmFn>(dlsym(handle, g_symbol.c_str()));
  if (!fn) error = "the copy has no " + g_symbol;
  return fn;  // the handle stays open for the life of the process
#else
  error = "private copies need Linux's memfd_create";
  return nullptr;
#endif
}

// fork() while a copy is leased would leave the child's lock held forever: the fork waits
// for every lease to end, and both sides release after it.
void prepare_fork() {
  g_grow_mu.lock();
  for (int i = 0; i < g_count.load(); ++i) g_slots[i].mu.lock();
}
void after_fork() {
  for (int i = g_count.load() - 1; i >= 0; --i) g_slots[i].mu.unlock();
  g_grow_mu.unlock();
}

}  // namespace

void blas_copies_init(SgemmFn linked, const std::string& path, const char* symbol) {
  static std::once_flag once;
  std::call_once(once, [&] {
    g_slots[0].fn = linked;
    g_path = path;
    g_symbol = symbol;
    g_count.store(1, std::memory_order_release);
    const char* env = std::getenv("DSV3_BLAS_COPIES");  // "0": serialise (tests, diagnosis)
    if (env && std::strcmp(env, "0") == 0) {
      g_error = "disabled by DSV3_BLAS_COPIES=0";
      g_failed.store(true, std::memory_order_release);
    }
    pthread_atfork(prepare_fork, after_fork, after_fork);
  });
}

BlasLease::BlasLease() {
  const int have = g_count.load(std::memory_order_acquire);
  int s = t_last < have ? t_last : 0;
  if (g_slots[s].mu.try_lock()) {
    slot_ = s;
    return;
  }
  for (int i = 0; i < have; ++i)
    if (i != s && g_slots[i].mu.try_lock()) {
      slot_ = t_last = i;
      return;
    }
  const int want = std::min(kMaxCopies, std::max(1, num_threads()));
  if (have < want && !g_failed.load(std::memory_order_acquire)) {
    std::lock_guard<std::mutex> grow(g_grow_mu);
    const int now = g_count.load(std::memory_order_acquire);
    if (now < want && !g_failed.load(std::memory_order_relaxed)) {
      std::string error;
      if (SgemmFn fn = load_copy(error)) {
        g_slots[now].fn = fn;
        g_slots[now].mu.lock();  // nobody else can see this slot yet
        g_count.store(now + 1, std::memory_order_release);
        slot_ = t_last = now;
        return;
      }
      g_error = error;
      g_failed.store(true, std::memory_order_release);
    }
  }
  g_slots[s].mu.lock();
  slot_ = s;
}

BlasLease::~BlasLease() { g_slots[slot_].mu.unlock(); }

SgemmFn BlasLease::sgemm() const { return g_slots[slot_].fn; }

int blas_copies_loaded() { return g_count.load(); }

const std::string& blas_copies_error() {
  static const std::string none;
  return g_failed.load(std::memory_order_acquire) ? g_error : none;
}

}  // namespace dsv3
