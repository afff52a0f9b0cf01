// Baseline attention for comparison with MLA: standard multi-head (Hkv = H) or grouped-query
// (Hkv < H) attention with the same decoupled-RoPE head layout as MLA.
//
// Legend:  B batch  T tokens (S per decode call)  R = B*T  D hidden  H query heads
//          Hkv key/value heads  Dn, Dr: q/k head = [Dn unrotated | Dr rotated]  Dv v head dim
//   q = q_proj(x) [H, Dn+Dr], k = k_proj(x) [Hkv, Dn+Dr], v = v_proj(x) [Hkv, Dv]
//   RoPE (adjacent pairs, YaRN) on the last Dr dims of every q and k head;
//   o_h = causal softmax(scale * q_h.k_{h/(H/Hkv)}) @ v_{h/(H/Hkv)};  out = o_proj(concat o_h)
// The cache keeps the roped keys and the values of every kv head: Hkv*(Dn+Dr+Dv) floats per
// token per layer, against MLA's Dc+Dr.
#pragma once
#include <cstdint>
#include <vector>

#include "core/memory.h"
#include "kernels/attention.h"
#include "kernels/precision.h"
#include "kernels/rope.h"
#include "kernels/wlinear.h"

namespace dsv3 {

struct MhaDims {
  int64_t D, H, Hkv, Dn, Dr, Dv;
  float scale;
  RopeTable rope;
  int64_t dqk() const { return Dn + Dr; }
  int64_t cache_width() const { return Hkv * (Dn + Dr + Dv); }
};

struct MhaParams {  // weight views (kernels/wlinear.h: fp32 or resident bf16 / fp8)
  WeightView q_proj;  // [H*(Dn+Dr), D]
  WeightView k_proj;  // [Hkv*(Dn+Dr), D]
  WeightView v_proj;  // [Hkv*Dv, D]
  WeightView o_proj;  // [D, H*Dv]
  LinearMode precision = LinearMode();  // of every projection (kernels/precision.h)
};
struct MhaGrads {
  float *q_proj = nullptr, *k_proj = nullptr, *v_proj = nullptr, *o_proj = nullptr;
};
struct MhaActs {
  int64_t B = 0, T = 0;
  std::vector<int64_t> pos;
  bool keep_probs = false;  // set by callers that run the backward (see MlaActs)
  AttnProbs probs;
  FVec q, k, v, o, lse;  // roped q [R,H,Dqk], roped k [R,Hkv,Dqk], v, o, lse
};

void mha_check_dims(const MhaDims& d);
void mha_check_params(const MhaParams& p);  // every weight is set
void mha_forward(float* out, MhaActs& acts, const float* x, const MhaParams& p, const MhaDims& d,
                 int64_t B, int64_t T, int64_t start_pos);
// dx += ..., grads += ...   (set_dx: dx = ...)
void mha_backward(float* dx, const MhaGrads& g, const float* d_out, const MhaActs& acts,
                  const float* x, const MhaParams& p, const MhaDims& d, bool set_dx = false);

// One layer's cache: per sequence max_len*cache_width floats, keys [max_len, Hkv, Dn+Dr] then
// values [max_len, Hkv, Dv].
struct KvCacheView {
  float* data;
  int64_t max_len;
  bool round_bf16 = false;  // the cache stores bf16: write the new rows rounded to bf16
};
void mha_decode(float* out, const float* x, const MhaParams& p, const MhaDims& d,
                const KvCacheView& cache, int64_t B, int64_t S, int64_t start_pos);

}  // namespace dsv3
