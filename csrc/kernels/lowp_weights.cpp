#include "kernels/lowp_weights.h"

#include "core/check.h"
#include "kernels/fp8.h"
#include "kernels/fp8_gemm.h"

namespace dsv3 {

namespace {
constexpr int64_t kTile = 128;  // the recipe's weight block edge (fp8_linear.h)
}

LowpWeightCache::Entry& LowpWeightCache::entry(const float* w, int kind) {
  std::lock_guard<std::mutex> lock(mu_);
  auto& e = map_[Key{w, kind}];
  if (!e) e = std::make_unique<Entry>();
  return *e;
}

const Fp8PreparedWeight& LowpWeightCache::fp8(const float* w, int64_t O, int64_t K) {
  Entry& e = entry(w, 0);
  std::call_once(e.once, [&] {
    Fp8PreparedWeight& p = e.fp8;
    p.codes.resize((size_t)(O * K));
    p.scales.resize((size_t)(fp8_blocks(O, kTile) * fp8_blocks(K, kTile)));
    fp8_quantize(p.codes.data(), p.scales.data(), w, O, K, {kTile, kTile}, Fp8Format::e4m3,
                 false);
    if (!forward_done_) fp8_pack_b(p.panels, p.codes.data(), Fp8Format::e4m3, O, K, false);
    p.O = O;
    p.K = K;
  });
  // one address, one shape (after call_once the entry is complete and visible)
  DSV3_CHECK(e.fp8.O == O && e.fp8.K == K, "[lowp weights] one weight used with two shapes");
  return e.fp8;
}

const Bf16PackedB& LowpWeightCache::bf16(const float* w, int64_t O, int64_t K, bool transposed) {
  Entry& e = entry(w, transposed ? 2 : 1);
  const int64_t N = transposed ? K : O, Kd = transposed ? O : K;
  std::call_once(e.once, [&] {
    Bf16Src s;  // element (n, k) of B: W[n, k], or W[k, n] for W^T
    s.f32 = w;
    s.rs = transposed ? 1 : K;
    s.cs = transposed ? K : 1;
    bf16_pack_b(e.bf16, s, N, Kd);
  });
  DSV3_CHECK(e.bf16.N == N && e.bf16.K == Kd, "[lowp weights] one weight used with two shapes");
  return e.bf16;
}

void LowpWeightCache::end_forward() {
  std::lock_guard<std::mutex> lock(mu_);
  forward_done_ = true;
  for (auto& [key, e] : map_) {
    if (key.kind == 0) e->fp8.panels = Bf16PackedB{};
    if (key.kind == 1) e->bf16 = Bf16PackedB{};
  }
}

const Bf16PackedB& LowpWeightCache::forward_panels(const Bf16PackedB& p, int64_t N,
                                                   int64_t K) const {
  DSV3_CHECK(!forward_done_ && p.N == N && p.K == K, "[lowp weights] forward panels of a ", N,
             "x", K, " weight requested after end_forward()");
  return p;
}

size_t LowpWeightCache::entries() const {
  std::lock_guard<std::mutex> lock(mu_);
  return map_.size();
}

}  // namespace dsv3
