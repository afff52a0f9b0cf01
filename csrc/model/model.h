// The DeepSeek-V3 model (semantics §2.1-2.5): embedding, num_hidden_layers blocks, final norm,
// lm_head, and num_nextn_predict_layers MTP modules, over one parameter slab (layout.h).
//
// Legend:  B sequences   N tokens per sequence   T = N-1 predicted positions   R = B*T
//          D hidden   V vocabulary   M MTP depth (num_nextn_predict_layers)
//          L_k = T-k+1 positions fed to MTP module k
//
// Loss of a batch tokens[B,N] (semantics §2.5):
//   main  = mean over the B*T positions of -log p(t_{i+1} | t_<=i)
//   MTP module k (k = 1..M, mtp.h): h'_i = eh_proj([enorm(Emb(t_{i+k})) | hnorm(h^{k-1}_i)]),
//     h^k = Block_k(h'), logits = head(shared_head.norm(h^k)) predict t_{i+k+1};
//     h^0 = the main model's final hidden state after model.norm; embedding and head shared.
//     L_k = (1/(B*T)) sum over the B*(T-k) valid positions;  mtp = (lambda / M) sum_k L_k
//   balance (when alpha > 0) = mean over MoE blocks (main and MTP) of the sequence-wise
//     balance loss (balance.h), each averaged over the B sequences
//   loss = main + mtp + balance
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/busy.h"
#include "kernels/kv_cache.h"
#include "model/block.h"
#include "model/config.h"
#include "model/layout.h"
#include "model/mtp.h"
#include "model/shard.h"

namespace dsv3 {

// Callbacks of a loss-with-backward call (the parallel Trainer's): forward_done after the
// forward (before any backward work), block_grads_done(l) once main block l's gradients are
// final (blocks come last to first).
struct LossHooks {
  std::function<void()> forward_done;
  std::function<void(int64_t)> block_grads_done;
};

struct LossParts {
  double loss = 0, main = 0, mtp = 0, balance = 0;
  std::vector<int64_t> expert_load;  // [moe blocks, E] tokens routed per expert in this call
  int64_t moe_blocks = 0;
};

// Weights given to a resident model (resident.cpp), by full name; together they must name
// every entry of the layout exactly once.
struct ResidentWeights {
  // Views in their storage format (memory owned by the caller). A resident-capable name
  // (layout.h) stays resident (no slab storage); kv_b_proj is dequantized into the slab.
  ResidentViews held;
  std::unordered_map<std::string, const float*> copied;  // fp32 arrays copied into the slab
  std::shared_ptr<const void> keep_alive;                // owns held's memory (may be null)
};

// Whether a weight may be given held (ResidentWeights::held): a resident-capable projection
// (layout.h) or kv_b_proj (dequantized into the slab, see kernels/mla.h).
bool may_be_held(const std::string& name);

class Model {
 public:
  // random_init = false leaves every weight 0 (for a loader that writes all of them next:
  // drawing 0.4B normals is half of loading a checkpoint of that size).
  Model(const ModelConfig& c, uint64_t seed, bool random_init = true);
  // An EP rank's model (shard.h): only its own routed experts are allocated (each drawn as
  // in the full model: the initial values depend on (seed, name) only).
  Model(const ModelConfig& c, uint64_t seed, const ExpertShard& shard, bool random_init = true);
  // A model over resident weights (inference: forward, cached decoding, MTP drafting and the
  // loss without gradients). Throws std::invalid_argument naming the weight on a wrong shape,
  // a weight that cannot be resident, or a non-finite fp8 scale_inv.
  Model(const ModelConfig& c, const ResidentWeights& w);

  // Built from resident weights (even if all of them are fp32).
  bool is_resident() const { return resident_model_; }
  // The storage format of a weight (fp32 for every slab entry); std::out_of_range if unknown.
  WeightFormat weight_format(const std::string& name) const;
  // Bytes of the weights: the resident ones in their format (incl. scales) plus the slab.
  int64_t weight_bytes() const;
  // out[size] = the weight as fp32 (a resident one dequantized); std::out_of_range if unknown.
  void copy_param(float* out, const std::string& name) const;

  const ModelConfig& config() const { return cfg_; }
  // The routed experts held (ep == 1: all). A sharded model computes its MoE blocks only
  // with an ExpertParallel context of the same ep (its Trainer's steps, Trainer loss).
  const ExpertShard& expert_shard() const { return shard_; }
  // Drops the routed experts other EP ranks own (an unsharded fp32 model only; the slab is
  // reallocated, the kept weights unchanged). std::invalid_argument naming ep otherwise.
  void shard_experts(const ExpertShard& s);
  const ParamLayout& layout() const { return layout_; }
  std::vector<float>& params() { return w_; }
  const std::vector<float>& params() const { return w_; }

  // logits[B,T,V] of tokens[B,T] (no cache; training-form attention).
  void forward(float* logits, const int64_t* tokens, int64_t B, int64_t T);
  // Cached decoding of tokens[B,S] at start_pos: logits[B,S,V]; hidden[B,S,D] (may be null)
  // receives the final hidden state after model.norm (the MTP module's h^0).
  void forward_cached(float* logits, float* hidden, const int64_t* tokens, int64_t B, int64_t S,
                      KvCache& cache, int64_t start_pos);
  // Loss of tokens[B,N]; with grads (slab layout, ACCUMULATED) also the backward (loss.cpp).
  // alpha: weight of the sequence-wise balance loss (0 disables it).
  // precision: the GEMMs of the blocks' and MTP's projections (kernels/precision.h); the
  // embedding, heads, router gates and attention core are fp32 in every precision.
  // ep: expert-parallel training (kernels/moe_ep.h; null: every expert computed here).
  // weights: the step's prepared low-precision weights (kernels/lowp_weights.h), shared by
  // its micro-batches; null: each GEMM prepares its own (bit-identical results).
  LossParts loss(const int64_t* tokens, int64_t B, int64_t N, float* grads, double alpha,
                 double mtp_weight, GemmPrecision precision, ExpertParallel* ep = nullptr,
                 const LossHooks* hooks = nullptr, LowpWeightCache* weights = nullptr);
  // bf16: the cache stores bf16 values (kv_cache.h), else fp32.
  std::shared_ptr<KvCache> new_cache(int64_t batch, int64_t max_len, bool bf16 = false) const;
  std::string cache_kind() const { return dims_.mla ? "latent" : "kv"; }
  int64_t cache_width() const;

