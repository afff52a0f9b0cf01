#include "model/model.h"

#include <algorithm>
#include <cstring>

#include "core/check.h"
#include "kernels/balance.h"
#include "kernels/nn.h"
#include "kernels/precision.h"

namespace dsv3 {

namespace {

std::string layer_prefix(int64_t i) { return "model.layers." + std::to_string(i) + "."; }

// rows (b, i < n) of a [B, from, D] buffer into / onto a [B, n, D] buffer
void take_rows(float* dst, const float* src, int64_t B, int64_t from, int64_t n, int64_t D) {
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(dst + b * n * D, src + b * from * D, sizeof(float) * n * D);
}
void add_rows(float* dst, const float* src, int64_t B, int64_t to, int64_t n, int64_t D) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < n * D; ++j) dst[b * to * D + j] += src[b * n * D + j];
}

// The per-module state of an MTP forward kept for the backward.
struct MtpActs {
  int64_t L = 0;                       // positions per sequence
  std::vector<int64_t> tok, targets;   // [B*L] input tokens t_{i+k}, targets t_{i+k+1} or -1
  std::vector<float> hp, e, en, rstd_e, hpn, rstd_h, cat, hprime, hk, sn, rstd_s, logits, lse,
      rows;
  BlockActs block;
};

}  // namespace

Model::Model(const ModelConfig& c, uint64_t seed) : cfg_(c), layout_(build_layout(c)) {
  dims_ = block_dims(c);
  w_.assign((size_t)layout_.total, 0.f);
  init_params(w_.data(), layout_, seed, c.init_range);
}

const float* Model::head() const {
  return layout_.ptr(w_.data(), cfg_.tie_embeddings ? "model.embed_tokens.weight" : "lm_head.weight");
}

BlockParams Model::block_params(int64_t i) const {
  const std::string p = layer_prefix(i), a = p + "self_attn.", m = p + "mlp.";
  const float* w = w_.data();
  auto W = [&](const std::string& n) { return layout_.has(n) ? layout_.ptr(w, n) : nullptr; };
  BlockParams bp;
  bp.input_layernorm = W(p + "input_layernorm.weight");
  bp.post_attention_layernorm = W(p + "post_attention_layernorm.weight");
  if (dims_.mla)
    bp.mla = MlaParams{W(a + "q_a_proj.weight"), W(a + "q_a_layernorm.weight"),
                       W(a + "q_b_proj.weight"), W(a + "q_proj.weight"),
                       W(a + "kv_a_proj_with_mqa.weight"), W(a + "kv_a_layernorm.weight"),
                       W(a + "kv_b_proj.weight"), W(a + "o_proj.weight")};
  else
    bp.mha = MhaParams{W(a + "q_proj.weight"), W(a + "k_proj.weight"), W(a + "v_proj.weight"),
                       W(a + "o_proj.weight")};
  bp.moe = cfg_.is_moe_layer(i);
  auto sw = [&](const std::string& s) {
    return SwiGluParams{W(s + "gate_proj.weight"), W(s + "up_proj.weight"), W(s + "down_proj.weight")};
  };
  if (!bp.moe) {
    bp.mlp = sw(m);
    return bp;
  }
  bp.experts.gate_weight = W(m + "gate.weight");
  bp.experts.gate_e_score_correction_bias = W(m + "gate.e_score_correction_bias");
  for (int64_t j = 0; j < cfg_.E; ++j) bp.experts.experts.push_back(sw(m + "experts." + std::to_string(j) + "."));
  bp.experts.shared_experts = sw(m + "shared_experts.");
  return bp;
}

