"""MLA: training-form speed vs the same layer in PyTorch, and decode time per token for
absorbed MLA / naive MLA / MHA / GQA against the memory-bandwidth floor.

    python bench/bench_mla.py [--threads N] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import (machine_line, memory_bandwidth, print_table, set_threads, sgemm_peak,  # noqa: E402
                    timeit, timeit_paired)
from dsv3.reference.nn import random_attention_params, t_mha, t_mla  # noqa: E402

import dsv3  # noqa: E402
from dsv3 import ops  # noqa: E402


def layer_config(**kw):
    base = dict(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                num_attention_heads=8, num_key_value_heads=8, q_lora_rank=192, kv_lora_rank=128,
                qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=None,
                first_k_dense_replace=1, num_nextn_predict_layers=0, max_position_embeddings=16384,
                bos_token_id=0, eos_token_id=1)
    base.update(kw)
    return dsv3.Config(**base)


def train_form(rng, B, T):
    import torch
    rows = []
    for name, cfg in (("mla", layer_config()), ("mha", layer_config(attention_type="mha")),
                      ("gqa-2", layer_config(attention_type="gqa", num_key_value_heads=2))):
        P = random_attention_params(cfg, rng)
        x = rng.standard_normal((B, T, cfg.hidden_size)).astype(np.float32)
        d = rng.standard_normal(x.shape).astype(np.float32)
        Pt = {k: torch.from_numpy(v.copy()).requires_grad_() for k, v in P.items()}
        xt = torch.from_numpy(x.copy()).requires_grad_()
        dt = torch.from_numpy(d)
        f = t_mla if cfg.attention_type == "mla" else t_mha
        def torch_fwd():
            with torch.no_grad():
                f(torch, xt, Pt, cfg, fast=True)

        def torch_fb():
            for v in list(Pt.values()) + [xt]:
                v.grad = None
            f(torch, xt, Pt, cfg, fast=True).backward(dt)

        # dsv3 and PyTorch calls alternate (this VM's speed drifts by several percent between
        # minutes), after 3 warm-up calls each (PyTorch's first calls of a shape run 1.3-2.5x
        # slower while its allocator settles); medians of 11 calls.
        t_fwd, tt_fwd = timeit_paired(lambda: ops.attention_layer(x, P, cfg), torch_fwd, 11)
        t_fb, tt_fb = timeit_paired(lambda: ops.attention_layer_backward(d, x, P, cfg),  # + fwd
                                    torch_fb, 11)
        ntok = B * T
        rows.append([name, f"{ntok / t_fwd:,.0f}", f"{ntok / tt_fwd:,.0f}", f"{tt_fwd / t_fwd:.2f}x",
                     f"{ntok / t_fb:,.0f}", f"{ntok / tt_fb:,.0f}", f"{tt_fb / t_fb:.2f}x"])
    print_table(f"Training form, hidden 512, 8 heads, kv_lora 128, q_lora 192, B={B}, T={T} "
                "(tokens/s; speedup = torch time / dsv3 time)",
                ["layer", "dsv3 fwd", "torch fwd", "speedup", "dsv3 fwd+bwd", "torch fwd+bwd",
                 "speedup"], rows)


def decode(rng, contexts, bw):
    rows = []
    variants = [("MLA absorbed", layer_config(), True), ("MLA naive", layer_config(), False),
                ("MHA", layer_config(attention_type="mha"), True),
                ("GQA (2 kv heads)", layer_config(attention_type="gqa", num_key_value_heads=2), True)]
    for ctx in contexts:
        for name, cfg, absorbed in variants:
            P = random_attention_params(cfg, rng)
            cache = dsv3.KVCache(cfg, batch=1, max_len=ctx + 1, layers=1)
            prompt = rng.standard_normal((1, ctx, cfg.hidden_size)).astype(np.float32)
            for s in range(0, ctx, 1024):  # fill the cache in chunks
                ops.attention_layer_decode(prompt[:, s:s + 1024], P, cfg, cache, 0, s, absorbed)
            x = rng.standard_normal((1, 1, cfg.hidden_size)).astype(np.float32)
            t = timeit(lambda: ops.attention_layer_decode(x, P, cfg, cache, 0, ctx, absorbed))
            cache_bytes = ctx * cache.bytes_per_token
            weight_bytes = sum(v.nbytes for v in P.values())
            floor = (cache_bytes + weight_bytes) / (bw * 1e9)
            rows.append([ctx, name, f"{cache.bytes_per_token}", f"{t * 1e6:.1f}",
                         f"{floor * 1e6:.1f}", f"{floor / t:.2f}"])
    print_table("Decode, one layer, batch 1: time per token vs the floor of reading its cache "
                "and weights once at the measured copy bandwidth",
                ["context", "layer", "cache B/token", "us/token", "floor us", "floor/time"], rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    set_threads(a.threads)
    print(machine_line())
    bw = memory_bandwidth()
    print(f"threads {a.threads}; sgemm {sgemm_peak():.0f} GFLOP/s; copy bandwidth {bw:.1f} GB/s")
    rng = np.random.default_rng(0)
    train_form(rng, 2 if a.quick else 8, 128 if a.quick else 512)
    decode(rng, [256, 2048] if a.quick else [256, 1024, 4096, 8192], bw)


if __name__ == "__main__":
    main()
