"""Batch-1 decoding: dsv3 (absorbed MLA latent cache) vs PyTorch eager with its own KV cache
(HF-style: decompressed per-head keys/values, SDPA), vs the memory-bandwidth floor, and MTP
speculative vs plain decoding on a briefly trained model.

    python bench/bench_generate.py [--threads N] [--quick] [--train-steps N]

Floor: one decode step must at least read the active weights (config.num_parameters(active=
True), fp32, MTP excluded) and the cache rows up to the context (cache.bytes_per_token x
context), at the measured copy bandwidth. Timings on a shared machine are indicative.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dsv3  # noqa: E402
from common import machine_line, memory_bandwidth, print_table, set_threads, timeit  # noqa: E402
from dsv3.reference.torch_model import TorchModel  # noqa: E402


def large_config() -> dsv3.Config:
    """hidden 1024, 8 layers (1 dense + 7 MoE, 16 experts top-4), MLA ranks scaled up."""
    return dsv3.Config.small().replace(
        hidden_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
        q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, intermediate_size=2816, moe_intermediate_size=512,
        max_position_embeddings=4096)


class TorchDecoder:
    """Cached decoding around dsv3.reference.torch_model.TorchModel: per layer a preallocated
    (B, H, max_len, Dn+Dr) key and (B, H, max_len, Dv) value cache, as HF's DeepSeek code keeps."""

    def __init__(self, tm: TorchModel, max_len: int):
        c = tm.cfg
        self.tm, self.c = tm, c
        H = c.num_attention_heads
        self.k = [torch.zeros(1, H, max_len, c.qk_nope_head_dim + c.qk_rope_head_dim)
                  for _ in range(c.num_hidden_layers)]
        self.v = [torch.zeros(1, H, max_len, c.v_head_dim) for _ in range(c.num_hidden_layers)]

    def rope(self, x, start):  # x (B, T, h, Dr), positions start..start+T-1, adjacent pairs
        T = x.shape[1]
        ang = torch.arange(start, start + T, dtype=torch.float64)[:, None] * self.tm.inv_freq
        cos = (ang.cos() * self.tm.rope_mult).float()[None, :, None, :]
        sin = (ang.sin() * self.tm.rope_mult).float()[None, :, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2)

    def attention(self, x, p, layer, start):
        tm, c = self.tm, self.c
        B, T, _ = x.shape
        H, Dn, Dr, Dv = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        q = F.linear(tm.norm(F.linear(x, tm.w(p + "q_a_proj.weight")), p + "q_a_layernorm.weight"),
                     tm.w(p + "q_b_proj.weight")).view(B, T, H, Dn + Dr)
        kva = F.linear(x, tm.w(p + "kv_a_proj_with_mqa.weight"))
        kv = F.linear(tm.norm(kva[..., :c.kv_lora_rank], p + "kv_a_layernorm.weight"),
                      tm.w(p + "kv_b_proj.weight")).view(B, T, H, Dn + Dv)
        kpe = self.rope(kva[..., c.kv_lora_rank:].reshape(B, T, 1, Dr), start)
        k = torch.cat([kv[..., :Dn], kpe.expand(B, T, H, Dr)], -1)
        q = torch.cat([q[..., :Dn], self.rope(q[..., Dn:], start)], -1)
        self.k[layer][:, :, start:start + T] = k.transpose(1, 2)
        self.v[layer][:, :, start:start + T] = kv[..., Dn:].transpose(1, 2)
        K, V = self.k[layer][:, :, :start + T], self.v[layer][:, :, :start + T]
        mask = None
        if T > 1:
            mask = torch.ones(T, start + T, dtype=torch.bool).tril(start)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), K, V, attn_mask=mask,
                                           scale=tm.scale)
        return F.linear(o.transpose(1, 2).reshape(B, T, H * Dv), tm.w(p + "o_proj.weight"))

    @torch.no_grad()
    def forward(self, tokens, start):
        tm, c = self.tm, self.c
        h = F.embedding(tokens, tm.w("model.embed_tokens.weight"))
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            h = h + self.attention(tm.norm(h, p + "input_layernorm.weight"), p + "self_attn.", i,
                                   start)
            x = tm.norm(h, p + "post_attention_layernorm.weight")
            moe = c.n_routed_experts and i >= c.first_k_dense_replace and i % c.moe_layer_freq == 0
            h = h + (tm.moe(x, p + "mlp.", []) if moe else tm.swiglu(x, p + "mlp."))
        return F.linear(tm.norm(h, "model.norm.weight"), tm.head())


