#include "core/memory.h"

#include <cstdlib>
#include <cstring>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

extern char** environ;

namespace dsv3 {
namespace {
bool g_tuned = false;

bool user_set_malloc_policy() {
  if (const char* t = std::getenv("GLIBC_TUNABLES"); t && std::strstr(t, "glibc.malloc."))
    return true;
  for (char** e = environ; e && *e; ++e)
    if (std::strncmp(*e, "MALLOC_", 7) == 0) return true;
  return false;
}
}  // namespace

bool tune_malloc() {
#if defined(__GLIBC__)
  if (g_tuned) return true;
  if (const char* v = std::getenv("DSV3_MALLOC_TUNING"); v && std::strcmp(v, "0") == 0)
    return false;
  if (user_set_malloc_policy()) return false;
  g_tuned = mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 && mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1;
  return g_tuned;
#else
  return false;
#endif
}

bool malloc_tuned() { return g_tuned; }

}  // namespace dsv3
