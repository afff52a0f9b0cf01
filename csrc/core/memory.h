// Process memory policy for the engine's temporaries.
//
// Kernels allocate their work buffers (activations saved for backward, scores, packed
// operands) with std::vector, i.e. glibc malloc. By default glibc serves blocks above a
// dynamic threshold (128 KiB rising to at most 32 MiB) with fresh mmap()s and returns freed
// memory at the top of the heap to the kernel as soon as 128 KiB accumulate. A training step
// frees and re-allocates the same large buffers every step, so it page-faults (and the kernel
// zeroes) every page again: 16% of a Config.small() training step, 19% of an MLA layer's
// forward+backward on this project's bench machine.
//
// tune_malloc() fixes the mmap threshold at 32 MiB (glibc's maximum) and keeps up to 1 GiB of
// freed heap for reuse (M_TRIM_THRESHOLD), so steady-state steps reuse warm pages. Cost: the
// process keeps up to that much freed memory resident. It is skipped when the environment
// says DSV3_MALLOC_TUNING=0, when GLIBC_TUNABLES or MALLOC_* variables already set malloc
// policy, and on non-glibc systems.
#pragma once
#include <algorithm>
#include <cstdint>
#include <memory>
#include <new>
#include <utility>
#include <vector>

namespace dsv3 {

// An uninitialised float buffer, for work arrays whose values are written before they are
// read (std::vector<float>(n) would zero n floats first, on one thread).
using Buf = std::unique_ptr<float[]>;
inline Buf buf(int64_t n) { return Buf(new float[(size_t)std::max<int64_t>(n, 1)]); }

// dst[r, 0:cols] = src[r, 0:cols] for r < rows: a block of rows between buffers whose rows
// are ldd and lds floats apart (packing a strided slice dense, or the reverse).
inline void copy_rows(float* dst, int64_t ldd, const float* src, int64_t lds, int64_t rows,
                      int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) std::copy_n(src + r * lds, cols, dst + r * ldd);
}

// A std::vector whose resize() leaves new elements uninitialised (default-initialised), for
// saved activations that the forward writes before anything reads them: a value-initialising resize would zero
// them on one thread first (55 MB per MLA layer call at hidden 512, T 4096).
template <class T>
struct DefaultInitAllocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = DefaultInitAllocator<U>;
  };
  DefaultInitAllocator() = default;
  template <class U>
  DefaultInitAllocator(const DefaultInitAllocator<U>&) noexcept {}
  template <class U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
using FVec = std::vector<float, DefaultInitAllocator<float>>;

// Returns true when the policy was applied (reported by build_info()).
bool tune_malloc();
bool malloc_tuned();

}  // namespace dsv3
