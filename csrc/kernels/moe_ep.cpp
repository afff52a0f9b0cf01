// Expert-parallel dispatch / combine of the MoE layer (moe_ep.h).
#include "kernels/moe_ep.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

#include "core/check.h"
#include "core/parallel.h"
#include "kernels/fp8.h"
#include "kernels/moe.h"

namespace dsv3 {

namespace {

// Per-peer byte counts and displacements of rows of `row_bytes` bytes.
struct Plan {
  std::vector<int64_t> count, displ;
  Plan(const std::vector<int64_t>& rows, int64_t row_bytes) : count(rows.size()), displ(rows.size()) {
    int64_t o = 0;
    for (size_t q = 0; q < rows.size(); ++q) {
      count[q] = rows[q] * row_bytes;
      displ[q] = o;
      o += count[q];
    }
  }
  int64_t total() const { return count.empty() ? 0 : displ.back() + count.back(); }
};

// comm.alltoallv timed into ep.comm_seconds
void exchange(ExpertParallel& ep, const void* send, const int64_t* sc, const int64_t* sd,
              void* recv, const int64_t* rc, const int64_t* rd) {
  const auto t0 = std::chrono::steady_clock::now();
  ep.group->alltoallv(send, sc, sd, recv, rc, rd);
  ep.comm_seconds +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Rows this rank sends to each EP rank (its dispatch order groups them by owner).
std::vector<int64_t> rows_to(const MoeActs& a, int ep, int64_t El) {
  std::vector<int64_t> r((size_t)ep, 0);
  for (int q = 0; q < ep; ++q)
    for (int64_t j = 0; j < El; ++j) r[q] += a.expert_count[q * El + j];
  return r;
}

std::vector<int64_t> rows_from(const MoeEpState& s, int ep) {
  std::vector<int64_t> r((size_t)ep, 0);
  for (int q = 0; q < ep; ++q)
    for (int64_t j = 0; j < s.El; ++j) r[q] += s.recv_cnt[q * s.El + j];
  return r;
}

// The owner's view of its received rows as one MoE dispatch with K = 1 (slot = row).
MoeActs owner_acts(MoeEpState& s) {
  MoeActs b;
  b.expert_count = s.count.data();
  b.expert_offset = s.offset.data();
  b.dispatch_slot = s.ident.data();
  b.topk_weight = s.w.data();
  b.expert_gate = s.gate.data();
  b.expert_up = s.up.data();
  return b;
}

// Row p of a dispatched row in bytes: fp32 [x (D floats) | w] or fp8 [codes (D) | scales
// (ceil(D/128) floats) | w].
int64_t row_bytes(int64_t D, bool fp8) {
  return fp8 ? D + 4 * (fp8_blocks(D, 128) + 1) : 4 * (D + 1);
}

}  // namespace

std::vector<float> fp8_dispatch_values(const float* x, int64_t T, int64_t D) {
  const int64_t nt = fp8_blocks(D, 128);
  std::vector<float> out((size_t)(T * D));
  std::vector<uint8_t> codes((size_t)(T * D));
  std::vector<float> scales((size_t)(T * nt));
  fp8_quantize(codes.data(), scales.data(), x, T, D, Fp8Block{1, 128}, Fp8Format::e4m3, false);
  fp8_dequantize(out.data(), codes.data(), scales.data(), T, D, Fp8Block{1, 128},
                 Fp8Format::e4m3);
  return out;
}

void moe_ep_forward(float* ye, const MoeActs& a, const float* x, const MoeParams& p,
                    const MoeConfig& c, int64_t T) {
  ExpertParallel& ep = *p.ep;
  Comm& comm = *ep.group;
  const int R = comm.size(), me = comm.rank();
  const int64_t E = c.n_routed_experts, K = c.num_experts_per_tok, D = c.hidden_size;
  const int64_t F = c.moe_intermediate_size, N = T * K, El = E / R;
  DSV3_CHECK(E % R == 0, "[moe_ep] n_routed_experts (", E, ") must be divisible by ep (", R, ")");
  DSV3_CHECK(a.ep_state, "[moe_ep] the forward needs an MoeEpState (acts.ep_state)");
  MoeEpState& s = *a.ep_state;
  s.El = El;

  // statistics: distinct owner ranks per token
  ep.tokens += T;
  {
    std::vector<int64_t> seen_at((size_t)R, -1);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t q = a.topk_idx[t * K + k] / El;
        if (seen_at[q] != t) {
          seen_at[q] = t;
          ++ep.rank_visits;
        }
      }
  }

