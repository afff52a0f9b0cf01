"""Independent float64 references for the MoE tests, written from semantics §2.3-2.4 (not from the
C++): the gate (numpy), a dense MoE layer that runs every expert on every token (numpy), the
same layer with autograd (PyTorch float64) and the sequence-wise balance loss."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

import dsv3

f64 = np.float64


def moe_cfg(**kw) -> dsv3.Config:
    """A validated Config with the given MoE fields (the rest from Config.tiny())."""
    return dsv3.Config.tiny().replace(**kw)


def grouped(cfg) -> bool:
    return cfg.n_group > 1 and cfg.topk_method != "greedy"


# ------------------------------------------------------------------------------------ gate
def ref_scores(x: np.ndarray, weight: np.ndarray, scoring: str) -> np.ndarray:
    """s = sigmoid(x W^T) or softmax(x W^T), float64, rows = all leading dims of x."""
    logits = x.reshape(-1, x.shape[-1]).astype(f64) @ weight.astype(f64).T
    if scoring == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def ref_selection_scores(s: np.ndarray, bias: Optional[np.ndarray], cfg) -> Tuple[np.ndarray, np.ndarray]:
    """(s_sel with -inf outside the kept groups, group scores or None) per semantics §2.3 1-3."""
    sel = s + (0.0 if bias is None else bias.astype(f64)[None, :])
    if not grouped(cfg):
        return sel, None
    R, E = sel.shape
    G = cfg.n_group
    g = sel.reshape(R, G, E // G)
    if cfg.topk_method == "noaux_tc":
        gs = -np.sort(-g, axis=-1)[..., :2].sum(axis=-1)  # sum of the two largest
    else:
        gs = g.max(axis=-1)
    kept = np.argsort(-gs, axis=-1, kind="stable")[:, :cfg.topk_group]  # ties: lower group
    drop = np.ones((R, G), dtype=bool)
    np.put_along_axis(drop, kept, False, axis=-1)
    sel = np.where(np.repeat(drop, E // G, axis=-1), -np.inf, sel)
    return sel, gs


def ref_gate(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], cfg):
    """(idx int64 (R,K), w float64 (R,K), s float64 (R,E)) for x (..., D) flattened to rows."""
    s = ref_scores(x, weight, cfg.scoring_func)
    sel, _ = ref_selection_scores(s, bias, cfg)
    idx = np.argsort(-sel, axis=-1, kind="stable")[:, :cfg.num_experts_per_tok]  # ties: lower
    w = np.take_along_axis(s, idx, axis=-1)
    if cfg.norm_topk_prob:
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
    return idx.astype(np.int64), w * cfg.routed_scaling_factor, s


def decision_margins(x, weight, bias, cfg) -> np.ndarray:
    """Per token, the smallest gap between consecutive candidates that decides the ordered
    selection (the K+1 best selection scores, and the topk_group+1 best group scores)."""
    s = ref_scores(x, weight, cfg.scoring_func)
    sel, gs = ref_selection_scores(s, bias, cfg)
    K = cfg.num_experts_per_tok
    top = -np.sort(-sel, axis=-1)[:, :K + 1]
    if top.shape[1] == K + 1:
        top[:, K] = np.where(np.isinf(top[:, K]), -1e30, top[:, K])
    m = np.min(-np.diff(top, axis=-1), axis=-1) if top.shape[1] > 1 else np.full(len(s), np.inf)
    if gs is not None and cfg.topk_group < cfg.n_group:
        g = -np.sort(-gs, axis=-1)
        m = np.minimum(m, g[:, cfg.topk_group - 1] - g[:, cfg.topk_group])
    return m


# ------------------------------------------------------------------------------------ layer
def silu(v):
    return v / (1.0 + np.exp(-v))


def ref_mlp(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    x = x.astype(f64)
    return (silu(x @ gate.astype(f64).T) * (x @ up.astype(f64).T)) @ down.astype(f64).T


def ref_moe_forward(x: np.ndarray, params: Dict[str, np.ndarray], cfg, idx: np.ndarray,
                    w: np.ndarray) -> np.ndarray:
    """Dense reference: every expert runs on every token; y = Shared(x) + sum_e c_e * E_e(x),
    c_e[t] = sum_k w[t,k] [idx[t,k] == e]. x (R, D) rows; returns float64 (R, D)."""
    xr = x.reshape(-1, x.shape[-1]).astype(f64)
    y = np.zeros_like(xr)
    if cfg.n_shared_experts:
        y += ref_mlp(xr, params["shared_experts.gate_proj.weight"],
                     params["shared_experts.up_proj.weight"],
                     params["shared_experts.down_proj.weight"])
    for e in range(cfg.n_routed_experts):
        coef = np.sum(np.where(idx == e, w, 0.0), axis=-1)
        p = f"experts.{e}."
        y += coef[:, None] * ref_mlp(xr, params[p + "gate_proj.weight"], params[p + "up_proj.weight"],
                                     params[p + "down_proj.weight"])
    return y


def ref_balance_loss(s: np.ndarray, idx: np.ndarray, alpha: float, E: int) -> float:
    """semantics §2.4: mean over sequences of alpha * sum_i f_i P_i. s (B,T,E), idx (B,T,K)."""
    B, T, K = idx.shape
    s = np.asarray(s, dtype=f64)
    total = 0.0
    for b in range(B):
        counts = np.bincount(idx[b].ravel(), minlength=E).astype(f64)
        f = E / (K * T) * counts
        P = (s[b] / s[b].sum(axis=-1, keepdims=True)).mean(axis=0)
        total += alpha * np.sum(f * P)
    return total / B


def t_seq_balance(torch, s, idx: np.ndarray, E: int, K: int, alpha: float):
    """Sequence-wise balance loss in torch (differentiable in s): s (B, T, E) affinities,
    idx (B, T, K) chosen experts; mean over sequences of alpha * sum_i f_i P_i with
    f_i = E / (K T) * count_i and P_i the mean over tokens of s_i / sum_j s_j."""
    B, T, _ = s.shape
    bal = 0
    for b in range(B):
        f = torch.tensor(E / (K * T) * np.bincount(idx[b].ravel(), minlength=E), dtype=s.dtype)
        Pm = (s[b] / s[b].sum(-1, keepdim=True)).mean(0)
        bal = bal + alpha * (f * Pm).sum()
    return bal / B


def torch_moe_grads(torch, x: np.ndarray, params: Dict[str, np.ndarray], cfg, idx: np.ndarray,
                    dy: np.ndarray, alpha: float = 0.0):
    """float64 autograd of L = sum(dy * y) + balance loss with the routing fixed to idx
    (selection is piecewise constant). x (B,T,D) or (T,D). Returns (L, dx, grads)."""
    shape = x.shape
    B = shape[0] if x.ndim == 3 else 1
    D = shape[-1]
    xt = torch.tensor(x.reshape(-1, D), dtype=torch.float64, requires_grad=True)
    P = {k: torch.tensor(v, dtype=torch.float64, requires_grad=k != "gate.e_score_correction_bias")
         for k, v in params.items()}
    it = torch.tensor(idx.reshape(-1, idx.shape[-1]))
    logits = xt @ P["gate.weight"].T
    s = torch.sigmoid(logits) if cfg.scoring_func == "sigmoid" else torch.softmax(logits, -1)
    w = torch.gather(s, 1, it)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * cfg.routed_scaling_factor

    def mlp(h, pre):
        g = h @ P[pre + "gate_proj.weight"].T
        return (torch.nn.functional.silu(g) * (h @ P[pre + "up_proj.weight"].T)) @ P[pre + "down_proj.weight"].T

    y = mlp(xt, "shared_experts.") if cfg.n_shared_experts else torch.zeros_like(xt)
    for e in range(cfg.n_routed_experts):
        rows, ks = np.nonzero(idx.reshape(-1, idx.shape[-1]) == e)
        if len(rows) == 0:
            continue
        rt = torch.tensor(rows)
        out = mlp(xt[rt], f"experts.{e}.") * w[rt, torch.tensor(ks)][:, None]
        y = y.index_add(0, rt, out)
    L = (y * torch.tensor(dy.reshape(-1, D), dtype=torch.float64)).sum()
    if alpha:
        E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
        T = xt.shape[0] // B
        L = L + t_seq_balance(torch, s.reshape(B, T, E), idx.reshape(B, T, K), E, K, alpha)
    L.backward()
    grads = {k: (v.grad.numpy() if v.grad is not None else np.zeros(v.shape))  # unused expert
             for k, v in P.items() if v.requires_grad}
    return float(L.detach()), xt.grad.numpy().reshape(shape), grads
