// Routed experts sharded in memory under expert parallelism (dist/comm.h).
//
// Legend:  E routed experts per MoE block   ep EP degree   El = E/ep   e this rank's EP index
//
// An EP rank's parameter slab (layout.h) holds the replicated entries (embedding, attention,
// norms, router gates and biases, shared experts, head, MTP's own weights) and, of each MoE
// block's routed experts, only its own [e*El, (e+1)*El). The entries keep their global names
// (model.layers.3.mlp.experts.17.*) and the full layout's order; only the offsets are
// compacted, so each block's owned experts form one contiguous range between its replicated
// parts. Gradients and AdamW moments use the same local layout.
//
// Checkpoints stay in the full layout: gather_expert_shards puts every EP rank's experts back
// into a full-layout slab (one all-to-all inside the EP group: every rank receives the whole,
// or only EP rank 0 for a checkpoint that one rank writes),
// and copy_entries maps a full-layout slab (weights, moments) onto the local one.
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

#include "dist/comm.h"
#include "model/layout.h"

namespace dsv3 {

struct ExpertShard {
  int ep = 1, index = 0;  // ep == 1: every expert here (no shard)
  bool sharded() const { return ep > 1; }
  // Whether the entry of routed expert j (-1: not a routed expert) of E lives on this rank.
  bool owns(int64_t j, int64_t E) const { return j < 0 || ep <= 1 || j / (E / ep) == index; }
  int64_t first(int64_t E) const { return ep <= 1 ? 0 : index * (E / ep); }
  int64_t end(int64_t E) const { return ep <= 1 ? E : (index + 1) * (E / ep); }
};

// The full layout without the routed-expert entries other EP ranks own, offsets compacted
// (64-byte aligned entries, as build_layout). Throws std::invalid_argument naming ep when it
// does not divide E or the index is out of range.
ParamLayout shard_layout(const ParamLayout& full, int64_t E, const ExpertShard& s);

// dst's entries that src's layout also has, copied from src (padding of dst untouched).
template <class T>
void copy_entries(const ParamLayout& from, const T* src, const ParamLayout& to, T* dst) {
  for (const ParamEntry& e : to.entries) {
    auto it = from.index.find(e.name);
    if (it == from.index.end()) continue;
    const ParamEntry& f = from.entries[it->second];
    std::memcpy(dst + e.offset, src + f.offset, sizeof(T) * (size_t)e.size);
  }
}

// full_out[full.total] (elements of elem_bytes bytes) <- the replicated entries of local_data
// (this rank's slab, local layout) and every EP rank's owned experts. Collective over
// ep_group (whose rank r is the EP index r); every rank receives the whole slab, or with
// to_root only EP rank 0 does (the others send their experts to it, leave full_out untouched
// and may pass nullptr).
void gather_expert_shards(Comm& ep_group, const ParamLayout& full, int64_t E,
                          const ParamLayout& local, const void* local_data, void* full_out,
                          size_t elem_bytes, bool to_root = false);

}  // namespace dsv3
