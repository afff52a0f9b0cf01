#include "model/mtp.h"

#include <cstring>

#include "kernels/nn.h"

namespace dsv3 {

void mtp_input_forward(float* h_prime, MtpInputActs& a, const float* h_prev, int64_t ld_h,
                       const int64_t* tok, int64_t ld_tok, const MtpParams& p, int64_t V,
                       int64_t D, float eps, int64_t B, int64_t L) {
  const int64_t R = B * L;
  a.tok.resize((size_t)R);
  a.h_prev.resize(R * D);
  for (int64_t b = 0; b < B; ++b) {
    std::memcpy(a.tok.data() + b * L, tok + b * ld_tok, sizeof(int64_t) * L);
    std::memcpy(a.h_prev.data() + b * L * D, h_prev + b * ld_h * D, sizeof(float) * L * D);
  }
  a.e.resize(R * D);
  a.en.resize(R * D);
  a.rstd_e.resize(R);
  a.hpn.resize(R * D);
  a.rstd_h.resize(R);
  a.cat.resize(R * 2 * D);
  embedding_forward(a.e.data(), a.tok.data(), p.embed_tokens, R, V, D);
  rmsnorm_forward(a.en.data(), a.rstd_e.data(), a.e.data(), p.enorm, R, D, eps);
  rmsnorm_forward(a.hpn.data(), a.rstd_h.data(), a.h_prev.data(), p.hnorm, R, D, eps);
  for (int64_t r = 0; r < R; ++r) {  // EMBEDDING FIRST (docs/semantics.md §2.5)
    std::memcpy(a.cat.data() + r * 2 * D, a.en.data() + r * D, sizeof(float) * D);
    std::memcpy(a.cat.data() + r * 2 * D + D, a.hpn.data() + r * D, sizeof(float) * D);
  }
  linear_forward(h_prime, a.cat.data(), p.eh_proj, R, 2 * D, D, p.precision);
}

void mtp_input_backward(float* dh_prev, int64_t ld_h, const MtpGrads& g, const float* dh_prime,
                        const MtpInputActs& a, const MtpParams& p, int64_t V, int64_t D,
                        int64_t B, int64_t L) {
  const int64_t R = B * L;
  std::vector<float> dcat((size_t)(R * 2 * D), 0.f);
  linear_backward(dcat.data(), g.eh_proj, dh_prime, a.cat.data(), p.eh_proj, R, 2 * D, D, p.precision);
  std::vector<float> den((size_t)(R * D)), dhpn((size_t)(R * D)), de((size_t)(R * D), 0.f),
      dprev((size_t)(R * D), 0.f);
  for (int64_t r = 0; r < R; ++r) {
    std::memcpy(den.data() + r * D, dcat.data() + r * 2 * D, sizeof(float) * D);
    std::memcpy(dhpn.data() + r * D, dcat.data() + r * 2 * D + D, sizeof(float) * D);
  }
  rmsnorm_backward(de.data(), g.enorm, den.data(), a.rstd_e.data(), a.e.data(), p.enorm, R, D);
  embedding_backward(g.embed_tokens, de.data(), a.tok.data(), R, V, D);
  rmsnorm_backward(dprev.data(), g.hnorm, dhpn.data(), a.rstd_h.data(), a.h_prev.data(), p.hnorm,
                   R, D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < L * D; ++j) dh_prev[b * ld_h * D + j] += dprev[b * L * D + j];
}

void mtp_output(float* out, float* rstd, const float* hk, const MtpParams& p, int64_t R,
                int64_t D, float eps) {
  rmsnorm_forward(out, rstd, hk, p.shared_head_norm, R, D, eps);
}

void mtp_forward(MtpActs& a, const float* h_prev, int64_t ld_h, const int64_t* tok,
                 int64_t ld_tok, const MtpParams& p, const BlockDims& d, int64_t V, int64_t B,
                 int64_t L, bool keep) {
  const int64_t R = B * L, D = d.D;
  a.B = B;
  a.L = L;
  a.h_prime.resize(R * D);
  a.hk.resize(R * D);
  a.out.resize(R * D);
  a.rstd_out.resize(R);
  mtp_input_forward(a.h_prime.data(), a.in, h_prev, ld_h, tok, ld_tok, p, V, D, d.eps, B, L);
  if (keep) a.block.keep_for_backward();
  block_forward(a.hk.data(), a.block, a.h_prime.data(), p.block, d, B, L, 0);
  mtp_output(a.out.data(), a.rstd_out.data(), a.hk.data(), p, R, D, d.eps);
}

void mtp_backward(float* dh_prev, int64_t ld_h, const MtpGrads& g, const float* d_out,
                  const float* d_hk, const float* d_scores_extra, const MtpActs& a,
                  const MtpParams& p, const BlockDims& d, int64_t V) {
  const int64_t R = a.B * a.L, D = d.D;
  std::vector<float> dhk = d_hk ? std::vector<float>(d_hk, d_hk + R * D)
                                : std::vector<float>((size_t)(R * D), 0.f);
  rmsnorm_backward(dhk.data(), g.shared_head_norm, d_out, a.rstd_out.data(), a.hk.data(),
                   p.shared_head_norm, R, D);
  std::vector<float> dhp((size_t)(R * D), 0.f);
  block_backward(dhp.data(), g.block, dhk.data(), d_scores_extra, a.block, a.h_prime.data(),
                 p.block, d);
  mtp_input_backward(dh_prev, ld_h, g, dhp.data(), a.in, p, V, D, a.B, a.L);
}

}  // namespace dsv3
