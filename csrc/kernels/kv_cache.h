// The decoding cache: one buffer per layer and sequence, max_len token rows of `width`
// values, stored as fp32 or as bf16 (dtype "bfloat16": half the bytes, DeepSeek-V3's KV cache
// dtype; the MLA cache is then (kv_lora_rank + qk_rope_head_dim) * 2 bytes per token and layer,
// 70,272 B per token for V3's 61 layers). A bf16 cache holds the rows rounded to bf16 (RNE);
// the attention reads exactly those values, the new tokens' own rows included (the kernels
// round what they write: LatentCacheView / KvCacheView::round_bf16). While a call runs on a
// layer, its rows are decoded to fp32 into one staging layer (begin_layer .. end_layer). kind "latent" (MLA): rows [c (Dc) | k_pe (Dr)], width Dc+Dr. kind "kv" (MHA/GQA):
// per sequence keys [max_len, Hkv*(Dn+Dr)] then values [max_len, Hkv*Dv], width Hkv*(Dn+Dr+Dv).
// length[l] = tokens written in layer l; a call at start_pos <= length[l] overwrites from
// there (rolling back rejected speculative tokens), start_pos > length[l] is a gap (error).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <unistd.h>

#include "core/bf16.h"
#include "core/busy.h"
#include "core/check.h"

namespace dsv3 {

struct KvCache {
  std::string kind;
  int64_t layers = 0, batch = 0, max_len = 0, width = 0;
  bool bf16 = false;            // storage dtype: bf16 bits in `bits`, else fp32 in `data`
  std::vector<float> data;      // fp32 storage, or (bf16) the staging layer
  std::vector<uint16_t> bits;   // bf16 storage
  std::vector<int64_t> length;
  mutable std::shared_mutex busy;  // see core/busy.h

  KvCache(std::string kind_, int64_t layers_, int64_t batch_, int64_t max_len_, int64_t width_,
          bool bf16_ = false)
      : kind(std::move(kind_)), layers(layers_), batch(batch_), max_len(max_len_), width(width_),
        bf16(bf16_) {
    DSV3_CHECK(kind == "latent" || kind == "kv", "[KVCache] kind must be 'latent' or 'kv', got '",
               kind, "'");
    DSV3_CHECK(layers >= 1 && batch >= 1 && max_len >= 1 && width >= 1,
               "[KVCache] layers, batch, max_len and width must be >= 1 (got ", layers, ", ",
               batch, ", ", max_len, ", ", width, ")");
    const double n = (double)layers * batch * max_len * width;
    const double ram = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    const double item = bf16 ? 2 : 4;
    DSV3_CHECK(n * item <= ram, "[KVCache] layers*batch*max_len*width = ", n, " values (",
               n * item / 1e9, " GB) exceed this machine's memory (", ram / 1e9,
               " GB); lower batch or max_len");
    if (bf16) {
      bits.assign((size_t)n, 0);  // std::bad_alloc -> MemoryError
      data.assign((size_t)(batch * max_len * width), 0.f);
    } else {
      data.assign((size_t)n, 0.f);
    }
    length.assign((size_t)layers, 0);
  }
  int64_t layer_size() const { return batch * max_len * width; }
  const char* dtype() const { return bf16 ? "bfloat16" : "float32"; }
  // fp32 rows of layer l for a call that reads rows [0, rows) of every sequence and writes
  // from there: the layer itself (fp32 caches), or the staging layer with those rows decoded.
  // (A "kv" cache keeps keys then values per sequence, not rows of width: it is staged whole.)
  float* begin_layer(int64_t l, int64_t rows) {
    if (!bf16) return data.data() + l * layer_size();
    if (kind == "kv") rows = max_len;
    const uint16_t* src = bits.data() + l * layer_size();
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t i = 0; i < rows * width; ++i)
        data[b * max_len * width + i] = bf16_decode(src[b * max_len * width + i]);
    return data.data();
  }
  // bf16: store the rows [start, start+S) the call wrote (already bf16 values: exact).
  void end_layer(int64_t l, int64_t start, int64_t S) {
    if (!bf16) return;
    if (kind == "kv") start = 0, S = max_len;
    uint16_t* dst = bits.data() + l * layer_size();
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t i = start * width; i < (start + S) * width; ++i)
        dst[b * max_len * width + i] = bf16_encode(data[b * max_len * width + i]);
  }
  // Layer l's stored values as fp32 (a copy), [batch, max_len, width].
  std::vector<float> layer_values(int64_t l) const {
    std::vector<float> out((size_t)layer_size());
    for (int64_t i = 0; i < layer_size(); ++i)
      out[i] = bf16 ? bf16_decode(bits[l * layer_size() + i]) : data[l * layer_size() + i];
    return out;
  }
  int64_t bytes_per_token() const { return layers * width * (bf16 ? 2 : 4); }
  int64_t nbytes() const { return layers * layer_size() * (bf16 ? 2 : 4); }
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
