"""DeepSeek-V3 in PyTorch eager, float32: the benchmark peer (and a second reference).

Written the way a researcher would write it in PyTorch (HF-style): MLA through
scaled_dot_product_attention, MoE with torch.topk routing and a loop over experts gathering
their tokens, SwiGLU, MTP modules. Parameters are the dsv3 state dict (Hugging Face names).
"""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from .nn import ref_inv_freq  # the YaRN frequencies, float64


class TorchModel(torch.nn.Module):
    def __init__(self, cfg, state_dict):
        super().__init__()
        self.cfg = cfg
        self.names = list(state_dict)
        self.p = torch.nn.ParameterDict({
            k.replace(".", "__"): torch.nn.Parameter(torch.from_numpy(np.array(v)),
                                                     requires_grad=not k.endswith("bias"))
            for k, v in state_dict.items()})
        f, mult, _, _ = ref_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.inv_freq = torch.tensor(f, dtype=torch.float64)
        self.rope_mult = mult
        self.scale = cfg.softmax_scale

    def w(self, name):
        return self.p[name.replace(".", "__")]

    def has(self, name):
        return name.replace(".", "__") in self.p

    # ------------------------------------------------------------------ pieces
    def norm(self, x, name):
        return F.rms_norm(x, (x.shape[-1],), self.w(name), self.cfg.rms_norm_eps)

    def rope(self, x, T):  # x (B, T, H, Dr), adjacent pairs
        ang = torch.arange(T, dtype=torch.float64)[:, None] * self.inv_freq
        c = (ang.cos() * self.rope_mult).float()[None, :, None, :]
        s = (ang.sin() * self.rope_mult).float()[None, :, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2)

    def attention(self, x, p):
        c = self.cfg
        B, T, _ = x.shape
        H, Dn, Dr, Dv = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        if c.attention_type == "mla":
            if c.q_lora_rank:
                q = F.linear(self.norm(F.linear(x, self.w(p + "q_a_proj.weight")), p + "q_a_layernorm.weight"),
                             self.w(p + "q_b_proj.weight"))
            else:
                q = F.linear(x, self.w(p + "q_proj.weight"))
            q = q.view(B, T, H, Dn + Dr)
            kva = F.linear(x, self.w(p + "kv_a_proj_with_mqa.weight"))
            kv = F.linear(self.norm(kva[..., :c.kv_lora_rank], p + "kv_a_layernorm.weight"),
                          self.w(p + "kv_b_proj.weight")).view(B, T, H, Dn + Dv)
            kpe = self.rope(kva[..., c.kv_lora_rank:].reshape(B, T, 1, Dr), T)
            k = torch.cat([kv[..., :Dn], kpe.expand(B, T, H, Dr)], -1)
            v = kv[..., Dn:]
        else:
            Hkv = H if c.attention_type == "mha" else c.num_key_value_heads
            q = F.linear(x, self.w(p + "q_proj.weight")).view(B, T, H, Dn + Dr)
            k = F.linear(x, self.w(p + "k_proj.weight")).view(B, T, Hkv, Dn + Dr)
            v = F.linear(x, self.w(p + "v_proj.weight")).view(B, T, Hkv, Dv)
            k = torch.cat([k[..., :Dn], self.rope(k[..., Dn:], T)], -1)
            k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
        q = torch.cat([q[..., :Dn], self.rope(q[..., Dn:], T)], -1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=self.scale)
        return F.linear(o.transpose(1, 2).reshape(B, T, H * Dv), self.w(p + "o_proj.weight"))

    def swiglu(self, x, p):
        return F.linear(F.silu(F.linear(x, self.w(p + "gate_proj.weight"))) * F.linear(x, self.w(p + "up_proj.weight")),
                        self.w(p + "down_proj.weight"))

    def moe(self, x, p, stats):
        c = self.cfg
        B, T, D = x.shape
        xr = x.reshape(-1, D)
        logits = F.linear(xr, self.w(p + "gate.weight"))
        s = logits.sigmoid() if c.scoring_func == "sigmoid" else logits.softmax(-1)
        sel = s.detach()
        if self.has(p + "gate.e_score_correction_bias"):
            sel = sel + self.w(p + "gate.e_score_correction_bias")
        if c.n_group > 1 and c.topk_method != "greedy":
            g = sel.view(-1, c.n_group, c.n_routed_experts // c.n_group)
            gs = g.topk(2, -1).values.sum(-1) if c.topk_method == "noaux_tc" else g.max(-1).values
            keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.topk(c.topk_group, -1).indices, True)
            sel = sel.masked_fill(~keep.repeat_interleave(c.n_routed_experts // c.n_group, 1), float("-inf"))
        idx = sel.topk(c.num_experts_per_tok, -1).indices
        wts = s.gather(1, idx)
        if c.norm_topk_prob:
            wts = wts / (wts.sum(-1, keepdim=True) + 1e-20)
        wts = wts * c.routed_scaling_factor
        y = self.swiglu(xr, p + "shared_experts.") if c.n_shared_experts else torch.zeros_like(xr)
        flat = idx.reshape(-1)
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=c.n_routed_experts).tolist()
        tok = order // c.num_experts_per_tok
        start = 0
        for e, n in enumerate(counts):
            if n:
                sl = order[start:start + n]
                rows = tok[start:start + n]
                out = self.swiglu(xr[rows], f"{p}experts.{e}.") * wts.reshape(-1)[sl][:, None]
                y = y.index_add(0, rows, out)
            start += n
        stats.append((s.view(B, T, -1), idx.view(B, T, -1)))
        return y.view(B, T, D)

    def block(self, h, i, stats):
        p = f"model.layers.{i}."
        h = h + self.attention(self.norm(h, p + "input_layernorm.weight"), p + "self_attn.")
        x = self.norm(h, p + "post_attention_layernorm.weight")
        moe = self.cfg.n_routed_experts and i >= self.cfg.first_k_dense_replace and i % self.cfg.moe_layer_freq == 0
        return h + (self.moe(x, p + "mlp.", stats) if moe else self.swiglu(x, p + "mlp."))

    def head(self):
        return self.w("model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight")

    # ------------------------------------------------------------------ model
    def forward(self, tokens):
        stats = []
        h = F.embedding(tokens, self.w("model.embed_tokens.weight"))
        for i in range(self.cfg.num_hidden_layers):
            h = self.block(h, i, stats)
        return F.linear(self.norm(h, "model.norm.weight"), self.head())

    def loss(self, tokens, alpha=0.0, mtp_weight=None):
        c = self.cfg
        lam = c.mtp_loss_weight if mtp_weight is None else mtp_weight
        B, N = tokens.shape
        T = N - 1
        stats = []
        h = F.embedding(tokens[:, :T], self.w("model.embed_tokens.weight"))
        for i in range(c.num_hidden_layers):
            h = self.block(h, i, stats)
        hn = self.norm(h, "model.norm.weight")
        main = F.cross_entropy(F.linear(hn, self.head()).flatten(0, 1), tokens[:, 1:].flatten())
        mtp = torch.zeros(())
        prev = hn
        for k in range(1, c.num_nextn_predict_layers + 1):
            L = T - k + 1
            if L < 2 or lam == 0:
                break
            p = f"model.layers.{c.num_hidden_layers + k - 1}."
            e = F.embedding(tokens[:, k:k + L], self.w("model.embed_tokens.weight"))
            x = F.linear(torch.cat([self.norm(e, p + "enorm.weight"), self.norm(prev[:, :L], p + "hnorm.weight")], -1),
                         self.w(p + "eh_proj.weight"))
            hk = self.block(x, c.num_hidden_layers + k - 1, stats)
            lk = F.linear(self.norm(hk, p + "shared_head.norm.weight"), self.head())
            ce = F.cross_entropy(lk[:, :L - 1].flatten(0, 1), tokens[:, k + 1:k + L].flatten(), reduction="sum")
            mtp = mtp + lam / c.num_nextn_predict_layers * ce / (B * T)
            prev = hk
        bal = torch.zeros(())
        if alpha and stats:
            E, K = c.n_routed_experts, c.num_experts_per_tok
            for s, idx in stats:
                Bs, Ts, _ = s.shape
                f = torch.stack([torch.bincount(idx[b].flatten(), minlength=E) for b in range(Bs)]).float() * (E / (K * Ts))
                P = (s / s.sum(-1, keepdim=True)).mean(1)
                bal = bal + alpha * (f * P).sum(-1).mean()
            bal = bal / len(stats)
        return {"loss": main + mtp + bal, "main": main, "mtp": mtp, "balance": bal}
