// The decoding cache: one fp32 buffer per layer and sequence, max_len token rows of `width`
// floats. kind "latent" (MLA): rows [c (Dc) | k_pe (Dr)], width Dc+Dr. kind "kv" (MHA/GQA):
// per sequence keys [max_len, Hkv*(Dn+Dr)] then values [max_len, Hkv*Dv], width Hkv*(Dn+Dr+Dv).
// length[l] = tokens written in layer l; a call at start_pos <= length[l] overwrites from
// there (rolling back rejected speculative tokens), start_pos > length[l] is a gap (error).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <unistd.h>

#include "core/busy.h"
#include "core/check.h"

namespace dsv3 {

struct KvCache {
  std::string kind;
  int64_t layers = 0, batch = 0, max_len = 0, width = 0;
  std::vector<float> data;
  std::vector<int64_t> length;
  mutable std::shared_mutex busy;  // see core/busy.h

  KvCache(std::string kind_, int64_t layers_, int64_t batch_, int64_t max_len_, int64_t width_)
      : kind(std::move(kind_)), layers(layers_), batch(batch_), max_len(max_len_), width(width_) {
    DSV3_CHECK(kind == "latent" || kind == "kv", "[KVCache] kind must be 'latent' or 'kv', got '",
               kind, "'");
    DSV3_CHECK(layers >= 1 && batch >= 1 && max_len >= 1 && width >= 1,
               "[KVCache] layers, batch, max_len and width must be >= 1 (got ", layers, ", ",
               batch, ", ", max_len, ", ", width, ")");
    const double n = (double)layers * batch * max_len * width;
    const double ram = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    DSV3_CHECK(n * sizeof(float) <= ram, "[KVCache] layers*batch*max_len*width = ", n,
               " floats (", n * 4 / 1e9, " GB) exceed this machine's memory (", ram / 1e9,
               " GB); lower batch or max_len");
    data.assign((size_t)n, 0.f);  // std::bad_alloc -> MemoryError
    length.assign((size_t)layers, 0);
  }
  float* layer(int64_t l) { return data.data() + l * batch * max_len * width; }
  int64_t bytes_per_token() const { return layers * width * (int64_t)sizeof(float); }
  int64_t nbytes() const { return (int64_t)(data.size() * sizeof(float)); }
  // Forget every row at or after n (speculative rollback); rows below n are untouched.
  void truncate(int64_t n) {
    DSV3_CHECK(n >= 0, "[KVCache.truncate] length must be >= 0, got ", n);
    for (int64_t& l : length) l = l < n ? l : n;
  }
  void check_step(int64_t l, int64_t start_pos, int64_t S) const {
    DSV3_INDEX_CHECK(l >= 0 && l < layers, "[KVCache] layer ", l, " out of range [0, ", layers, ")");
    DSV3_CHECK(start_pos >= 0 && start_pos <= length[l], "[KVCache] start_pos ", start_pos,
               " does not continue layer ", l, ", which holds ", length[l],
               " tokens (start_pos must be <= the cached length)");
    DSV3_CHECK(start_pos + S <= max_len, "[KVCache] start_pos (", start_pos, ") + tokens (", S,
               ") exceeds the cache capacity max_len = ", max_len);
  }
  // A write of S rows at start_pos into layers [l0, l1): begin_write checks every layer, then
  // forgets their rows from start_pos on; end_write (after every layer succeeded) records the
  // new length. A failure in between (e.g. non-finite activations) leaves a consistent,
  // shorter cache instead of stale rows.
  void begin_write(int64_t l0, int64_t l1, int64_t start_pos, int64_t S) {
    for (int64_t l = l0; l < l1; ++l) check_step(l, start_pos, S);
    for (int64_t l = l0; l < l1; ++l) length[l] = length[l] < start_pos ? length[l] : start_pos;
  }
  void end_write(int64_t l0, int64_t l1, int64_t start_pos, int64_t S) {
    for (int64_t l = l0; l < l1; ++l) length[l] = start_pos + S;
  }
};

}  // namespace dsv3
