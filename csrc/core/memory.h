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

namespace dsv3 {

// Returns true when the policy was applied (reported by build_info()).
bool tune_malloc();
bool malloc_tuned();

}  // namespace dsv3