  // 1. counts per (source, local expert)
  s.recv_cnt.assign((size_t)(R * El), 0);
  {
    std::vector<int64_t> sc(R, El * 8), sd(R), rc(R, El * 8), rd(R);
    for (int q = 0; q < R; ++q) sd[q] = rd[q] = q * El * 8;
    exchange(ep, a.expert_count, sc.data(), sd.data(), s.recv_cnt.data(), rc.data(), rd.data());
  }
  const std::vector<int64_t> out_rows = rows_to(a, R, El), in_rows = rows_from(s, R);
  int64_t Nr = 0;
  for (int64_t r : in_rows) Nr += r;
  s.Nr = Nr;

  // 2. dispatch [x | w] rows in dispatch order
  const bool fp8 = ep.fp8_dispatch;
  const int64_t rb = row_bytes(D, fp8), nt = fp8_blocks(D, 128);
  std::vector<uint8_t> send((size_t)(N * rb)), recv((size_t)(Nr * rb));
  parallel_for(N, 64, [&](int64_t p0, int64_t p1) {
    std::vector<float> sc((size_t)nt);
    for (int64_t q = p0; q < p1; ++q) {
      const int64_t slot = a.dispatch_slot[q];
      uint8_t* row = send.data() + q * rb;
      const float* xr = x + (slot / K) * D;
      if (fp8) {
        fp8_quantize(row, sc.data(), xr, 1, D, Fp8Block{1, 128}, Fp8Format::e4m3, false);
        std::memcpy(row + D, sc.data(), 4 * nt);
        std::memcpy(row + D + 4 * nt, &a.topk_weight[slot], 4);
      } else {
        std::memcpy(row, xr, 4 * D);
        std::memcpy(row + 4 * D, &a.topk_weight[slot], 4);
      }
    }
  });
  const Plan sp(out_rows, rb), rp(in_rows, rb);
  for (int q = 0; q < R; ++q)
    if (q != me) ep.dispatch_bytes += sp.count[q];
  exchange(ep, send.data(), sp.count.data(), sp.displ.data(), recv.data(), rp.count.data(),
           rp.displ.data());

  // 3. expert-major order: expert j = source 0's rows for j, then source 1's, ...
  s.count.assign((size_t)El, 0);
  s.offset.assign((size_t)El + 1, 0);
  s.perm.resize((size_t)Nr);
  s.ident.resize((size_t)Nr);
  for (int64_t i = 0; i < Nr; ++i) s.ident[i] = i;
  {
    std::vector<int64_t> src_start(R);  // first received row of source q for expert j
    int64_t o = 0;
    for (int q = 0; q < R; ++q) {
      src_start[q] = o;
      o += in_rows[q];
    }
    int64_t em = 0;
    for (int64_t j = 0; j < El; ++j) {
      s.offset[j] = em;
      for (int q = 0; q < R; ++q) {
        int64_t first = src_start[q];
        for (int64_t jj = 0; jj < j; ++jj) first += s.recv_cnt[q * El + jj];
        for (int64_t i = 0; i < s.recv_cnt[q * El + j]; ++i) s.perm[em++] = first + i;
      }
      s.count[j] = em - s.offset[j];
    }
    s.offset[El] = em;
  }
  s.x.resize((size_t)(Nr * D));
  s.w.resize((size_t)Nr);
  s.gate.resize((size_t)(Nr * F));
  s.up.resize((size_t)(Nr * F));
  parallel_for(Nr, 64, [&](int64_t i0, int64_t i1) {
    std::vector<float> sc((size_t)nt);
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t* row = recv.data() + s.perm[i] * rb;
      float* xr = s.x.data() + i * D;
      if (fp8) {
        std::memcpy(sc.data(), row + D, 4 * nt);
        fp8_dequantize(xr, row, sc.data(), 1, D, Fp8Block{1, 128}, Fp8Format::e4m3);
        std::memcpy(&s.w[i], row + D + 4 * nt, 4);
      } else {
        std::memcpy(xr, row, 4 * D);
        std::memcpy(&s.w[i], row + 4 * D, 4);
      }
    }
  });

