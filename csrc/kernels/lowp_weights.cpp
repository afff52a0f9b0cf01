#include "kernels/lowp_weights.h"

#include "core/check.h"
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

// one address, one shape (read after call_once: the entry is complete and visible)
void LowpWeightCache::check_shape(const Entry& e, int64_t O, int64_t K) {
  DSV3_CHECK(e.rows == O && e.cols == K, "[lowp weights] one weight used as ", e.rows, "x",
             e.cols, " and as ", O, "x", K);
}

const Fp8PreparedWeight& LowpWeightCache::fp8(const float* w, int64_t O, int64_t K) {
  Entry& e = entry(w, 0);
  std::call_once(e.once, [&] {
    Fp8PreparedWeight& p = e.fp8;
    p.codes.resize((size_t)(O * K));
    p.scales.resize((size_t)(fp8_blocks(O, kTile) * fp8_blocks(K, kTile)));
    fp8_quantize(p.codes.data(), p.scales.data(), w, O, K, {kTile, kTile}, kFormat, false);
    if (keep_panels_) fp8_pack_b(p.panels, p.codes.data(), kFormat, O, K, false);
    p.O = O;
    p.K = K;
    e.rows = O;
    e.cols = K;
  });
  check_shape(e, O, K);
  return e.fp8;
}

const Bf16PackedB* LowpWeightCache::bf16(const float* w, int64_t O, int64_t K, bool transposed) {
  if (!keep_panels_) return nullptr;
  Entry& e = entry(w, transposed ? 2 : 1);
  std::call_once(e.once, [&] {
    Bf16Src s;  // element (n, k) of B: W[n, k], or W[k, n] for W^T
    s.f32 = w;
    s.rs = transposed ? 1 : K;
    s.cs = transposed ? K : 1;
    bf16_pack_b(e.bf16, s, transposed ? K : O, transposed ? O : K);
    e.rows = O;
    e.cols = K;
  });
  check_shape(e, O, K);
  return &e.bf16;
}

size_t LowpWeightCache::entries() const {
  std::lock_guard<std::mutex> lock(mu_);
  return map_.size();
}

}  // namespace dsv3
