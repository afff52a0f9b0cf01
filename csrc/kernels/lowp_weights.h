// Weights prepared once per optimizer step for the low-precision training GEMMs (precision.h).
//
// A training step multiplies each weight W [O,K] in the forward (y = x W^T) and in the
// backward (dx += dy W) of every micro-batch. Preparing W for them -- quantizing it to E4M3 in
// 128x128 blocks, and packing it into the GEMM's panels (core/lowp_gemm.h) -- are passes over
// all of W that, for a routed expert holding a few hundred tokens, cost about as much as the
// expert's GEMMs. The cache (one per Trainer step, shared by its micro-batches) keeps:
//   fp8   always: Q(W), codes [O,K] + block scales, quantized once per step. The forward packs
//         its panels from the codes; the backward packs Q(W^T)'s panels from the same codes
//         read transposed (a block of W^T holds the transposed block of W: same amax, scale
//         and codes), so W is quantized once instead of twice and never byte-transposed.
//   keep_panels (gradient accumulation: several micro-batches per step): also the packed
//         panels -- fp8: the forward's; bf16: those of round(W) and round(W)^T -- reused by
//         every micro-batch instead of packed again in each. With one micro-batch each panel
//         is used once, so nothing is gained by keeping them and they are packed per call.
// Results are bit-identical with and without the cache (same codes, same panels, same kernel;
// tests/test_lowp_train.py). Used only on a bf16 tier (lowp_tier() != fp32) for the recipe's
// weight format (kFormat, linear scales): the training step's configuration.
// Keyed by the weight's address (the weights do not change during a step); thread-safe: routed
// experts run on several threads, each looking up its own weights, and an entry is built once
// (std::call_once, outside the map lock; a throwing build leaves it unbuilt -- no entry is
// ever waited on by two threads).
// Memory per weight element: 1 byte (fp8 codes); with keep_panels +2 (fp8) or 4 (bf16).
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "core/lowp_gemm.h"
#include "kernels/fp8.h"

namespace dsv3 {

struct Fp8PreparedWeight {
  int64_t O = 0, K = 0;
  std::vector<uint8_t> codes;  // Q(W) [O,K]
  std::vector<float> scales;   // [ceil(O/128), ceil(K/128)]
  Bf16PackedB panels;          // B of y = x W^T (keep_panels only; else N = 0)
};

class LowpWeightCache {
 public:
  static constexpr Fp8Format kFormat = Fp8Format::e4m3;  // the weights' format (linear scales)
  explicit LowpWeightCache(bool keep_panels = false) : keep_panels_(keep_panels) {}
  bool keep_panels() const { return keep_panels_; }
  const Fp8PreparedWeight& fp8(const float* w, int64_t O, int64_t K);
  // panels of round(W) [O,K] (transposed: of round(W)^T [K,O], the B of dx = dy W); null
  // unless keep_panels
  const Bf16PackedB* bf16(const float* w, int64_t O, int64_t K, bool transposed);
  size_t entries() const;

 private:
  struct Entry {
    std::once_flag once;
    int64_t rows = -1, cols = -1;  // the shape it was built for
    Fp8PreparedWeight fp8;
    Bf16PackedB bf16;
  };
  struct Key {
    const float* w;
    int kind;  // 0 fp8, 1 bf16, 2 bf16 transposed
    bool operator==(const Key& o) const { return w == o.w && kind == o.kind; }
  };
  struct Hash {
    size_t operator()(const Key& k) const {
      return std::hash<const void*>()(k.w) ^ (size_t)k.kind;
    }
  };
  Entry& entry(const float* w, int kind);
  static void check_shape(const Entry& e, int64_t O, int64_t K);

  const bool keep_panels_;
  mutable std::mutex mu_;
  std::unordered_map<Key, std::unique_ptr<Entry>, Hash> map_;
};

}  // namespace dsv3
