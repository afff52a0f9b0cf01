#include "model/block.h"

#include "core/check.h"
#include "core/memory.h"
#include "core/parallel.h"
#include "kernels/nn.h"

namespace dsv3 {

BlockDims block_dims(const ModelConfig& c) {
  BlockDims d;
  d.D = c.D;
  d.inter = c.inter;
  d.eps = c.eps;
  d.mla = c.attention == "mla";
  const RopeTable rope = rope_table(c.rope);
  d.mla_dims = MlaDims{c.D, c.H, c.Dq, c.Dc, c.Dn, c.Dr, c.Dv, c.eps, c.softmax_scale, rope};
  d.mha_dims = MhaDims{c.D, c.H, c.Hkv, c.Dn, c.Dr, c.Dv, c.softmax_scale, rope};
  if (c.E > 0) {
    MoeConfig& m = d.moe;
    m.n_routed_experts = c.E;
    m.num_experts_per_tok = c.K;
    m.n_group = c.n_group;
    m.topk_group = c.topk_group;
    m.topk_method = topk_method_from(c.topk_method, "Model");
    m.scoring_func = scoring_func_from(c.scoring_func, "Model");
    m.norm_topk_prob = c.norm_topk_prob;
    m.routed_scaling_factor = c.routed_scaling_factor;
    m.hidden_size = c.D;
    m.moe_intermediate_size = c.moe_inter;
    m.n_shared_experts = c.n_shared;
    moe_config_check(m, "Model");
  }
  return d;
}

namespace {

void add_into(float* dst, const float* a, const float* b, int64_t n) {
  parallel_for(n, 1 << 15, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) dst[i] = a[i] + b[i];
  });
}
void acc_into(float* dst, const float* a, int64_t n) {
  parallel_for(n, 1 << 15, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) dst[i] += a[i];
  });
}

}  // namespace

void block_forward(float* h_out, BlockActs& a, const float* h_in, const BlockParams& p,
                   const BlockDims& d, int64_t B, int64_t T, int64_t start_pos) {
  const int64_t R = B * T, D = d.D;
  a.B = B;
  a.T = T;
  a.ln1.resize(R * D);
  a.rstd1.resize(R);
  a.h_mid.resize(R * D);
  a.ln2.resize(R * D);
  a.rstd2.resize(R);
  Buf tmp = buf(R * D);
  rmsnorm_forward(a.ln1.data(), a.rstd1.data(), h_in, p.input_layernorm, R, D, d.eps);
  if (d.mla)
    mla_forward(tmp.get(), a.mla, a.ln1.data(), p.mla, d.mla_dims, B, T, start_pos);
  else
    mha_forward(tmp.get(), a.mha, a.ln1.data(), p.mha, d.mha_dims, B, T, start_pos);
  add_into(a.h_mid.data(), h_in, tmp.get(), R * D);
  rmsnorm_forward(a.ln2.data(), a.rstd2.data(), a.h_mid.data(), p.post_attention_layernorm, R, D,
                  d.eps);
  if (p.moe) {
    const MoeActsSize sz = moe_acts_size(d.moe, R);
    a.moe_f.resize(sz.floats);
    a.moe_i.resize(sz.ints);
    a.moe = moe_acts_view(a.moe_f.data(), a.moe_i.data(), d.moe, R);
    a.moe.ep_state = &a.moe_ep;
    moe_forward(tmp.get(), a.moe, a.ln2.data(), p.experts, d.moe, R);
  } else {
    mlp_forward(tmp.get(), a.mlp, a.ln2.data(), p.mlp, R, D, d.inter);
  }
  add_into(h_out, a.h_mid.data(), tmp.get(), R * D);
}

void block_backward(float* dh_in, const BlockGrads& g, const float* dh_out,
                    const float* d_scores_extra, const BlockActs& a, const float* h_in,
                    const BlockParams& p, const BlockDims& d) {
  const int64_t R = a.B * a.T, D = d.D;
  // ffn branch: dh_mid = dh_out + d(rmsnorm2 input)
  std::vector<float> d_ln((size_t)(R * D), 0.f), dh_mid(dh_out, dh_out + R * D);
  if (p.moe)
    moe_backward(d_ln.data(), g.experts, dh_out, d_scores_extra, a.moe, a.ln2.data(), p.experts,
                 d.moe, R);
  else
    mlp_backward(d_ln.data(), g.mlp, dh_out, a.mlp, a.ln2.data(), p.mlp, R, D, d.inter);
  rmsnorm_backward(dh_mid.data(), g.post_attention_layernorm, d_ln.data(), a.rstd2.data(),
                   a.h_mid.data(), p.post_attention_layernorm, R, D);
  // attention branch: dh_in += dh_mid + d(rmsnorm1 input)
  if (d.mla)
    mla_backward(d_ln.data(), g.mla, dh_mid.data(), a.mla, a.ln1.data(), p.mla, d.mla_dims,
                 /*set_dx=*/true);
  else
    mha_backward(d_ln.data(), g.mha, dh_mid.data(), a.mha, a.ln1.data(), p.mha, d.mha_dims,
                 /*set_dx=*/true);
  acc_into(dh_in, dh_mid.data(), R * D);
  rmsnorm_backward(dh_in, g.input_layernorm, d_ln.data(), a.rstd1.data(), h_in,
                   p.input_layernorm, R, D);
}

}  // namespace dsv3
