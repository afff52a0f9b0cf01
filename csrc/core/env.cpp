#include "core/env.h"

#include <cstdlib>
#include <cstring>

extern char** environ;

namespace dsv3 {

namespace {

bool is_zero(const char* name) {
  const char* v = std::getenv(name);
  return v && std::strcmp(v, "0") == 0;
}

bool user_set_malloc_policy() {
  if (const char* t = std::getenv("GLIBC_TUNABLES"); t && std::strstr(t, "glibc.malloc."))
    return true;
  for (char** e = environ; e && *e; ++e)
    if (std::strncmp(*e, "MALLOC_", 7) == 0) return true;
  return false;
}

}  // namespace

const EnvSettings& env_settings() {
  static const EnvSettings s = [] {
    EnvSettings e;
    e.small_gemm = !is_zero("DSV3_SMALL_GEMM");
    e.keep_attn_probs = !is_zero("DSV3_KEEP_ATTN_PROBS");
    e.moe_decode_pass = !is_zero("DSV3_MOE_DECODE_PASS");
    e.malloc_tuning = !is_zero("DSV3_MALLOC_TUNING");
    e.user_malloc_policy = user_set_malloc_policy();
    return e;
  }();
  return s;
}

}  // namespace dsv3
