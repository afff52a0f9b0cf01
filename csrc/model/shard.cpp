#include "model/shard.h"

#include <cstring>

#include "core/check.h"

namespace dsv3 {

ParamLayout shard_layout(const ParamLayout& full, int64_t E, const ExpertShard& s) {
  DSV3_CHECK(s.ep >= 1 && (s.ep == 1 || (E > 0 && E % s.ep == 0)), "[Model] ep (", s.ep,
             ") must divide n_routed_experts (", E, ")");
  DSV3_CHECK(s.index >= 0 && s.index < s.ep, "[Model] expert shard index ", s.index,
             " out of range [0, ep=", s.ep, ")");
  ParamLayout out;
  for (const ParamEntry& f : full.entries) {
    if (!s.owns(f.expert, E)) continue;
    DSV3_CHECK(!f.resident, "[Model] a resident model cannot be sharded");
    ParamEntry e = f;
    e.offset = out.total;
    out.total += (e.size + 15) / 16 * 16;  // 64-byte aligned, as build_layout
    out.index[e.name] = out.entries.size();
    out.entries.push_back(std::move(e));
  }
  return out;
}

void gather_expert_shards(Comm& ep_group, const ParamLayout& full, int64_t E,
                          const ParamLayout& local, const void* local_data, void* full_out,
                          size_t elem_bytes, bool to_root) {
  const int ep = ep_group.size();
  const ExpertShard me{ep, ep_group.rank()};
  DSV3_CHECK(ep == 1 || E % ep == 0, "[gather_expert_shards] ep (", ep,
             ") must divide n_routed_experts (", E, ")");
  const bool receives = !to_root || me.index == 0;
  const auto* src = static_cast<const uint8_t*>(local_data);
  auto* dst = static_cast<uint8_t*>(full_out);
  if (receives) std::memset(dst, 0, elem_bytes * (size_t)full.total);
  // replicated entries from here; this rank's experts packed in layout order
  std::vector<uint8_t> mine;
  for (const ParamEntry& e : local.entries) {
    const size_t n = elem_bytes * (size_t)e.size;
    const uint8_t* p = src + elem_bytes * (size_t)e.offset;
    if (e.expert < 0) {
      if (receives) std::memcpy(dst + elem_bytes * (size_t)full.at(e.name).offset, p, n);
    } else {
      DSV3_CHECK(me.owns(e.expert, E), "[gather_expert_shards] the local slab holds expert ",
                 e.expert, " of another EP rank");
      mine.insert(mine.end(), p, p + n);
    }
  }
  const int64_t bytes = (int64_t)mine.size();
  std::vector<uint8_t> all(receives ? (size_t)bytes * ep : 0);
  if (ep == 1) {
    std::memcpy(all.data(), mine.data(), mine.size());
  } else {
    // every rank sends its experts to each receiver (all, or EP rank 0)
    std::vector<int64_t> sc(ep, bytes), sd(ep, 0), rc(ep, receives ? bytes : 0), rd(ep, 0);
    if (to_root)
      for (int q = 1; q < ep; ++q) sc[q] = 0;
    for (int q = 0; q < ep && receives; ++q) rd[q] = q * bytes;
    ep_group.alltoallv(mine.data(), sc.data(), sd.data(), all.data(), rc.data(), rd.data());
  }
  if (!receives) return;
  // EP rank q's experts, in the full layout's order (the order q packed them in)
  std::vector<int64_t> at((size_t)ep);
  for (int q = 0; q < ep; ++q) at[q] = q * bytes;
  for (const ParamEntry& f : full.entries) {
    if (f.expert < 0) continue;
    const int q = ep == 1 ? 0 : (int)(f.expert / (E / ep));
    const size_t n = elem_bytes * (size_t)f.size;
    DSV3_CHECK(at[q] + (int64_t)n <= (q + 1) * bytes, "[gather_expert_shards] EP rank ", q,
               " sent fewer expert weights than its layout holds");
    std::memcpy(dst + elem_bytes * (size_t)f.offset, all.data() + at[q], n);
    at[q] += (int64_t)n;
  }
}

}  // namespace dsv3
