#include "core/memory.h"

#include "core/env.h"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace dsv3 {
namespace {
bool g_tuned = false;
}  // namespace

bool tune_malloc() {
#if defined(__GLIBC__)
  if (g_tuned) return true;
  const EnvSettings& env = env_settings();
  if (!env.malloc_tuning || env.user_malloc_policy) return false;
  g_tuned = mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 && mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1;
  return g_tuned;
#else
  return false;
#endif
}

bool malloc_tuned() { return g_tuned; }

}  // namespace dsv3
