"""A float64 PyTorch reference of the whole DeepSeek-V3 model (semantics §2.1-2.5), written from the
formulas and independent of the C++: embedding, blocks (MLA or MHA/GQA, dense SwiGLU or MoE),
final norm, head, MTP modules, and the losses. Routing is decided in float64 by the same rules
as moe.ref_gate (selection is piecewise constant; autograd flows through the weights)."""
import numpy as np

from .moe import ref_selection_scores, t_seq_balance
from .nn import t_mha, t_mla, t_rmsnorm


def is_moe(cfg, i):
    return bool(cfg.n_routed_experts) and i >= cfg.first_k_dense_replace and i % cfg.moe_layer_freq == 0


def t_swiglu(torch, x, P, pre):
    g = x @ P[pre + "gate_proj.weight"].T
    return (torch.nn.functional.silu(g) * (x @ P[pre + "up_proj.weight"].T)) @ P[pre + "down_proj.weight"].T


def t_moe(torch, x, P, pre, cfg, stats):
    """x (B, T, D). Appends (scores (B,T,E), idx (B,T,K)) to stats for the balance loss."""
    B, T, D = x.shape
    xr = x.reshape(B * T, D)
    logits = xr @ P[pre + "gate.weight"].T
    s = torch.sigmoid(logits) if cfg.scoring_func == "sigmoid" else torch.softmax(logits, -1)
    bias = P.get(pre + "gate.e_score_correction_bias")
    sel, _ = ref_selection_scores(s.detach().numpy(), None if bias is None else bias.detach().numpy(), cfg)
    idx = np.argsort(-sel, axis=-1, kind="stable")[:, :cfg.num_experts_per_tok]
    w = torch.gather(s, 1, torch.tensor(idx))
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * cfg.routed_scaling_factor
    y = t_swiglu(torch, xr, P, pre + "shared_experts.") if cfg.n_shared_experts else torch.zeros_like(xr)
    for e in range(cfg.n_routed_experts):
        rows, ks = np.nonzero(idx == e)
        if len(rows):
            rt = torch.tensor(rows)
            y = y.index_add(0, rt, t_swiglu(torch, xr[rt], P, f"{pre}experts.{e}.") * w[rt, torch.tensor(ks)][:, None])
    stats.append((s.view(B, T, -1), idx.reshape(B, T, -1)))
    return y.view(B, T, D)


def t_block(torch, h, P, i, cfg, stats, cache_round=None):
    p = f"model.layers.{i}."
    a_in = t_rmsnorm(torch, h, P[p + "input_layernorm.weight"], cfg.rms_norm_eps)
    A = {k[len(p + "self_attn."):]: v for k, v in P.items() if k.startswith(p + "self_attn.")}
    if cfg.attention_type == "mla":
        h = h + t_mla(torch, a_in, A, cfg, cache_round=cache_round)
    else:
        h = h + t_mha(torch, a_in, A, cfg)
    f_in = t_rmsnorm(torch, h, P[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
    if is_moe(cfg, i):
        return h + t_moe(torch, f_in, P, p + "mlp.", cfg, stats)
    return h + t_swiglu(torch, f_in, P, p + "mlp.")


def t_balance(torch, stats, cfg, alpha):
    """Mean over MoE blocks of the mean over sequences of alpha * sum_i f_i P_i."""
    if not stats or alpha == 0:
        return torch.zeros(())
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    total = sum(t_seq_balance(torch, s, idx, E, K, alpha) for s, idx in stats)
    return total / len(stats)


def t_model(torch, P, cfg, tokens, alpha=0.0, mtp_weight=None, cache_round=None):
    """tokens (B, N) int. Returns dict of float64 tensors: logits (main, (B,N-1,V)), main, mtp,
    balance, loss. ``cache_round``: see t_mla (MLA layers)."""
    lam = cfg.mtp_loss_weight if mtp_weight is None else mtp_weight
    tokens = np.asarray(tokens)
    B, N = tokens.shape
    T = N - 1
    emb = P["model.embed_tokens.weight"]
    head = emb if cfg.tie_word_embeddings else P["lm_head.weight"]
    stats = []
    h = emb[torch.tensor(tokens[:, :T])]
    for i in range(cfg.num_hidden_layers):
        h = t_block(torch, h, P, i, cfg, stats, cache_round)
    hn = t_rmsnorm(torch, h, P["model.norm.weight"], cfg.rms_norm_eps)
    logits = hn @ head.T
    lsm = torch.log_softmax(logits, -1)
    tgt = torch.tensor(tokens[:, 1:])
    main = -lsm.gather(-1, tgt[..., None]).mean()
    Dm = cfg.num_nextn_predict_layers
    mtp = torch.zeros(())
    prev = hn
    for k in range(1, Dm + 1):
        L = T - k + 1
        if L < 2 or lam == 0:
            break
        p = f"model.layers.{cfg.num_hidden_layers + k - 1}."
        e = emb[torch.tensor(tokens[:, k:k + L])]
        cat = torch.cat([t_rmsnorm(torch, e, P[p + "enorm.weight"], cfg.rms_norm_eps),
                         t_rmsnorm(torch, prev[:, :L], P[p + "hnorm.weight"], cfg.rms_norm_eps)], -1)
        hk = t_block(torch, cat @ P[p + "eh_proj.weight"].T, P, cfg.num_hidden_layers + k - 1, cfg, stats)
        lk = torch.log_softmax(t_rmsnorm(torch, hk, P[p + "shared_head.norm.weight"], cfg.rms_norm_eps) @ head.T, -1)
        tk = torch.tensor(tokens[:, k + 1:k + L])           # t_{i+k+1} for i < L-1
        mtp = mtp + lam / Dm * (-lk[:, :L - 1].gather(-1, tk[..., None]).sum() / (B * T))
        prev = hk
    bal = t_balance(torch, stats, cfg, alpha)
    return {"logits": logits, "main": main, "mtp": mtp, "balance": bal, "loss": main + mtp + bal}