def verify_costs(m, ctx, quick):
    """Seconds of: one main step (S=1), one verify of [t, draft] (S=2), one MTP step (S=1, 2)."""
    cfg = m.config
    prompt = np.random.default_rng(1).integers(0, 256, ctx)
    cache, mc = m.new_cache(1, ctx + 8), m.new_mtp_cache(1, ctx + 8)
    _, h = m.forward_with_hidden(prompt[None], cache, 0)
    m.mtp_forward(h, prompt[None], mc, 0)
    mt = 0.3 if quick else 1.0
    one, two = np.array([[5]]), np.array([[5, 6]])
    t1 = timeit(lambda: m.forward(one, cache=cache, start_pos=ctx), min_time=mt)
    t2 = timeit(lambda: m.forward(two, cache=cache, start_pos=ctx), min_time=mt)
    hd = np.zeros((1, 2, cfg.hidden_size), np.float32)
    q1 = timeit(lambda: m.mtp_forward(hd[:, :1], one, mc, ctx), min_time=mt)
    q2 = timeit(lambda: m.mtp_forward(hd, two, mc, ctx), min_time=mt)
    return t1, t2, q1, q2


def decode_rows(name, cfg, contexts, bw, quick, costs):
    m = dsv3.Model(cfg, seed=0)
    sd = {k: v for k, v in m.state_dict().items()}
    tm = TorchModel(cfg, sd)
    del sd
    rows = []
    rng = np.random.default_rng(0)
    for ctx in contexts:
        prompt = rng.integers(0, 256, ctx)
        cache = m.new_cache(1, ctx + 8)
        lg = m.forward(prompt[None], cache=cache, start_pos=0)
        step = np.array([[int(np.argmax(lg[0, -1]))]])
        t_ds = timeit(lambda: m.forward(step, cache=cache, start_pos=ctx),
                      min_time=0.3 if quick else 1.0)
        td = TorchDecoder(tm, ctx + 8)
        tl = td.forward(torch.from_numpy(prompt[None]), 0)
        assert np.allclose(tl[0, -1].numpy(), lg[0, -1], atol=1e-3), "torch decode != dsv3"
        st = torch.from_numpy(step)
        t_pt = timeit(lambda: td.forward(st, ctx), min_time=0.3 if quick else 1.0)
        ok = np.allclose(td.forward(st, ctx)[0, -1].numpy(), m.forward(step, cache=cache, start_pos=ctx)[0, -1],
                         atol=1e-3)
        weight_bytes = 4 * cfg.num_parameters(active=True)
        cache_bytes = cache.bytes_per_token * (ctx + 1)
        floor = (weight_bytes + cache_bytes) / (bw * 1e9)
        rows.append((name, ctx, f"{1 / t_ds:.0f}", f"{1 / t_pt:.0f}", f"{t_pt / t_ds:.2f}x",
                     f"{1 / floor:.0f}", f"{floor / t_ds:.2f}", f"{(weight_bytes + cache_bytes) / 1e6:.1f}",
                     "yes" if ok else "NO"))
        del td, cache
    costs[name] = verify_costs(m, contexts[0], quick)
    return rows


def train_small(steps: int, seed: int = 0):
    """Config.small() after `steps` Adam steps (numpy, over Model.loss_and_grad) on a
    repeated English sentence: enough for the MTP module to draft well."""
    text = ("the quick brown fox jumps over the lazy dog while the cat sleeps in the sun. "
            * 50).encode()
    data = np.frombuffer(text, np.uint8).astype(np.int64)
    m = dsv3.Model(dsv3.Config.small(), seed=seed)
    rng = np.random.default_rng(seed)
    st = m.state_dict()
    mo = {k: np.zeros_like(v) for k, v in st.items()}
    ve = {k: np.zeros_like(v) for k, v in st.items()}
    for t in range(1, steps + 1):
        starts = rng.integers(0, len(data) - 65, 8)
        batch = np.stack([data[s:s + 65] for s in starts])
        losses, grads = m.loss_and_grad(batch, mtp_weight=1.0)
        for k, g in grads.items():
            mo[k] = 0.9 * mo[k] + 0.1 * g
            ve[k] = 0.99 * ve[k] + 0.01 * g * g
            st[k] = (st[k] - 3e-3 * (mo[k] / (1 - 0.9 ** t)) /
                     (np.sqrt(ve[k] / (1 - 0.99 ** t)) + 1e-8)).astype(np.float32)
        m.load_state_dict(st)
    return m, losses, data


