"""Float64 references written from docs/semantics.md's formulas (numpy + PyTorch autograd), independent of
the C++: RoPE/YaRN, RMSNorm, MLA and MHA/GQA layers. Used by the layer and model tests."""
import math

import numpy as np


def ref_inv_freq(d, theta, rs):
    """semantics §2.2, literally: f_i = theta^(-2i/d); YaRN blends f_i/factor and f_i by a ramp over
    the correction range; returns (freqs, cos/sin multiplier, low, high)."""
    f = np.array([theta ** (-2.0 * i / d) for i in range(d // 2)])
    if rs is None:
        return f, 1.0, None, None
    factor = rs.get("factor", 1.0)
    orig = rs.get("original_max_position_embeddings", 4096)
    bf, bs = rs.get("beta_fast", 32), rs.get("beta_slow", 1)
    corr = lambda r: d * math.log(orig / (r * 2 * math.pi)) / (2 * math.log(theta))
    low = max(math.floor(corr(bf)), 0)
    high = min(math.ceil(corr(bs)), d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2) - low) / (high - low), 0, 1)
    f = f / factor * ramp + f * (1 - ramp)
    ms = lambda s, m: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1
    mult = ms(factor, rs.get("mscale", 1.0)) / ms(factor, rs.get("mscale_all_dim", 0.0) or 0.0)
    return f, mult, low, high


def softmax_scale(cfg):
    s = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    rs = cfg.rope_scaling
    if rs and rs.get("mscale_all_dim") and rs.get("factor", 1) > 1:
        m = 0.1 * rs["mscale_all_dim"] * math.log(rs["factor"]) + 1
        s *= m * m
    return s


def t_rope(torch, x, pos, cfg):
    """x (B, T, H, Dr) torch float64; adjacent pairs rotated by pos * f_i."""
    f, mult, _, _ = ref_inv_freq(x.shape[-1], cfg.rope_theta, cfg.rope_scaling)
    ang = torch.tensor(np.asarray(pos, dtype=np.float64)[:, None] * f)  # (T, Dr/2)
    c = (torch.cos(ang) * mult)[None, :, None, :].to(x.dtype)
    s = (torch.sin(ang) * mult)[None, :, None, :].to(x.dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2)


def t_rmsnorm(torch, x, w, eps):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def t_causal_attention(torch, q, k, v, scale, start_pos=0, fast=False):
    """q (B,Tq,H,Dk), k (B,Tk,H,Dk), v (B,Tk,H,Dv) with the offset causal mask. ``fast`` uses
    PyTorch's fused SDPA (the benchmark peer); the default spells the softmax out (the oracle)."""
    Tq, Tk = q.shape[1], k.shape[1]
    if fast:
        mask = torch.arange(Tk)[None, :] <= (start_pos + torch.arange(Tq))[:, None]
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=(start_pos == 0 and Tq == Tk), attn_mask=None if Tq == Tk else mask,
            scale=scale)
        return o.transpose(1, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    mask = torch.arange(Tk)[None, :] > (start_pos + torch.arange(Tq))[:, None]
    p = torch.softmax(s.masked_fill(mask, float("-inf")), -1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def t_mla(torch, x, P, cfg, start_pos=0, fast=False, cache_round=None):
    """MLA naive form (semantics §2.2). x (B,T,D); P: {hf name (relative to self_attn.): tensor}.
    ``cache_round``: applied to the latent c and the roped k_pe (what a decoding cache stores,
    e.g. rounding to bf16) before keys and values are formed from them."""
    B, T, _ = x.shape
    H, Dn, Dr, Dv = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                     cfg.v_head_dim)
    Dc, eps = cfg.kv_lora_rank, cfg.rms_norm_eps
    pos = np.arange(start_pos, start_pos + T)
    if cfg.q_lora_rank:
        q = t_rmsnorm(torch, x @ P["q_a_proj.weight"].T, P["q_a_layernorm.weight"], eps)
        q = q @ P["q_b_proj.weight"].T
    else:
        q = x @ P["q_proj.weight"].T
    q = q.view(B, T, H, Dn + Dr)
    q = torch.cat([q[..., :Dn], t_rope(torch, q[..., Dn:], pos, cfg)], -1)
    kva = x @ P["kv_a_proj_with_mqa.weight"].T
    c = t_rmsnorm(torch, kva[..., :Dc], P["kv_a_layernorm.weight"], eps)
    kpe = t_rope(torch, kva[..., Dc:].view(B, T, 1, Dr), pos, cfg)  # one per token
    if cache_round is not None:
        c, kpe = cache_round(c), cache_round(kpe)
    kv = (c @ P["kv_b_proj.weight"].T).view(B, T, H, Dn + Dv)
    k = torch.cat([kv[..., :Dn], kpe.expand(B, T, H, Dr)], -1)
    o = t_causal_attention(torch, q, k, kv[..., Dn:], softmax_scale(cfg), 0, fast)
    return o.reshape(B, T, H * Dv) @ P["o_proj.weight"].T


def t_mha(torch, x, P, cfg, start_pos=0, fast=False):
    """MHA/GQA baseline: q/k heads [Dn | Dr roped], kv heads shared by H/Hkv query heads."""
    B, T, _ = x.shape
    H, Dn, Dr, Dv = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                     cfg.v_head_dim)
    Hkv = H if cfg.attention_type == "mha" else cfg.num_key_value_heads
    pos = np.arange(start_pos, start_pos + T)
    q = (x @ P["q_proj.weight"].T).view(B, T, H, Dn + Dr)
    k = (x @ P["k_proj.weight"].T).view(B, T, Hkv, Dn + Dr)
    v = (x @ P["v_proj.weight"].T).view(B, T, Hkv, Dv)
    q = torch.cat([q[..., :Dn], t_rope(torch, q[..., Dn:], pos, cfg)], -1)
    k = torch.cat([k[..., :Dn], t_rope(torch, k[..., Dn:], pos, cfg)], -1)
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    o = t_causal_attention(torch, q, k, v, softmax_scale(cfg), 0, fast)
    return o.reshape(B, T, H * Dv) @ P["o_proj.weight"].T


def attention_param_shapes(cfg):
    D, H = cfg.hidden_size, cfg.num_attention_heads
    dqk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if cfg.attention_type == "mla":
        s = {}
        if cfg.q_lora_rank:
            s["q_a_proj.weight"] = (cfg.q_lora_rank, D)
            s["q_a_layernorm.weight"] = (cfg.q_lora_rank,)
            s["q_b_proj.weight"] = (H * dqk, cfg.q_lora_rank)
        else:
            s["q_proj.weight"] = (H * dqk, D)
        s["kv_a_proj_with_mqa.weight"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, D)
        s["kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
        s["kv_b_proj.weight"] = (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        s["o_proj.weight"] = (D, H * cfg.v_head_dim)
        return s
    Hkv = H if cfg.attention_type == "mha" else cfg.num_key_value_heads
    return {"q_proj.weight": (H * dqk, D), "k_proj.weight": (Hkv * dqk, D),
            "v_proj.weight": (Hkv * cfg.v_head_dim, D), "o_proj.weight": (D, H * cfg.v_head_dim)}


def random_attention_params(cfg, rng, scale=0.3):
    P = {}
    for name, shape in attention_param_shapes(cfg).items():
        if name.endswith("layernorm.weight"):
            P[name] = (1 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        else:
            P[name] = (rng.standard_normal(shape) * scale / np.sqrt(shape[-1])).astype(np.float32)
    return P