  // 4. the owned experts on their rows, then the outputs back in the order received
  std::vector<float> yr((size_t)(Nr * D)), back((size_t)(Nr * D));
  const MoeActs b = owner_acts(s);
  moe_run_experts(yr.data(), nullptr, b, s.x.data(), 1, El, p.experts.data() + me * El, nullptr,
                  Nr, D, F, 0, p.precision);
  parallel_for(Nr, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      std::memcpy(back.data() + s.perm[i] * D, yr.data() + i * D, 4 * D);
  });
  const Plan bs(in_rows, 4 * D), br(out_rows, 4 * D);
  for (int q = 0; q < R; ++q)
    if (q != me) ep.combine_bytes += bs.count[q];
  exchange(ep, back.data(), bs.count.data(), bs.displ.data(), ye, br.count.data(),
           br.displ.data());
}

void moe_ep_backward(float* dxs, float* d_topk_weight, const MoeGrads& g, const float* dy,
                     const MoeActs& a, const MoeParams& p, const MoeConfig& c, int64_t T) {
  ExpertParallel& ep = *p.ep;
  Comm& comm = *ep.group;
  const int R = comm.size(), me = comm.rank();
  const int64_t E = c.n_routed_experts, K = c.num_experts_per_tok, D = c.hidden_size;
  const int64_t F = c.moe_intermediate_size, N = T * K, El = E / R;
  DSV3_CHECK(a.ep_state && a.ep_state->El == El, "[moe_ep] the backward needs its forward's "
             "MoeEpState");
  MoeEpState& s = *a.ep_state;
  const int64_t Nr = s.Nr;
  const std::vector<int64_t> out_rows = rows_to(a, R, El), in_rows = rows_from(s, R);

  // 1. the unweighted row gradients dY to the owners, regrouped expert-major
  std::vector<float> send((size_t)(N * D)), recv((size_t)(Nr * D)), dyr((size_t)(Nr * D));
  parallel_for(N, 64, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q)
      std::memcpy(send.data() + q * D, dy + (a.dispatch_slot[q] / K) * D, 4 * D);
  });
  const Plan sp(out_rows, 4 * D), rp(in_rows, 4 * D);
  exchange(ep, send.data(), sp.count.data(), sp.displ.data(), recv.data(), rp.count.data(),
           rp.displ.data());
  parallel_for(Nr, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      std::memcpy(dyr.data() + i * D, recv.data() + s.perm[i] * D, 4 * D);
  });

  // 2. the owned experts' backward
  std::vector<float> dxr((size_t)(Nr * D)), dwr((size_t)Nr);
  const MoeActs b = owner_acts(s);
  moe_run_experts_backward(dxr.data(), nullptr, dwr.data(),
                           g.experts.empty() ? nullptr : g.experts.data() + me * El, nullptr,
                           dyr.data(), b, s.x.data(), 1, El, p.experts.data() + me * El,
                           nullptr, Nr, D, F, 0, p.precision);

  // 3. [dx | dL/dw] rows back in the order received
  const int64_t rb = D + 1;
  std::vector<float> back((size_t)(Nr * rb)), got((size_t)(N * rb));
  parallel_for(Nr, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float* row = back.data() + s.perm[i] * rb;
      std::memcpy(row, dxr.data() + i * D, 4 * D);
      row[D] = dwr[i];
    }
  });
  const Plan bs(in_rows, 4 * rb), br(out_rows, 4 * rb);
  exchange(ep, back.data(), bs.count.data(), bs.displ.data(), got.data(), br.count.data(),
           br.displ.data());
  for (int64_t q = 0; q < N; ++q) {
    const float* row = got.data() + q * rb;
    if (dxs) std::memcpy(dxs + q * D, row, 4 * D);
    d_topk_weight[a.dispatch_slot[q]] = row[D];
  }
}

}  // namespace dsv3
