#include "model/model.h"

#include <algorithm>
#include <cstring>

#include "core/check.h"
#include "kernels/nn.h"

namespace dsv3 {

Model::Model(const ModelConfig& c, uint64_t seed, bool random_init)
    : cfg_(c), layout_(build_layout(c)) {
  dims_ = block_dims(c);
  w_.assign((size_t)layout_.total, 0.f);
  if (random_init) init_params(w_.data(), layout_, seed, c.init_range);
}

Model::Model(const ModelConfig& c, uint64_t seed, const ExpertShard& shard, bool random_init)
    : cfg_(c), layout_(shard_layout(build_layout(c), c.E, shard)), shard_(shard) {
  dims_ = block_dims(c);
  w_.assign((size_t)layout_.total, 0.f);
  if (random_init) init_params(w_.data(), layout_, seed, c.init_range);
}

void Model::shard_experts(const ExpertShard& s) {
  DSV3_CHECK(!resident_model_, "[Model] a model of resident weights cannot be sharded");
  DSV3_CHECK(!shard_.sharded(), "[Model] the model is already an expert shard (ep=", shard_.ep,
             ", index ", shard_.index, ")");
  if (!s.sharded()) return;
  ParamLayout L = shard_layout(layout_, cfg_.E, s);
  std::vector<float> w((size_t)L.total, 0.f);
  copy_entries(layout_, w_.data(), L, w.data());
  layout_ = std::move(L);
  w_.swap(w);
  shard_ = s;
  std::lock_guard<std::mutex> lk(decode_views_mu_);
  decode_views_.reset();
}

std::shared_ptr<const Model::DecodeViews> Model::decode_views() const {
  std::lock_guard<std::mutex> lk(decode_views_mu_);
  if (!decode_views_ || decode_views_->slab != w_.data()) {
    auto v = std::make_shared<DecodeViews>();
    v->slab = w_.data();
    for (int64_t l = 0; l < cfg_.layers; ++l)
      v->blocks.push_back(unchecked_block_params(l));
    for (int64_t k = 1; k <= cfg_.mtp; ++k) v->mtp.push_back(unchecked_mtp_params(k));
    decode_views_ = std::move(v);
  }
  return decode_views_;
}

const char* Model::head_name() const {
  return cfg_.tie_embeddings ? hf::embed_tokens : hf::lm_head;
}
WeightView Model::head() const { return param_view(head_name()); }
WeightView Model::embed() const { return param_view(hf::embed_tokens); }
const float* Model::final_norm() const { return layout_.ptr(w_.data(), hf::norm); }

void Model::check_shard(int64_t i, const ExpertParallel* ep) const {
  DSV3_CHECK(!shard_.sharded() || !cfg_.is_moe_layer(i) || (ep && ep->size() == shard_.ep),
             "[Model] this model holds only routed experts [", shard_.first(cfg_.E), ", ",
             shard_.end(cfg_.E), ") of ", cfg_.E, " (expert-parallel shard ", shard_.index,
             " of ep=", shard_.ep, "): it computes inside its parallel Trainer only (step, "
             "evaluate); gather the full weights (Trainer.full_state_dict / save) for anything else");
}

BlockParams Model::block_params(int64_t i, const LinearMode& p, ExpertParallel* ep) const {
  check_shard(i, ep);
  return unchecked_block_params(i, p, ep);
}
BlockParams Model::unchecked_block_params(int64_t i, const LinearMode& p,
                                          ExpertParallel* ep) const {
  BlockParams b = dsv3::block_params(layout_, w_.data(), cfg_, i, resident_views());
  set_kv_b_view(b, i);
  set_precision(b, p);
  b.experts.ep = ep;
  return b;
}
BlockGrads Model::block_grads(int64_t i, float* g) const {
  return dsv3::block_grads(layout_, g, cfg_, i);
}
MtpParams Model::mtp_params(int64_t k, const LinearMode& p, ExpertParallel* ep) const {
  check_shard(cfg_.layers + k - 1, ep);
  return unchecked_mtp_params(k, p, ep);
}
MtpParams Model::unchecked_mtp_params(int64_t k, const LinearMode& p,
                                      ExpertParallel* ep) const {
  MtpParams m = dsv3::mtp_params(layout_, w_.data(), cfg_, k, resident_views());
  set_kv_b_view(m.block, cfg_.layers + k - 1);
  m.precision = p;
  set_precision(m.block, p);
  m.block.experts.ep = ep;
  return m;
}
MtpGrads Model::mtp_grads(int64_t k, float* g) const {
  return dsv3::mtp_grads(layout_, g, cfg_, k);
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
      const std::string n = hf::expert_bias(i);
      out.push_back(layout_.has(n) ? layout_.ptr(w_.data(), n) : nullptr);
    }
  return out;
}