BlockGrads Model::block_grads(int64_t i, float* g) const {
  const std::string p = layer_prefix(i), a = p + "self_attn.", m = p + "mlp.";
  auto G = [&](const std::string& n) { return layout_.has(n) ? layout_.ptr(g, n) : nullptr; };
  BlockGrads bg;
  bg.input_layernorm = G(p + "input_layernorm.weight");
  bg.post_attention_layernorm = G(p + "post_attention_layernorm.weight");
  bg.mla = MlaGrads{G(a + "q_a_proj.weight"), G(a + "q_a_layernorm.weight"), G(a + "q_b_proj.weight"),
                    G(a + "q_proj.weight"), G(a + "kv_a_proj_with_mqa.weight"),
                    G(a + "kv_a_layernorm.weight"), G(a + "kv_b_proj.weight"), G(a + "o_proj.weight")};
  bg.mha = MhaGrads{G(a + "q_proj.weight"), G(a + "k_proj.weight"), G(a + "v_proj.weight"),
                    G(a + "o_proj.weight")};
  auto sw = [&](const std::string& s) {
    return SwiGluGrads{G(s + "gate_proj.weight"), G(s + "up_proj.weight"), G(s + "down_proj.weight")};
  };
  if (!cfg_.is_moe_layer(i)) {
    bg.mlp = sw(m);
    return bg;
  }
  bg.experts.gate_weight = G(m + "gate.weight");
  for (int64_t j = 0; j < cfg_.E; ++j) bg.experts.experts.push_back(sw(m + "experts." + std::to_string(j) + "."));
  bg.experts.shared_experts = sw(m + "shared_experts.");
  return bg;
}

void Model::check_tokens(const int64_t* tokens, int64_t n, const char* op) const {
  for (int64_t i = 0; i < n; ++i)
    DSV3_INDEX_CHECK(tokens[i] >= 0 && tokens[i] < cfg_.V, "[", op, "] token id ", tokens[i],
                     " at flat position ", i, " is out of range [0, vocab_size=", cfg_.V, ")");
}

int64_t Model::moe_blocks() const {
  int64_t n = 0;
  for (int64_t i = 0; i < cfg_.blocks(); ++i) n += cfg_.is_moe_layer(i) ? 1 : 0;
  return n;
}

std::vector<float*> Model::expert_biases() {
  std::vector<float*> out;
  for (int64_t i = 0; i < cfg_.blocks(); ++i)
    if (cfg_.is_moe_layer(i)) {
      const std::string n = layer_prefix(i) + "mlp.gate.e_score_correction_bias";
      out.push_back(layout_.has(n) ? layout_.ptr(w_.data(), n) : nullptr);
    }
  return out;
}

void Model::forward(float* logits, const int64_t* tokens, int64_t B, int64_t T) {
  DSV3_CHECK(B >= 1 && T >= 1, "[Model.forward] tokens must hold at least one token");
  check_tokens(tokens, B * T, "Model.forward");
  const int64_t R = B * T, D = cfg_.D;
  std::vector<float> h((size_t)(R * D)), h2((size_t)(R * D));
  embedding_forward(h.data(), tokens, layout_.ptr(w_.data(), "model.embed_tokens.weight"), R,
                    cfg_.V, D);
  BlockActs acts;
  for (int64_t l = 0; l < cfg_.layers; ++l) {
    block_forward(h2.data(), acts, h.data(), block_params(l), dims_, B, T, 0);
    h.swap(h2);
  }
  rmsnorm_forward(h2.data(), nullptr, h.data(), layout_.ptr(w_.data(), "model.norm.weight"), R, D,
                  cfg_.eps);
  linear_forward(logits, h2.data(), head(), R, D, cfg_.V);
}

int64_t Model::cache_width() const {
  return dims_.mla ? cfg_.Dc + cfg_.Dr : dims_.mha_dims.cache_width();
}

std::shared_ptr<KvCache> Model::new_cache(int64_t batch, int64_t max_len) const {
  return std::make_shared<KvCache>(cache_kind(), cfg_.layers, batch, max_len, cache_width());
}