def spec_rows(m, data, n_new):
    prompt = data[:32]
    rows = []
    for T in (0.0, 1.0):
        base = None
        for spec, D in ((None, 1), ("mtp", 1), ("mtp", 2), ("mtp", 3)):
            m.generate(prompt, max_new_tokens=8, temperature=T, speculative=spec,
                       num_draft_tokens=D)  # warm-up
            best = None
            for _ in range(3):
                s = m.generate(prompt, max_new_tokens=n_new, temperature=T, seed=0,
                               speculative=spec, num_draft_tokens=D).stats
                best = s if best is None or s["tokens_per_second"] > best["tokens_per_second"] else best
            base = base or best["tokens_per_second"]
            rows.append((T, spec or "plain", D if spec else "-", f"{best['tokens_per_second']:.0f}",
                         f"{best['tokens_per_second'] / base:.2f}x",
                         f"{best['acceptance_rate']:.3f}" if spec else "-",
                         f"{best['new_tokens'] / best['main_forwards']:.2f}"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for dsv3 and torch (default 1: stable on a shared machine)")
    ap.add_argument("--quick", action="store_true", help="small config and context 128 only")
    ap.add_argument("--train-steps", type=int, default=80)
    ap.add_argument("--new-tokens", type=int, default=200)
    a = ap.parse_args(argv)
    set_threads(a.threads)
    print(machine_line(), f"; threads {a.threads}")
    bw = memory_bandwidth()
    print(f"copy bandwidth {bw:.1f} GB/s")
    contexts = (128,) if a.quick else (128, 2048)
    costs = {}
    rows = decode_rows("small", dsv3.Config.small().replace(max_position_embeddings=4096),
                       contexts, bw, a.quick, costs)
    if not a.quick:
        rows += decode_rows("D1024-L8", large_config(), contexts, bw, a.quick, costs)
    print_table("Batch-1 decode tokens/s (one token after `context` cached tokens)",
                ["config", "context", "dsv3 tok/s", "torch tok/s", "dsv3/torch", "floor tok/s",
                 "dsv3/floor", "bytes/token MB", "same logits"], rows)
    t0 = time.perf_counter()
    m, losses, data = train_small(a.train_steps)
    print(f"\ntrained Config.small() {a.train_steps} steps in {time.perf_counter() - t0:.0f}s: "
          f"main {losses['main']:.3f}, mtp {losses['mtp']:.3f}")
    srows = spec_rows(m, data, a.new_tokens)
    print_table(f"Speculative (MTP) vs plain decoding, Config.small(), {a.new_tokens} new tokens",
                ["temperature", "mode", "drafts", "tok/s", "speed-up", "acceptance",
                 "tokens/main forward"], srows)
    # projection for configs not trained here: D=1 greedy, a step = verify (S=2) + MTP step
    alpha = float(srows[1][5])
    prow = []
    for name, (t1, t2, q1, q2) in costs.items():
        step = t2 + alpha * q2 + (1 - alpha) * q1
        prow.append((name, f"{t1 * 1e3:.2f}", f"{t2 * 1e3:.2f}", f"{q1 * 1e3:.2f}",
                     f"{q2 * 1e3:.2f}", f"{alpha:.3f}", f"{(1 + alpha) * t1 / step:.2f}x"))
    print_table(f"Projected MTP (1 draft, greedy) speed-up = (1+a) t1 / (t2 + MTP step) at context "
                f"{contexts[0]}, a = the acceptance measured above (not a measured speed-up)",
                ["config", "t1 ms (S=1)", "t2 ms (S=2)", "MTP S=1 ms", "MTP S=2 ms",
                 "acceptance a", "projected"], prow)
    return 0


if __name__ == "__main__":
    sys.exit(main())
