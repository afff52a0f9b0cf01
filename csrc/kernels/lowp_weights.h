// Weights prepared once per loss call for the low-precision training GEMMs (precision.h).
//
// A training step multiplies each weight W [O,K] twice: y = x W^T in the forward and
// dx += dy W in the backward. Preparing W -- quantizing it to E4M3 in 128x128 blocks, or
// rounding it to bf16 -- and packing it into the GEMM's panels (core/lowp_gemm.h) are passes
// over all of W; for a routed expert that holds a few hundred tokens they cost as much as the
// expert's GEMMs. The cache does each once per loss call (forward and backward of one
// micro-batch, during which the weights do not change):
//   fp8   Q(W): codes [O,K] and block scales, then the forward's panels decoded from the
//         codes; the backward packs Q(W^T)'s panels from the same codes read transposed (a
//         block of W^T holds the transposed block of W: same amax, scale and codes)
//   bf16  the panels of round(W) for the forward and of round(W)^T for the backward
// Results are bit-identical to preparing per call: same codes, same panels, same kernel.
// Used only on a bf16 tier (lowp_tier() != fp32) with the default recipe (Fp8LinearOptions{}:
// E4M3 weights, linear scales, exact accumulation): the training step's configuration.
// Keyed by the weight's address; thread-safe (routed experts run on several threads, each
// looking up its own weights); entries are built once (std::call_once) outside the map lock.
// Memory: during the forward about 3 bytes per fp8 weight element (codes + panels) and 2 per
// bf16 one; end_forward() frees the panels, leaving 1 byte (the codes) for fp8 and round(W)^T's
// panels (2 bytes, built as the backward reaches each weight) for bf16.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "core/lowp_gemm.h"

namespace dsv3 {

struct Fp8PreparedWeight {
  int64_t O = 0, K = 0;
  std::vector<uint8_t> codes;  // Q(W) [O,K], E4M3
  std::vector<float> scales;   // [ceil(O/128), ceil(K/128)]
  Bf16PackedB panels;          // B of y = x W^T (until LowpWeightCache::end_forward)
};

class LowpWeightCache {
 public:
  const Fp8PreparedWeight& fp8(const float* w, int64_t O, int64_t K);
  // panels of round(W) [O,K] (transposed: of round(W)^T [K,O], the B of dx = dy W)
  const Bf16PackedB& bf16(const float* w, int64_t O, int64_t K, bool transposed = false);
  size_t entries() const;
  // The forward pass is over: its panels (fp8 panels, bf16 round(W) panels) are freed, about 2
  // bytes per weight element; the backward keeps the codes and builds round(W)^T's panels.
  // A forward after this throws (forward_panels).
  void end_forward();
  // p itself, after checking it is a live forward panel set of an N x K weight
  const Bf16PackedB& forward_panels(const Bf16PackedB& p, int64_t N, int64_t K) const;

 private:
  struct Entry {
    std::once_flag once;
    Fp8PreparedWeight fp8;
    Bf16PackedB bf16;
  };
  Entry& entry(const float* w, int kind);
  mutable std::mutex mu_;
  bool forward_done_ = false;
  struct Key {
    const float* w;
    int kind;
    bool operator==(const Key& o) const { return w == o.w && kind == o.kind; }
  };
  struct Hash {
    size_t operator()(const Key& k) const {
      return std::hash<const void*>()(k.w) ^ (size_t)k.kind;
    }
  };
  std::unordered_map<Key, std::unique_ptr<Entry>, Hash> map_;
};

}  // namespace dsv3