std::shared_ptr<KvCache> Model::new_mtp_cache(int64_t batch, int64_t max_len) const {
  DSV3_CHECK(cfg_.mtp >= 1, "[Model.new_mtp_cache] the model has no MTP module ",
             "(num_nextn_predict_layers = 0)");
  return std::make_shared<KvCache>(cache_kind(), cfg_.mtp, batch, max_len, cache_width());
}

void Model::check_cache(const KvCache& cache, int64_t layers, int64_t B, const char* op) const {
  DSV3_CHECK(cache.kind == cache_kind() && cache.width == cache_width() && cache.layers == layers,
             "[",
             op, "] cache was not made for this model (use model.new_cache / new_mtp_cache)");
  DSV3_CHECK(cache.batch == B, "[", op, "] tokens have batch ", B, " but the cache holds ",
             cache.batch, " sequences");
}

void Model::block_decode(float* h, int64_t block, KvCache& cache, int64_t cache_layer, int64_t B,
                         int64_t S, int64_t start_pos, DecodeScratch& s) const {
  const int64_t R = B * S, D = cfg_.D;
  s.ln.resize((size_t)(R * D));
  s.tmp.resize((size_t)(R * D));
  s.hm.resize((size_t)(R * D));
  const BlockParams p = block_params(block);
  rmsnorm_forward(s.ln.data(), nullptr, h, p.input_layernorm, R, D, cfg_.eps);
  if (dims_.mla)
    mla_decode_absorbed(s.tmp.data(), s.ln.data(), p.mla, dims_.mla_dims,
                        LatentCacheView{cache.layer(cache_layer), cache.max_len}, B, S, start_pos);
  else
    mha_decode(s.tmp.data(), s.ln.data(), p.mha, dims_.mha_dims,
               KvCacheView{cache.layer(cache_layer), cache.max_len}, B, S, start_pos);
  for (int64_t j = 0; j < R * D; ++j) s.hm[j] = h[j] + s.tmp[j];
  rmsnorm_forward(s.ln.data(), nullptr, s.hm.data(), p.post_attention_layernorm, R, D, cfg_.eps);
  if (p.moe) {
    const MoeActsSize sz = moe_acts_size(dims_.moe, R);
    s.mf.resize(sz.floats);
    s.mi.resize(sz.ints);
    moe_forward(s.tmp.data(), moe_acts_view(s.mf.data(), s.mi.data(), dims_.moe, R), s.ln.data(),
                p.experts, dims_.moe, R);
  } else {
    mlp_forward(s.tmp.data(), s.mlp, s.ln.data(), p.mlp, R, D, cfg_.inter);
  }
  for (int64_t j = 0; j < R * D; ++j) h[j] = s.hm[j] + s.tmp[j];
}

void Model::forward_cached(float* logits, float* hidden, const int64_t* tokens, int64_t B,
                           int64_t S, KvCache& cache, int64_t start_pos) {
  const char* op = "Model.forward";
  DSV3_CHECK(B >= 1 && S >= 1, "[", op, "] tokens must hold at least one token");
  check_tokens(tokens, B * S, op);
  check_cache(cache, cfg_.layers, B, op);
  for (int64_t l = 0; l < cfg_.layers; ++l) cache.check_step(l, start_pos, S);
  // Rows from start_pos on are about to be rewritten layer by layer: until every layer has
  // succeeded the cache only vouches for the tokens before start_pos, so a failure midway
  // (e.g. non-finite activations) leaves a consistent, shorter cache instead of stale rows.
  for (int64_t l = 0; l < cfg_.layers; ++l) cache.length[l] = std::min(cache.length[l], start_pos);
  const int64_t R = B * S, D = cfg_.D;
  std::vector<float> h((size_t)(R * D)), hn((size_t)(R * D));
  embedding_forward(h.data(), tokens, layout_.ptr(w_.data(), "model.embed_tokens.weight"), R,
                    cfg_.V, D);
  DecodeScratch s;
  for (int64_t l = 0; l < cfg_.layers; ++l) block_decode(h.data(), l, cache, l, B, S, start_pos, s);
  for (int64_t l = 0; l < cfg_.layers; ++l) cache.length[l] = start_pos + S;  // all succeeded
  rmsnorm_forward(hn.data(), nullptr, h.data(), layout_.ptr(w_.data(), "model.norm.weight"), R, D,
                  cfg_.eps);
  if (hidden) std::memcpy(hidden, hn.data(), sizeof(float) * R * D);
  linear_forward(logits, hn.data(), head(), R, D, cfg_.V);
}

