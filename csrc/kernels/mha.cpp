#include "kernels/mha.h"

#include <cstring>

#include "core/bf16.h"
#include "core/check.h"
#include "core/memory.h"
#include "kernels/attention.h"
#include "kernels/nn.h"

namespace dsv3 {

void mha_check_dims(const MhaDims& d) {
  DSV3_CHECK(d.D >= 1 && d.H >= 1 && d.Hkv >= 1 && d.Dn >= 0 && d.Dr >= 2 && d.Dv >= 1,
             "[mha] invalid dims (D=", d.D, ", H=", d.H, ", Hkv=", d.Hkv, ", Dn=", d.Dn,
             ", Dr=", d.Dr, ", Dv=", d.Dv, ")");
  DSV3_CHECK(d.H % d.Hkv == 0, "[mha] num_key_value_heads (", d.Hkv,
             ") must divide num_attention_heads (", d.H, ")");
  DSV3_CHECK((int64_t)d.rope.inv_freq.size() == d.Dr / 2 && d.Dr % 2 == 0,
             "[mha] rope table does not match qk_rope_head_dim ", d.Dr);
}

void mha_check_params(const MhaParams& p) {
  DSV3_CHECK(p.q_proj.data && p.k_proj.data && p.v_proj.data && p.o_proj.data,
             "[mha] q_proj, k_proj, v_proj and o_proj are required");
}

namespace {

// q [R,H,Dqk], k [R,Hkv,Dqk] roped; v [R,Hkv,Dv]
void project(float* q, float* k, float* v, const float* x, const MhaParams& p, const MhaDims& d,
             const int64_t* pos, int64_t R) {
  const int64_t Q = d.H * d.dqk(), K = d.Hkv * d.dqk();
  linear_forward(q, x, p.q_proj, R, d.D, Q, p.precision);
  linear_forward(k, x, p.k_proj, R, d.D, K, p.precision);
  linear_forward(v, x, p.v_proj, R, d.D, d.Hkv * d.Dv, p.precision);
  rope_forward(q + d.Dn, Q, d.dqk(), q + d.Dn, Q, d.dqk(), pos, R, d.H, d.rope);
  rope_forward(k + d.Dn, K, d.dqk(), k + d.Dn, K, d.dqk(), pos, R, d.Hkv, d.rope);
}

}  // namespace

void mha_forward(float* out, MhaActs& a, const float* x, const MhaParams& p, const MhaDims& d,
                 int64_t B, int64_t T, int64_t start_pos) {
  mha_check_dims(d);
  mha_check_params(p);
  DSV3_CHECK(B >= 1 && T >= 1 && start_pos >= 0, "[mha] need B, T >= 1 and start_pos >= 0");
  const int64_t R = B * T;
  a.B = B;
  a.T = T;
  a.pos = row_positions(B, T, start_pos);
  a.q.resize(R * d.H * d.dqk());
  a.k.resize(R * d.Hkv * d.dqk());
  a.v.resize(R * d.Hkv * d.Dv);
  project(a.q.data(), a.k.data(), a.v.data(), x, p, d, a.pos.data(), R);
  a.o.resize(R * d.H * d.Dv);
  a.lse.resize(B * d.H * T);
  const AttnShape s{B, T, T, d.H, d.Hkv, d.dqk(), d.Dv, 0, d.scale};
  a.probs.prepare(s, a.keep_probs);
  attention_forward(a.o.data(), a.lse.data(), {a.q.data(), a.k.data(), a.v.data()}, s,
                    a.probs.get());
  linear_forward(out, a.o.data(), p.o_proj, R, d.H * d.Dv, d.D, p.precision);
}

void mha_backward(float* dx, const MhaGrads& g, const float* d_out, const MhaActs& a,
                  const float* x, const MhaParams& p, const MhaDims& d, bool set_dx) {
  const int64_t B = a.B, T = a.T, R = B * T;
  DSV3_ASSERT(R > 0 && (int64_t)a.o.size() == R * d.H * d.Dv, "mha_backward without forward");
  // fresh gradient buffers, overwritten (not accumulated into) by the first product
  Buf d_o = buf(a.o.size()), dq = buf(a.q.size()), dk = buf(a.k.size()), dv = buf(a.v.size());
  linear_backward(d_o.get(), g.o_proj, d_out, a.o.data(), p.o_proj, R, d.H * d.Dv, d.D, p.precision, true);
  const AttnShape s{B, T, T, d.H, d.Hkv, d.dqk(), d.Dv, 0, d.scale};
  attention_backward({dq.get(), dk.get(), dv.get(), nullptr, /*set=*/true}, d_o.get(),
                     {a.o.data(), a.lse.data(), a.probs.get()},
                     {a.q.data(), a.k.data(), a.v.data()}, s);
  rope_heads_backward(dq.get(), d.H, d.Dn, d.Dr, a.pos.data(), R, d.rope);
  rope_heads_backward(dk.get(), d.Hkv, d.Dn, d.Dr, a.pos.data(), R, d.rope);
  linear_backward(dx, g.q_proj, dq.get(), x, p.q_proj, R, d.D, d.H * d.dqk(), p.precision, set_dx);
  linear_backward(dx, g.k_proj, dk.get(), x, p.k_proj, R, d.D, d.Hkv * d.dqk(), p.precision);
  linear_backward(dx, g.v_proj, dv.get(), x, p.v_proj, R, d.D, d.Hkv * d.Dv, p.precision);
}

void mha_decode(float* out, const float* x, const MhaParams& p, const MhaDims& d,
                const KvCacheView& cache, int64_t B, int64_t S, int64_t start_pos) {
  mha_check_dims(d);
  mha_check_params(p);
  DSV3_CHECK(B >= 1 && S >= 1, "[mha_decode] batch and tokens must be >= 1");
  DSV3_CHECK(start_pos >= 0 && start_pos + S <= cache.max_len, "[mha_decode] start_pos (",
             start_pos, ") + tokens (", S, ") exceeds the cache capacity (", cache.max_len, ")");
  const int64_t R = B * S, K = d.Hkv * d.dqk(), V = d.Hkv * d.Dv, L = start_pos + S;
  const std::vector<int64_t> pos = row_positions(B, S, start_pos);
  std::vector<float> q((size_t)(R * d.H * d.dqk())), k((size_t)(R * K)), v((size_t)(R * V)),
      o((size_t)(R * d.H * d.Dv));
  project(q.data(), k.data(), v.data(), x, p, d, pos.data(), R);
  for (int64_t b = 0; b < B; ++b) {
    float* kc = cache.data + b * cache.max_len * d.cache_width();
    float* vc = kc + cache.max_len * K;
    std::memcpy(kc + start_pos * K, k.data() + b * S * K, sizeof(float) * S * K);
    std::memcpy(vc + start_pos * V, v.data() + b * S * V, sizeof(float) * S * V);
    if (cache.round_bf16) {
      for (int64_t j = start_pos * K; j < L * K; ++j) kc[j] = bf16_decode(bf16_encode(kc[j]));
      for (int64_t j = start_pos * V; j < L * V; ++j) vc[j] = bf16_decode(bf16_encode(vc[j]));
    }
    const AttnShape s{1, S, L, d.H, d.Hkv, d.dqk(), d.Dv, start_pos, d.scale};
    attention_forward(o.data() + b * S * d.H * d.Dv, nullptr,
                      {q.data() + b * S * d.H * d.dqk(), kc, vc}, s);
  }
  linear_forward(out, o.data(), p.o_proj, R, d.H * d.Dv, d.D, p.precision);
}

}  // namespace dsv3
