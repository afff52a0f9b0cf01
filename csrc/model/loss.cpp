// The training loss (docs/semantics.md §2.5, formulas in model.h) as a forward driver and a
// backward driver that mirror each other:
//   forward:   main model (embedding, blocks, norm, head + cross-entropy)
//              -> MTP modules 1..M (mtp.h, each with the shared head + cross-entropy)
//              -> balance statistics and loss over every MoE block that ran
//   backward:  main head, then MTP modules M..1 (each with its share of the balance gradient)
//              -> rest of the main model (norm, blocks L-1..0, embedding)
#include <algorithm>

#include "core/check.h"
#include "kernels/balance.h"
#include "kernels/nn.h"
#include "kernels/precision.h"
#include "model/model.h"

namespace dsv3 {

namespace {

// lm_head stays fp32 in every training precision (docs/semantics.md §2.6).
void head_forward(float* y, const float* x, const WeightView& w, int64_t R, int64_t K,
                  int64_t O) {
  linear_forward(y, x, w, R, K, O, GemmPrecision::fp32);
}
void head_backward(float* dx, float* dw, const float* dy, const float* x, const WeightView& w,
                   int64_t R, int64_t K, int64_t O) {
  linear_backward(dx, dw, dy, x, w, R, K, O, GemmPrecision::fp32);
}

// The shared head and its cross-entropy over R rows (targets -1: no target).
struct HeadLoss {
  std::vector<int64_t> targets;  // [R]
  FVec logits, lse, rows;        // [R,V] [R] [R]
};

// logits = head(x[R,D]); returns the sum of the rows' cross-entropies.
double head_loss_forward(HeadLoss& h, const float* x, const WeightView& w, int64_t R, int64_t D,
                         int64_t V) {
  h.logits.resize(R * V);
  h.lse.resize(R);
  h.rows.resize(R);
  head_forward(h.logits.data(), x, w, R, D, V);
  cross_entropy_forward(h.rows.data(), h.lse.data(), h.logits.data(), h.targets.data(), R, V, -1);
  double s = 0;
  for (int64_t r = 0; r < R; ++r) s += h.rows[r];
  return s;
}
// dx[R,D] += ..., dw += ... for the loss scale * (sum of the rows' cross-entropies).
void head_loss_backward(float* dx, float* dw, double scale, const HeadLoss& h, const float* x,
                        const WeightView& w, int64_t R, int64_t D, int64_t V) {
  std::vector<float> dl((size_t)(R * V), 0.f);
  cross_entropy_backward(dl.data(), h.lse.data(), h.logits.data(), h.targets.data(), R, V, -1,
                         (float)scale);
  head_backward(dx, dw, dl.data(), x, w, R, D, V);
}

}  // namespace

struct Model::LossState {
  int64_t B = 0, N = 0, T = 0;
  double alpha = 0, mtp_weight = 0;
  LinearMode precision;       // of the blocks' and MTP's projections
  ExpertParallel* ep = nullptr;                   // expert-parallel training (moe_ep.h)
  const LossHooks* hooks = nullptr;
  std::vector<int64_t> input;             // [B*T] t_0 .. t_{N-2} of each sequence
  std::vector<std::vector<float>> H;      // [layers+1][R,D] block inputs, then the last output
  std::vector<BlockActs> acts;            // [layers]
  FVec hn, rstd_f;                        // model.norm output h^0 [R,D], its rstd [R]
  HeadLoss main;
  int64_t mtp_run = 0;                    // MTP modules that ran (those with a target left)
  std::vector<MtpActs> mtp;               // [mtp_run]
  std::vector<HeadLoss> mtp_head;         // [mtp_run]
  struct Moe { const BlockActs* a; int64_t T; };
  std::vector<Moe> moes;                  // every MoE block that ran, main layers then MTP
};

LossParts Model::loss(const int64_t* tokens, int64_t B, int64_t N, float* grads, double alpha,
                      double mtp_weight, GemmPrecision precision, ExpertParallel* ep,
                      const LossHooks* hooks, LowpWeightCache* weights) {
  const char* op = "Model.loss";
  DSV3_CHECK(B >= 1 && N >= 2, "[", op, "] tokens must be (batch, N) with N >= 2 (N tokens give ",
             "N-1 targets), got N=", N);
  check_tokens(tokens, B * N, op);
  DSV3_CHECK(!grads || !resident_model_, "[", op, "] gradients need fp32 weights: this model ",
             "holds resident weights for inference (load it with Model.from_pretrained(dir) ",
             "to train)");
  LossState st;
  st.precision = LinearMode(precision, precision == GemmPrecision::fp32 ? nullptr : weights);
  st.ep = ep;
  st.hooks = hooks;
  const LossParts out = loss_forward(st, tokens, B, N, alpha, mtp_weight, grads != nullptr);
  if (grads && hooks && hooks->forward_done) hooks->forward_done();
  if (grads) loss_backward(grads, st);
  return out;
}

// ---- forward --------------------------------------------------------------------------------

LossParts Model::loss_forward(LossState& st, const int64_t* tokens, int64_t B, int64_t N,
                              double alpha, double mtp_weight, bool keep) {
  const int64_t T = N - 1, R = B * T, D = cfg_.D, V = cfg_.V, Lm = cfg_.layers;
  st.B = B;
  st.N = N;
  st.T = T;
  st.alpha = alpha;
  st.mtp_weight = mtp_weight;
  st.input.resize((size_t)R);
  st.main.targets.resize((size_t)R);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < T; ++i) {
      st.input[b * T + i] = tokens[b * N + i];
      st.main.targets[b * T + i] = tokens[b * N + i + 1];
    }
  LossParts out;
  // main model
  st.H.assign((size_t)Lm + 1, std::vector<float>((size_t)(R * D)));
  st.acts.resize((size_t)Lm);
  embedding_forward(st.H[0].data(), st.input.data(), embed(), R, V, D);
  for (int64_t l = 0; l < Lm; ++l) {
    if (keep) st.acts[l].keep_for_backward();
    block_forward(st.H[l + 1].data(), st.acts[l], st.H[l].data(), block_params(l, st.precision, st.ep), dims_, B, T, 0);
    if (cfg_.is_moe_layer(l)) st.moes.push_back({&st.acts[l], T});
  }
  st.hn.resize(R * D);
  st.rstd_f.resize(R);
  rmsnorm_forward(st.hn.data(), st.rstd_f.data(), st.H[Lm].data(), final_norm(), R, D, cfg_.eps);
  out.main = head_loss_forward(st.main, st.hn.data(), head(), R, D, V) / (double)R;
  // MTP modules: module k has T-k+1 rows per sequence, of which T-k have a target; a module
  // without any target left does not run (nor do the deeper ones)
  const int64_t M = cfg_.mtp;
  st.mtp_run = mtp_weight > 0 ? std::max<int64_t>(0, std::min(M, T - 1)) : 0;
  st.mtp.resize((size_t)st.mtp_run);
  st.mtp_head.resize((size_t)st.mtp_run);
  for (int64_t k = 1; k <= st.mtp_run; ++k) {
    MtpActs& m = st.mtp[k - 1];
    const int64_t L = T - k + 1;
    const float* h_prev = k == 1 ? st.hn.data() : st.mtp[k - 2].hk.data();
    const int64_t ld_h = k == 1 ? T : st.mtp[k - 2].L;
    mtp_forward(m, h_prev, ld_h, tokens + k, N, mtp_params(k, st.precision, st.ep), dims_, V, B, L, keep);
    HeadLoss& h = st.mtp_head[k - 1];
    h.targets.resize((size_t)(B * L));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < L; ++i)
        h.targets[b * L + i] = i + k + 1 < N ? tokens[b * N + i + k + 1] : -1;
    const double s = head_loss_forward(h, m.out.data(), head(), B * L, D, V);
    out.mtp += mtp_weight / (double)M * s / (double)R;
    if (cfg_.is_moe_layer(Lm + k - 1)) st.moes.push_back({&m.block, L});
  }
  // balance statistics and loss over every MoE block that ran
  const int64_t E = cfg_.E, nm = (int64_t)st.moes.size();
  out.moe_blocks = nm;
  out.expert_load.assign((size_t)(nm * E), 0);
  for (int64_t j = 0; j < nm; ++j) {
    const MoeActs& a = st.moes[j].a->moe;
    std::copy(a.expert_count, a.expert_count + E, out.expert_load.begin() + j * E);
    if (alpha > 0)
      out.balance += seq_balance_loss_forward(a.scores, a.topk_idx, B, st.moes[j].T, E, cfg_.K,
                                              alpha) / (double)nm;
  }
  out.loss = out.main + out.mtp + out.balance;
  return out;
}