void Model::mtp_forward_cached(float* logits, float* hidden_out, const float* h_prev,
                               const int64_t* tokens, int64_t B, int64_t S, KvCache& cache,
                               int64_t start_pos, int64_t k) {
  const char* op = "Model.mtp_forward";
  DSV3_CHECK(cfg_.mtp >= 1, "[", op, "] the model has no MTP module");
  DSV3_INDEX_CHECK(k >= 1 && k <= cfg_.mtp, "[", op, "] module k = ", k, " out of range [1, ",
                   cfg_.mtp, "]");
  DSV3_CHECK(B >= 1 && S >= 1, "[", op, "] tokens must hold at least one token");
  check_tokens(tokens, B * S, op);
  check_cache(cache, cfg_.mtp, B, op);
  cache.check_step(k - 1, start_pos, S);
  cache.length[k - 1] = std::min(cache.length[k - 1], start_pos);  // see forward_cached
  const int64_t R = B * S, D = cfg_.D, V = cfg_.V;
  const std::string p = layer_prefix(cfg_.layers + k - 1);
  auto P = [&](const std::string& n) { return layout_.ptr(w_.data(), n); };
  std::vector<float> e((size_t)(R * D)), en((size_t)(R * D)), hpn((size_t)(R * D)),
      cat((size_t)(R * 2 * D)), h((size_t)(R * D)), sn((size_t)(R * D));
  embedding_forward(e.data(), tokens, P("model.embed_tokens.weight"), R, V, D);
  rmsnorm_forward(en.data(), nullptr, e.data(), P(p + "enorm.weight"), R, D, cfg_.eps);
  rmsnorm_forward(hpn.data(), nullptr, h_prev, P(p + "hnorm.weight"), R, D, cfg_.eps);
  for (int64_t r = 0; r < R; ++r) {  // EMBEDDING FIRST (SPEC §2.5)
    std::memcpy(cat.data() + r * 2 * D, en.data() + r * D, sizeof(float) * D);
    std::memcpy(cat.data() + r * 2 * D + D, hpn.data() + r * D, sizeof(float) * D);
  }
  linear_forward(h.data(), cat.data(), P(p + "eh_proj.weight"), R, 2 * D, D);
  DecodeScratch s;
  block_decode(h.data(), cfg_.layers + k - 1, cache, k - 1, B, S, start_pos, s);
  cache.length[k - 1] = start_pos + S;
  if (hidden_out) std::memcpy(hidden_out, h.data(), sizeof(float) * R * D);
  rmsnorm_forward(sn.data(), nullptr, h.data(), P(p + "shared_head.norm.weight"), R, D, cfg_.eps);
  linear_forward(logits, sn.data(), head(), R, D, V);
}

namespace {

// lm_head stays fp32 in every training precision (SPEC §2.6).
void head_forward(float* y, const float* x, const float* w, int64_t R, int64_t K, int64_t O) {
  ScopedGemmPrecision fp32(GemmPrecision::fp32);
  linear_forward(y, x, w, R, K, O);
}
void head_backward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                   int64_t R, int64_t K, int64_t O) {
  ScopedGemmPrecision fp32(GemmPrecision::fp32);
  linear_backward(dx, dw, dy, x, w, R, K, O);
}

}  // namespace