  // MTP drafting step (semantics §2.5) for module k (1-based) over rows i = start_pos .. +S-1 of a
  // cache from new_mtp_cache (layer k-1 holds module k's attention rows; row i is fed
  // (h_prev_i, tokens_i) = (h^{k-1}_i, t_{i+k})):
  //   h'_i = eh_proj([enorm(Emb(tokens_i)) | hnorm(h_prev_i)]),  h^k = Block_k(h') (cached),
  //   logits[B,S,V] = head(shared_head.norm(h^k)),  hidden_out[B,S,D] (may be null) = h^k.
  // h_prev[B,S,D], tokens[B,S]. Like forward_cached, start_pos <= length rewrites (rollback).
  void mtp_forward_cached(float* logits, float* hidden_out, const float* h_prev,
                          const int64_t* tokens, int64_t B, int64_t S, KvCache& mtp_cache,
                          int64_t start_pos, int64_t k);
  // A cache with one layer per MTP module (num_nextn_predict_layers layers).
  std::shared_ptr<KvCache> new_mtp_cache(int64_t batch, int64_t max_len, bool bf16 = false) const;

  // The MoE blocks in order (main layers then MTP), for balancing: bias pointers [E] each.
  std::vector<float*> expert_biases();
  int64_t moe_blocks() const;

  // Concurrency (core/busy.h): readers share, writers (weights change) need the model alone.
  mutable std::shared_mutex busy;

 private:
  ModelConfig cfg_;
  ParamLayout layout_;
  std::vector<float> w_;
  ExpertShard shard_;
  BlockDims dims_;
  bool resident_model_ = false;
  ResidentViews resident_;                 // name -> view, the layout's resident entries
  ResidentViews kv_b_stored_;              // kv_b_proj given as bf16 / fp8 (also in the slab)
  void set_kv_b_view(BlockParams& b, int64_t block) const;  // MlaParams::kv_b_view
  std::shared_ptr<const void> keep_alive_; // owns the resident views' memory
  WeightView param_view(const std::string& name) const;  // resident view, or the slab's fp32
  const ResidentViews* resident_views() const { return resident_.empty() ? nullptr : &resident_; }

  // Cached decoding's views of every block's and MTP module's weights, made once instead of
  // per call (a block's views are found by name: V2-Lite's MoE blocks hold ~200 weights each).
  // Their addresses are the slab's entries and the resident views, fixed for the model's life
  // except when shard_experts moves the slab: it drops them; slab records the address they
  // were made for, checked on use.
  struct DecodeViews {
    const float* slab = nullptr;
    std::vector<BlockParams> blocks;  // main layers
    std::vector<MtpParams> mtp;       // module k at k - 1
  };
  mutable std::mutex decode_views_mu_;
  mutable std::shared_ptr<const DecodeViews> decode_views_;
  std::shared_ptr<const DecodeViews> decode_views() const;

  struct DecodeScratch {
    std::vector<float> ln, tmp, hm, mf;
    std::vector<int64_t> mi;
    MlpActs mlp;
  };
  // h[B*S,D] <- the block with weights p of h at start_pos, attention rows in cache layer
  // cache_layer.
  void block_decode(float* h, const BlockParams& p, KvCache& cache, int64_t cache_layer,
                    int64_t B, int64_t S, int64_t start_pos, DecodeScratch& s) const;
  // Refuses block i's MoE weights of a sharded model without a matching EP context.
  void check_shard(int64_t i, const ExpertParallel* ep) const;
  void check_cache(const KvCache& cache, int64_t layers, int64_t B, const char* op) const;
  BlockParams block_params(int64_t i, const LinearMode& p = LinearMode(),
                           ExpertParallel* ep = nullptr) const;
  // block_params / mtp_params without the shard check (decode_views: its callers check the
  // blocks it runs)
  BlockParams unchecked_block_params(int64_t i, const LinearMode& p = LinearMode(),
                                     ExpertParallel* ep = nullptr) const;
  MtpParams unchecked_mtp_params(int64_t k, const LinearMode& p = LinearMode(),
                                 ExpertParallel* ep = nullptr) const;
  BlockGrads block_grads(int64_t i, float* g) const;
  MtpParams mtp_params(int64_t k, const LinearMode& p = LinearMode(),
                       ExpertParallel* ep = nullptr) const;  // k 1-based
  MtpGrads mtp_grads(int64_t k, float* g) const;
  void check_tokens(const int64_t* tokens, int64_t n, const char* op) const;
  const char* head_name() const;  // lm_head.weight, or the embedding when tied
  WeightView head() const;
  WeightView embed() const;
  const float* final_norm() const;

  // The loss (loss.cpp): a forward driver keeping what the mirroring backward driver reads.
  struct LossState;
  LossParts loss_forward(LossState& st, const int64_t* tokens, int64_t B, int64_t N,
                         double alpha, double mtp_weight, bool keep);
  void loss_backward(float* grads, const LossState& st);
  std::vector<float> balance_grad(const LossState& st, const BlockActs& a, int64_t T) const;
};

}  // namespace dsv3
