"""Whole model: forward+backward tokens/s of Config.small() vs the same model in PyTorch eager
(dsv3.reference.torch_model), and model FLOPs utilisation against the measured sgemm peak.

    python bench/bench_model.py [--threads N] [--batch 8] [--seq 256]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, print_table, set_threads, sgemm_peak, timeit  # noqa: E402

import dsv3  # noqa: E402


def model_flops_per_token(cfg, T):
    """Forward FLOPs per token: 2 x activated matmul parameters (embedding lookup excluded, the
    head included) + causal attention (QK^T and PV over T/2 keys on average), main model and
    MTP modules (each MTP block sees about the same T tokens)."""
    D = cfg.hidden_size
    dense = cfg.num_parameters(active=True, mtp=True) - cfg.vocab_size * D
    attn_per_layer = 2 * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
                                                    + cfg.v_head_dim) * (T / 2)
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    head_mtp = cfg.num_nextn_predict_layers * cfg.vocab_size * D  # the shared head again
    return 2 * (dense + head_mtp) + layers * attn_per_layer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    a = p.parse_args(argv)
    import torch
    from dsv3.reference.torch_model import TorchModel
    set_threads(a.threads)
    print(machine_line())
    peak = sgemm_peak()
    cfg = dsv3.Config.small()
    m = dsv3.Model(cfg, seed=0)
    tm = TorchModel(cfg, m.state_dict())
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(a.batch, a.seq + 1))
    tt = torch.from_numpy(tokens)
    ntok = a.batch * a.seq
    t_fwd = timeit(lambda: m.forward(tokens[:, :-1]), min_time=2)
    t_fb = timeit(lambda: m.loss_and_grad(tokens), min_time=3)

    def torch_fb():
        tm.zero_grad(set_to_none=True)
        tm.loss(tt, alpha=cfg.seq_aux_loss_alpha)["loss"].backward()

    with torch.no_grad():
        tt_fwd = timeit(lambda: tm(tt[:, :-1]), min_time=2)
    tt_fb = timeit(torch_fb, min_time=3)
    f = model_flops_per_token(cfg, a.seq)
    rows = [["forward (main model)", f"{ntok / t_fwd:,.0f}", f"{ntok / tt_fwd:,.0f}",
             f"{tt_fwd / t_fwd:.2f}x", "-"],
            ["loss + backward (main + MTP + balance)", f"{ntok / t_fb:,.0f}", f"{ntok / tt_fb:,.0f}",
             f"{tt_fb / t_fb:.2f}x", f"{100 * 3 * f * ntok / t_fb / 1e9 / peak:.0f}%"]]
    print(f"Config.small(): {cfg.num_parameters(mtp=True) / 1e6:.2f}M parameters "
          f"({cfg.num_parameters(active=True, mtp=True) / 1e6:.2f}M active), batch {a.batch}, "
          f"seq {a.seq}, {a.threads} threads; sgemm peak {peak:.0f} GFLOP/s; "
          f"{f / 1e6:.1f} MFLOP/token forward")
    print_table("dsv3 vs PyTorch eager (tokens/s; speedup = torch time / dsv3 time; MFU = 3 x "
                "forward FLOPs / time / sgemm peak)",
                ["pass", "dsv3 tok/s", "torch tok/s", "speedup", "MFU"], rows)


if __name__ == "__main__":
    main()