LossParts Model::loss(const int64_t* tokens, int64_t B, int64_t N, float* grads, double alpha,
                      double mtp_weight) {
  const char* op = "Model.loss";
  DSV3_CHECK(B >= 1 && N >= 2, "[", op, "] tokens must be (batch, N) with N >= 2 (N tokens give ",
             "N-1 targets), got N=", N);
  check_tokens(tokens, B * N, op);
  const int64_t T = N - 1, R = B * T, D = cfg_.D, V = cfg_.V, Lm = cfg_.layers;
  const float* w = w_.data();
  auto P = [&](const std::string& n) { return layout_.ptr(w, n); };
  std::vector<int64_t> input((size_t)R), targets((size_t)R);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < T; ++i) {
      input[b * T + i] = tokens[b * N + i];
      targets[b * T + i] = tokens[b * N + i + 1];
    }
  // ---- main model
  std::vector<std::vector<float>> H((size_t)Lm + 1, std::vector<float>((size_t)(R * D)));
  std::vector<BlockActs> acts((size_t)Lm);
  embedding_forward(H[0].data(), input.data(), P("model.embed_tokens.weight"), R, V, D);
  for (int64_t l = 0; l < Lm; ++l) {
    if (grads) acts[l].keep_for_backward();
    block_forward(H[l + 1].data(), acts[l], H[l].data(), block_params(l), dims_, B, T, 0);
  }
  std::vector<float> hn((size_t)(R * D)), rstd_f((size_t)R), logits((size_t)(R * V)),
      lrows((size_t)R), lse((size_t)R);
  rmsnorm_forward(hn.data(), rstd_f.data(), H[Lm].data(), P("model.norm.weight"), R, D, cfg_.eps);
  head_forward(logits.data(), hn.data(), head(), R, D, V);
  cross_entropy_forward(lrows.data(), lse.data(), logits.data(), targets.data(), R, V, -1);
  LossParts out;
  for (int64_t r = 0; r < R; ++r) out.main += lrows[r];
  out.main /= (double)R;
  // ---- MTP modules
  const int64_t Dm = cfg_.mtp;
  std::vector<MtpActs> mtp((size_t)Dm);
  for (int64_t k = 1; k <= Dm && mtp_weight > 0; ++k) {
    MtpActs& m = mtp[k - 1];
    m.L = T - k + 1;
    if (m.L < 2) break;  // no valid target left for this depth
    const int64_t Rk = B * m.L, prevL = k == 1 ? T : mtp[k - 2].L;
    const std::string p = layer_prefix(Lm + k - 1);
    m.tok.resize(Rk);
    m.targets.resize(Rk);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < m.L; ++i) {
        m.tok[b * m.L + i] = tokens[b * N + i + k];
        m.targets[b * m.L + i] = i + k + 1 < N ? tokens[b * N + i + k + 1] : -1;
      }
    m.hp.resize(Rk * D);
    take_rows(m.hp.data(), k == 1 ? hn.data() : mtp[k - 2].hk.data(), B, prevL, m.L, D);
    m.e.resize(Rk * D);
    embedding_forward(m.e.data(), m.tok.data(), P("model.embed_tokens.weight"), Rk, V, D);
    m.en.resize(Rk * D);
    m.rstd_e.resize(Rk);
    m.hpn.resize(Rk * D);
    m.rstd_h.resize(Rk);
    rmsnorm_forward(m.en.data(), m.rstd_e.data(), m.e.data(), P(p + "enorm.weight"), Rk, D, cfg_.eps);
    rmsnorm_forward(m.hpn.data(), m.rstd_h.data(), m.hp.data(), P(p + "hnorm.weight"), Rk, D,
                    cfg_.eps);
    m.cat.resize(Rk * 2 * D);
    for (int64_t r = 0; r < Rk; ++r) {  // EMBEDDING FIRST (SPEC §2.5)
      std::memcpy(m.cat.data() + r * 2 * D, m.en.data() + r * D, sizeof(float) * D);
      std::memcpy(m.cat.data() + r * 2 * D + D, m.hpn.data() + r * D, sizeof(float) * D);
    }
    m.hprime.resize(Rk * D);
    linear_forward(m.hprime.data(), m.cat.data(), P(p + "eh_proj.weight"), Rk, 2 * D, D);
    m.hk.resize(Rk * D);
    if (grads) m.block.keep_for_backward();
    block_forward(m.hk.data(), m.block, m.hprime.data(), block_params(Lm + k - 1), dims_, B, m.L, 0);
    m.sn.resize(Rk * D);
    m.rstd_s.resize(Rk);
    rmsnorm_forward(m.sn.data(), m.rstd_s.data(), m.hk.data(), P(p + "shared_head.norm.weight"), Rk,
                    D, cfg_.eps);
    m.logits.resize(Rk * V);
    head_forward(m.logits.data(), m.sn.data(), head(), Rk, D, V);
    m.rows.resize(Rk);
    m.lse.resize(Rk);
    cross_entropy_forward(m.rows.data(), m.lse.data(), m.logits.data(), m.targets.data(), Rk, V, -1);
    double s = 0;
    for (int64_t r = 0; r < Rk; ++r) s += m.rows[r];
    out.mtp += mtp_weight / (double)Dm * s / (double)R;
  }
  // ---- balance statistics and loss over every MoE block that ran
  struct MoeRef { BlockActs* a; int64_t T; };
  std::vector<MoeRef> moes;
  for (int64_t l = 0; l < Lm; ++l)
    if (cfg_.is_moe_layer(l)) moes.push_back({&acts[l], T});
  for (int64_t k = 1; k <= Dm; ++k)
    if (cfg_.is_moe_layer(Lm + k - 1) && mtp[k - 1].L >= 2 && mtp_weight > 0)
      moes.push_back({&mtp[k - 1].block, mtp[k - 1].L});
  out.moe_blocks = (int64_t)moes.size();
  out.expert_load.assign((size_t)(moes.size() * cfg_.E), 0);
  for (size_t j = 0; j < moes.size(); ++j) {
    std::copy(moes[j].a->moe.expert_count, moes[j].a->moe.expert_count + cfg_.E,
              out.expert_load.begin() + j * cfg_.E);
    if (alpha > 0)
      out.balance += seq_balance_loss_forward(moes[j].a->moe.scores, moes[j].a->moe.topk_idx, B,
                                              moes[j].T, cfg_.E, cfg_.K, alpha) /
                     (double)moes.size();
  }
  out.loss = out.main + out.mtp + out.balance;
  if (!grads) return out;

  // ================= backward
  float* g = grads;
  auto Gp = [&](const std::string& n) { return layout_.ptr(g, n); };
  float* g_head = Gp(cfg_.tie_embeddings ? "model.embed_tokens.weight" : "lm_head.weight");
  float* g_embed = Gp("model.embed_tokens.weight");
  auto balance_grad = [&](const BlockActs& a, int64_t Tb) {
    std::vector<float> ds;
    if (alpha <= 0 || !cfg_.E) return ds;
    ds.assign((size_t)(B * Tb * cfg_.E), 0.f);
    seq_balance_loss_backward(ds.data(), 1.0 / (double)moes.size(), a.moe.scores, a.moe.topk_idx,
                              B, Tb, cfg_.E, cfg_.K, alpha);
    return ds;
  };
  std::vector<float> dl((size_t)(R * V), 0.f), dhn((size_t)(R * D), 0.f);
  cross_entropy_backward(dl.data(), lse.data(), logits.data(), targets.data(), R, V, -1,
                         (float)(1.0 / (double)R));
  head_backward(dhn.data(), g_head, dl.data(), hn.data(), head(), R, D, V);
  std::vector<float> dnext;  // dL/dh^k from module k+1
  for (int64_t k = Dm; k >= 1; --k) {
    MtpActs& m = mtp[k - 1];
    if (m.L < 2 || mtp_weight <= 0) continue;
    const int64_t Rk = B * m.L, prevL = k == 1 ? T : mtp[k - 2].L;
    const std::string p = layer_prefix(Lm + k - 1);
    std::vector<float> dhk((size_t)(Rk * D), 0.f), dlk((size_t)(Rk * V), 0.f),
        dsn((size_t)(Rk * D), 0.f);
    if (!dnext.empty()) dhk = dnext;
    cross_entropy_backward(dlk.data(), m.lse.data(), m.logits.data(), m.targets.data(), Rk, V, -1,
                           (float)(mtp_weight / (double)Dm / (double)R));
    head_backward(dsn.data(), g_head, dlk.data(), m.sn.data(), head(), Rk, D, V);
    rmsnorm_backward(dhk.data(), Gp(p + "shared_head.norm.weight"), dsn.data(), m.rstd_s.data(),
                     m.hk.data(), P(p + "shared_head.norm.weight"), Rk, D);
    std::vector<float> dhp((size_t)(Rk * D), 0.f), dcat((size_t)(Rk * 2 * D), 0.f);
    const std::vector<float> ds = balance_grad(m.block, m.L);
    block_backward(dhp.data(), block_grads(Lm + k - 1, g), dhk.data(), ds.empty() ? nullptr : ds.data(),
                   m.block, m.hprime.data(), block_params(Lm + k - 1), dims_);
    linear_backward(dcat.data(), Gp(p + "eh_proj.weight"), dhp.data(), m.cat.data(),
                    P(p + "eh_proj.weight"), Rk, 2 * D, D);
    std::vector<float> den((size_t)(Rk * D)), dhpn((size_t)(Rk * D)), de((size_t)(Rk * D), 0.f),
        dprev((size_t)(Rk * D), 0.f);
    for (int64_t r = 0; r < Rk; ++r) {
      std::memcpy(den.data() + r * D, dcat.data() + r * 2 * D, sizeof(float) * D);
      std::memcpy(dhpn.data() + r * D, dcat.data() + r * 2 * D + D, sizeof(float) * D);
    }
    rmsnorm_backward(de.data(), Gp(p + "enorm.weight"), den.data(), m.rstd_e.data(), m.e.data(),
                     P(p + "enorm.weight"), Rk, D);
    embedding_backward(g_embed, de.data(), m.tok.data(), Rk, V, D);
    rmsnorm_backward(dprev.data(), Gp(p + "hnorm.weight"), dhpn.data(), m.rstd_h.data(),
                     m.hp.data(), P(p + "hnorm.weight"), Rk, D);
    if (k == 1) {
      add_rows(dhn.data(), dprev.data(), B, T, m.L, D);
    } else {
      dnext.assign((size_t)(B * prevL * D), 0.f);
      add_rows(dnext.data(), dprev.data(), B, prevL, m.L, D);
    }
  }
  std::vector<float> dH((size_t)(R * D), 0.f), dprev((size_t)(R * D));
  rmsnorm_backward(dH.data(), Gp("model.norm.weight"), dhn.data(), rstd_f.data(), H[Lm].data(),
                   P("model.norm.weight"), R, D);
  for (int64_t l = Lm - 1; l >= 0; --l) {
    std::fill(dprev.begin(), dprev.end(), 0.f);
    const std::vector<float> ds = cfg_.is_moe_layer(l) ? balance_grad(acts[l], T) : std::vector<float>();
    block_backward(dprev.data(), block_grads(l, g), dH.data(), ds.empty() ? nullptr : ds.data(),
                   acts[l], H[l].data(), block_params(l), dims_);
    dH.swap(dprev);
  }
  embedding_backward(g_embed, dH.data(), input.data(), R, V, D);
  return out;
}

}  // namespace dsv3