// ---- backward -------------------------------------------------------------------------------

// d(balance)/d(gate scores) [B*T, E] of one MoE block's share, or empty (no balance loss).
std::vector<float> Model::balance_grad(const LossState& st, const BlockActs& a,
                                       int64_t T) const {
  std::vector<float> ds;
  if (st.alpha <= 0 || !cfg_.E) return ds;
  ds.assign((size_t)(st.B * T * cfg_.E), 0.f);
  seq_balance_loss_backward(ds.data(), 1.0 / (double)st.moes.size(), a.moe.scores,
                            a.moe.topk_idx, st.B, T, cfg_.E, cfg_.K, st.alpha);
  return ds;
}

void Model::loss_backward(float* g, const LossState& st) {
  const int64_t B = st.B, T = st.T, R = B * T, D = cfg_.D, V = cfg_.V, Lm = cfg_.layers;
  const int64_t M = cfg_.mtp;
  float* g_head = layout_.ptr(g, head_name());
  std::vector<float> dhn((size_t)(R * D), 0.f);  // dL/dh^0
  // the main head first, then the MTP modules: this order fixes the fp32 sums into g_head
  // (and the tied embedding) and dhn, so results stay bit-identical across versions
  head_loss_backward(dhn.data(), g_head, 1.0 / (double)R, st.main, st.hn.data(), head(), R, D, V);
  // MTP modules, deepest first: module k's h_prev gradient feeds module k-1 (or h^0)
  std::vector<float> dnext;  // dL/dh^k from module k+1
  for (int64_t k = st.mtp_run; k >= 1; --k) {
    const MtpActs& m = st.mtp[k - 1];
    const int64_t Rk = B * m.L, ld_prev = k == 1 ? T : st.mtp[k - 2].L;
    std::vector<float> dout((size_t)(Rk * D), 0.f), dprev;
    head_loss_backward(dout.data(), g_head, st.mtp_weight / (double)M / (double)R,
                       st.mtp_head[k - 1], m.out.data(), head(), Rk, D, V);
    const std::vector<float> ds =
        cfg_.is_moe_layer(Lm + k - 1) ? balance_grad(st, m.block, m.L) : std::vector<float>();
    if (k > 1) dprev.assign((size_t)(B * ld_prev * D), 0.f);
    mtp_backward(k == 1 ? dhn.data() : dprev.data(), ld_prev, mtp_grads(k, g), dout.data(),
                 dnext.empty() ? nullptr : dnext.data(), ds.empty() ? nullptr : ds.data(), m,
                 mtp_params(k, st.precision, st.ep), dims_, V);
    dnext.swap(dprev);
  }
  // main model, last piece first (its head ran first, above)
  std::vector<float> dH((size_t)(R * D), 0.f), dprev((size_t)(R * D));
  rmsnorm_backward(dH.data(), layout_.ptr(g, hf::norm), dhn.data(), st.rstd_f.data(),
                   st.H[Lm].data(), final_norm(), R, D);
  for (int64_t l = Lm - 1; l >= 0; --l) {
    std::fill(dprev.begin(), dprev.end(), 0.f);
    const std::vector<float> ds =
        cfg_.is_moe_layer(l) ? balance_grad(st, st.acts[l], T) : std::vector<float>();
    block_backward(dprev.data(), block_grads(l, g), dH.data(), ds.empty() ? nullptr : ds.data(),
                   st.acts[l], st.H[l].data(), block_params(l, st.precision, st.ep), dims_);
    dH.swap(dprev);
    if (st.hooks && st.hooks->block_grads_done) st.hooks->block_grads_done(l);
  }
  embedding_backward(layout_.ptr(g, hf::embed_tokens), dH.data(), st.input.data(), R, V, D);
}

}  // namespace dsv3