void Model::forward(float* logits, const int64_t* tokens, int64_t B, int64_t T) {
  DSV3_CHECK(B >= 1 && T >= 1, "[Model.forward] tokens must hold at least one token");
  check_tokens(tokens, B * T, "Model.forward");
  const int64_t R = B * T, D = cfg_.D;
  std::vector<float> h((size_t)(R * D)), h2((size_t)(R * D));
  embedding_forward(h.data(), tokens, embed(), R, cfg_.V, D);
  BlockActs acts;
  for (int64_t l = 0; l < cfg_.layers; ++l) {
    block_forward(h2.data(), acts, h.data(), block_params(l), dims_, B, T, 0);
    h.swap(h2);
  }
  rmsnorm_forward(h2.data(), nullptr, h.data(), final_norm(), R, D,
                  cfg_.eps);
  linear_forward(logits, h2.data(), head(), R, D, cfg_.V, GemmPrecision::fp32);
}

int64_t Model::cache_width() const {
  return dims_.mla ? cfg_.Dc + cfg_.Dr : dims_.mha_dims.cache_width();
}

std::shared_ptr<KvCache> Model::new_cache(int64_t batch, int64_t max_len, bool bf16) const {
  return std::make_shared<KvCache>(cache_kind(), cfg_.layers, batch, max_len, cache_width(),
                                   bf16);
}

std::shared_ptr<KvCache> Model::new_mtp_cache(int64_t batch, int64_t max_len, bool bf16) const {
  DSV3_CHECK(cfg_.mtp >= 1, "[Model.new_mtp_cache] the model has no MTP module ",
             "(num_nextn_predict_layers = 0)");
  return std::make_shared<KvCache>(cache_kind(), cfg_.mtp, batch, max_len, cache_width(), bf16);
}

void Model::check_cache(const KvCache& cache, int64_t layers, int64_t B, const char* op) const {
  DSV3_CHECK(cache.kind == cache_kind() && cache.width == cache_width() && cache.layers == layers,
             "[",
             op, "] cache was not made for this model (use model.new_cache / new_mtp_cache)");
  DSV3_CHECK(cache.batch == B, "[", op, "] tokens have batch ", B, " but the cache holds ",
             cache.batch, " sequences");
}

void Model::block_decode(float* h, const BlockParams& p, KvCache& cache, int64_t cache_layer,
                         int64_t B, int64_t S, int64_t start_pos, DecodeScratch& s) const {
  const int64_t R = B * S, D = cfg_.D;
  s.ln.resize((size_t)(R * D));
  s.tmp.resize((size_t)(R * D));
  s.hm.resize((size_t)(R * D));
  rmsnorm_forward(s.ln.data(), nullptr, h, p.input_layernorm, R, D, cfg_.eps);
  float* rows = cache.begin_layer(cache_layer, start_pos);  // fp32 (a bf16 cache: staged)
  if (dims_.mla)
    mla_decode_absorbed(s.tmp.data(), s.ln.data(), p.mla, dims_.mla_dims,
                        LatentCacheView{rows, cache.max_len, cache.bf16}, B, S, start_pos);
  else
    mha_decode(s.tmp.data(), s.ln.data(), p.mha, dims_.mha_dims,
               KvCacheView{rows, cache.max_len, cache.bf16}, B, S, start_pos);
  cache.end_layer(cache_layer, start_pos, S);
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
  for (int64_t l = 0; l < cfg_.layers; ++l) check_shard(l, nullptr);
  const auto views = decode_views();
  cache.begin_write(0, cfg_.layers, start_pos, S);
  const int64_t R = B * S, D = cfg_.D;
  std::vector<float> h((size_t)(R * D)), hn((size_t)(R * D));
  embedding_forward(h.data(), tokens, embed(), R, cfg_.V, D);
  DecodeScratch s;
  for (int64_t l = 0; l < cfg_.layers; ++l)
    block_decode(h.data(), views->blocks[(size_t)l], cache, l, B, S, start_pos, s);
  cache.end_write(0, cfg_.layers, start_pos, S);
  rmsnorm_forward(hn.data(), nullptr, h.data(), final_norm(), R, D, cfg_.eps);
  if (hidden) std::memcpy(hidden, hn.data(), sizeof(float) * R * D);
  linear_forward(logits, hn.data(), head(), R, D, cfg_.V, GemmPrecision::fp32);
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
  check_shard(cfg_.layers + k - 1, nullptr);
  const auto views = decode_views();
  cache.begin_write(k - 1, k, start_pos, S);
  const int64_t R = B * S, D = cfg_.D, V = cfg_.V;
  const MtpParams& p = views->mtp[(size_t)(k - 1)];
  MtpInputActs in;
  std::vector<float> h((size_t)(R * D)), sn((size_t)(R * D));
  mtp_input_forward(h.data(), in, h_prev, S, tokens, S, p, V, D, cfg_.eps, B, S);
  DecodeScratch s;
  block_decode(h.data(), p.block, cache, k - 1, B, S, start_pos, s);
  cache.end_write(k - 1, k, start_pos, S);
  if (hidden_out) std::memcpy(hidden_out, h.data(), sizeof(float) * R * D);
  mtp_output(sn.data(), nullptr, h.data(), p, R, D, cfg_.eps);
  linear_forward(logits, sn.data(), head(), R, D, V, GemmPrecision::fp32);
}

}  // namespace dsv3
