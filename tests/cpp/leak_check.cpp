// C++-only exercise of the engine for LeakSanitizer (built by .ci/asan with the sanitizers):
// the model's forward, loss + backward, cached decoding and the error paths, FP8 quantization
// and GEMM, repeated. Python is not involved, so any leak report is the engine's own.
#include <cstdio>
#include <stdexcept>
#include <vector>

#include "kernels/fp8.h"
#include "model/model.h"

using namespace dsv3;

int main() {
  ModelConfig c;
  c.V = 64; c.D = 48; c.inter = 96; c.moe_inter = 32; c.layers = 2; c.mtp = 1; c.H = 4;
  c.Hkv = 4; c.Dq = 24; c.Dc = 16; c.Dn = 8; c.Dr = 4; c.Dv = 8; c.E = 8; c.n_shared = 1;
  c.K = 2; c.n_group = 4; c.topk_group = 2; c.routed_scaling_factor = 2.5f;
  c.first_k_dense = 1; c.softmax_scale = 0.2886751f;
  c.rope.dim = c.Dr;
  Model m(c, 0);
  std::vector<int64_t> tok(2 * 9);
  for (size_t i = 0; i < tok.size(); ++i) tok[i] = (int64_t)((i * 7) % 64);
  std::vector<float> logits(2 * 9 * 64), grads(m.layout().total);
  for (int it = 0; it < 3; ++it) {
    m.forward(logits.data(), tok.data(), 2, 8);
    m.loss(tok.data(), 2, 9, grads.data(), 1e-3, 0.3, GemmPrecision::fp32);
    m.loss(tok.data(), 2, 9, grads.data(), 1e-3, 0.3, GemmPrecision::fp8);
    auto cache = m.new_cache(2, 16);
    m.forward_cached(logits.data(), nullptr, tok.data(), 2, 4, *cache, 0);
    try {  // an error path in the middle of the library
      std::vector<int64_t> bad(2, 99);
      m.forward_cached(logits.data(), nullptr, bad.data(), 2, 1, *cache, 4);
    } catch (const std::out_of_range&) {
    }
    std::vector<float> x(64 * 256), w(128 * 256), y(64 * 128);
    for (size_t i = 0; i < x.size(); ++i) x[i] = (float)((i % 13) - 6) * 0.1f;
    for (size_t i = 0; i < w.size(); ++i) w[i] = (float)((i % 7) - 3) * 0.1f;
    std::vector<uint8_t> xq(x.size()), wq(w.size());
    std::vector<float> xs(64 * 2), ws(1 * 2);
    fp8_quantize(xq.data(), xs.data(), x.data(), 64, 256, Fp8Block{1, 128}, Fp8Format::e4m3, false);
    fp8_quantize(wq.data(), ws.data(), w.data(), 128, 256, Fp8Block{128, 128}, Fp8Format::e4m3, false);
  }
  std::printf("leak_check: done\n");
  return 0;
}
