"""The DeepSeekMoE layer of semantics §2.3 in plain PyTorch (eager, CPU): the peer for
bench_moe.py and a second, independent implementation of the layer. Tokens are sorted by
expert and each expert runs its SwiGLU on its contiguous block (the usual efficient eager
formulation), so the comparison is against a reasonable PyTorch layer, not a per-token loop.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F


class TorchMoE(torch.nn.Module):
    def __init__(self, params: Dict[str, np.ndarray], cfg, dtype=torch.float32):
        super().__init__()
        self.cfg = cfg
        E = cfg.n_routed_experts
        t = lambda a: torch.nn.Parameter(torch.tensor(np.asarray(a), dtype=dtype))
        self.gate_weight = t(params["gate.weight"])
        bias = params.get("gate.e_score_correction_bias")
        self.register_buffer("bias", None if bias is None else torch.tensor(bias, dtype=dtype))
        self.experts = torch.nn.ParameterList()
        for j in range(E):
            for n in ("gate_proj", "up_proj", "down_proj"):
                self.experts.append(t(params[f"experts.{j}.{n}.weight"]))
        self.shared = torch.nn.ParameterList(
            [t(params[f"shared_experts.{n}.weight"]) for n in ("gate_proj", "up_proj", "down_proj")]
            if cfg.n_shared_experts else [])

    def route(self, x):
        c = self.cfg
        logits = x @ self.gate_weight.T
        s = torch.sigmoid(logits) if c.scoring_func == "sigmoid" else torch.softmax(logits, -1)
        sel = s.detach() if self.bias is None else s.detach() + self.bias
        if c.n_group > 1 and c.topk_method != "greedy":
            g = sel.view(x.shape[0], c.n_group, -1)
            gs = g.topk(2, -1).values.sum(-1) if c.topk_method == "noaux_tc" else g.amax(-1)
            keep = gs.topk(c.topk_group, -1).indices
            mask = torch.ones_like(gs, dtype=torch.bool).scatter_(1, keep, False)
            sel = g.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
        idx = sel.topk(c.num_experts_per_tok, -1).indices
        w = s.gather(1, idx)
        if c.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * c.routed_scaling_factor

    @staticmethod
    def mlp(h, gate, up, down):
        return (F.silu(h @ gate.T) * (h @ up.T)) @ down.T

    def forward(self, x):
        c = self.cfg
        K = c.num_experts_per_tok
        idx, w = self.route(x)
        flat = idx.flatten()
        order = torch.argsort(flat, stable=True)
        token = order // K
        counts = torch.bincount(flat, minlength=c.n_routed_experts).tolist()
        xs = x[token]
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                outs.append(self.mlp(xs[start:start + n], *self.experts[3 * e:3 * e + 3]))
                start += n
        ye = torch.cat(outs) * w.flatten()[order].unsqueeze(-1)
        y = torch.zeros_like(x).index_add(0, token, ye)
        if len(self.shared):
            y = y + self.mlp(x, *self.shared)
        return y
