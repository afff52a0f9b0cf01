"""Load balancing (semantics §2.4): expert loads, MaxVio, the aux-loss-free bias update and the
sequence-wise balance loss, against formulas written here.

Tolerances: the loss is accumulated in double from float32 scores, so it matches the float64
formula to 1e-10 relative (summation order only). Its gradient is rounded once to float32:
rtol 1e-6, atol 1e-6 * max|grad|. The bias update is exact (one float32 add of +-gamma).
"""
from __future__ import annotations

import numpy as np
import pytest

import dsv3
from conftest import SIZES_ODD, fd_check, get_torch, noncontig
from dsv3.reference.moe import moe_cfg, ref_balance_loss


def random_routing(rng, B, T, E, K, softmax=False):
    logits = rng.standard_normal((B, T, E))
    if softmax:
        s = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    else:
        s = 1 / (1 + np.exp(-logits))
    idx = np.argsort(-(s + rng.standard_normal((B, T, E)) * 0.1), axis=-1)[..., :K]
    return s.astype(np.float32), idx.astype(np.int64)


# ----------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("T", SIZES_ODD)
def test_expert_load_and_max_violation(T):
    rng = np.random.default_rng(T)
    E, K = 12, 3
    _, idx = random_routing(rng, 2, T, E, K)
    load = dsv3.ops.expert_load(idx, E)
    want = np.bincount(idx.ravel(), minlength=E)
    np.testing.assert_array_equal(load, want)
    assert load.dtype == np.int64 and load.sum() == 2 * T * K
    assert dsv3.ops.max_violation(load) == pytest.approx(want.max() / want.mean() - 1, rel=1e-12)
    assert dsv3.ops.max_violation(np.full(E, 7)) == 0.0
    assert dsv3.ops.max_violation(np.zeros(E, np.int64)) == 0.0
    with pytest.raises(IndexError, match="out of range"):
        dsv3.ops.expert_load(np.array([[0, 12]]), E)


def test_update_expert_bias_direction_and_magnitude():
    rng = np.random.default_rng(0)
    E, gamma = 10, 1e-3
    bias = rng.standard_normal(E).astype(np.float32)
    load = np.array([5, 0, 12, 7, 7, 9, 3, 7, 14, 6])  # mean 7: experts 3, 4, 7 sit at the mean
    before = bias.copy()
    new = dsv3.ops.update_expert_bias(bias, load, gamma)
    np.testing.assert_array_equal(bias, before)  # the input is not modified
    step = np.sign(load.mean() - load)
    np.testing.assert_array_equal(new, (bias + np.float32(gamma) * step.astype(np.float32)))
    assert np.all(new[load < 7] > bias[load < 7]) and np.all(new[load > 7] < bias[load > 7])
    assert np.array_equal(new[load == 7], bias[load == 7])
    # magnitude gamma, up to the rounding of the float32 add (half an ulp of the result)
    moved = load != 7
    err = np.abs(np.abs(new.astype(np.float64) - bias) - gamma)[moved]
    assert np.all(err <= np.spacing(np.abs(new[moved]))), err
    # gamma = 0 ("none") leaves the bias; noncontiguous input works
    np.testing.assert_array_equal(dsv3.ops.update_expert_bias(noncontig(bias[None])[0], load, 0.0), bias)
    with pytest.raises(ValueError, match="load"):
        dsv3.ops.update_expert_bias(bias, load[:-1], gamma)
    with pytest.raises(ValueError, match="gamma"):
        dsv3.ops.update_expert_bias(bias, load, -1.0)
    with pytest.raises(TypeError, match="load must be an integer"):
        dsv3.ops.update_expert_bias(bias, load.astype(np.float32), gamma)
    with pytest.raises(TypeError, match="bias must be a float32"):
        dsv3.ops.update_expert_bias(bias.astype(np.float64), load, gamma)


def test_aux_free_balancing_lowers_max_violation():
    """A gate whose weights favour some experts (logits tilted along the tokens' mean
    direction) starts badly imbalanced; routing with the bias and updating it after every step
    (gamma 0.01, 1024 fresh tokens per step) brings MaxVio down. gamma = 0 keeps it high."""
    cfg = moe_cfg(n_routed_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2,
                  hidden_size=32)
    E, D = 16, 32

    def run(gamma, steps=80):
        rng = np.random.default_rng(0)
        m = rng.standard_normal(D)
        m /= np.linalg.norm(m)
        W = (rng.standard_normal((E, D)) * 0.3 / np.sqrt(D)
             + np.linspace(-1, 1.5, E)[:, None] * m[None, :]).astype(np.float32)
        b = np.zeros(E, np.float32)
        hist, first_load = [], None
        for _ in range(steps):
            x = (rng.standard_normal((1024, D)) + 2 * m).astype(np.float32)
            idx, _ = dsv3.ops.moe_gate(x, W, b, cfg)
            load = dsv3.ops.expert_load(idx, E)
            first_load = load if first_load is None else first_load
            hist.append(dsv3.ops.max_violation(load))
            b = dsv3.ops.update_expert_bias(b, load, gamma)
        return np.array(hist), b, first_load

    hist, b, load0 = run(0.01)
    assert hist[0] > 4.0, f"the run should start imbalanced, MaxVio {hist[0]:.2f}"
    first, last = hist[:10].mean(), hist[-10:].mean()
    assert last < 0.25 * first and hist[-10:].max() < 1.0, (
        f"MaxVio did not come down: first 10 steps {first:.2f}, last 10 {last:.2f}")
    # the most loaded expert at the start ended with a lower bias than the least loaded one
    assert b[np.argmax(load0)] < b[np.argmin(load0)]
    hist0, b0, _ = run(0.0)
    assert hist0[-10:].mean() > 5.0 and not b0.any()


# ----------------------------------------------------------------------------- balance loss
CASES = [(B, T, E, K, sm) for (B, T) in [(1, t) for t in SIZES_ODD] + [(3, 33)]
         for (E, K, sm) in ((8, 2, False), (16, 6, True))]


@pytest.mark.parametrize("B,T,E,K,softmax", CASES)
def test_balance_loss_value_and_gradient(B, T, E, K, softmax):
    torch = get_torch()
    rng = np.random.default_rng(B * 1000 + T + E)
    s, idx = random_routing(rng, B, T, E, K, softmax)
    alpha = 0.01
    scores = s if B > 1 else s[0]
    tidx = idx if B > 1 else idx[0]
    L, ds = dsv3.ops.moe_balance_loss(scores, tidx, alpha)
    assert L == pytest.approx(ref_balance_loss(s, idx, alpha, E), rel=1e-10)
    assert ds.shape == scores.shape and ds.dtype == np.float32
    st = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    total = 0.0
    for b in range(B):
        f = torch.tensor(E / (K * T) * np.bincount(idx[b].ravel(), minlength=E), dtype=torch.float64)
        total = total + alpha * (f * (st[b] / st[b].sum(-1, keepdim=True)).mean(0)).sum()
    (total / B).backward()
    want = st.grad.numpy().reshape(scores.shape)
    np.testing.assert_allclose(ds, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_balance_loss_finite_differences(rng):
    s, idx = random_routing(np.random.default_rng(5), 2, 31, 8, 2)
    L, ds = dsv3.ops.moe_balance_loss(s, idx, 1.0)
    fd_check("balance", lambda ss: dsv3.ops.moe_balance_loss(ss, idx, 1.0)[0], [s], [ds], rng)


def test_balanced_router_loss_is_alpha():
    """f_i = 1 (every expert chosen equally often) and uniform s' give sum_i f_i P_i = 1."""
    E, K, T = 8, 2, 32
    idx = np.array([[(2 * t) % E, (2 * t + 1) % E] for t in range(T)])
    s = np.full((T, E), 0.3, np.float32)
    L, ds = dsv3.ops.moe_balance_loss(s, idx, 0.25)
    assert L == pytest.approx(0.25, rel=1e-12)
    # uniform scores are a stationary point along every direction that keeps them uniform
    np.testing.assert_allclose(ds.sum(-1), 0.0, atol=1e-9)


def test_layer_reports_the_balance_loss():
    cfg = moe_cfg(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                  hidden_size=16, moe_intermediate_size=8)
    params = dsv3.ops.init_moe_params(cfg, seed=1, std=0.3)
    x = np.random.default_rng(2).standard_normal((3, 31, 16)).astype(np.float32)
    _, aux = dsv3.ops.moe_forward(x, params, cfg, balance_alpha=0.01)
    want = ref_balance_loss(aux["scores"].astype(np.float64), aux["topk_idx"], 0.01, 8)
    assert aux["balance_loss"] == pytest.approx(want, rel=1e-10)
    assert aux["balance_loss"] == pytest.approx(
        dsv3.ops.moe_balance_loss(aux["scores"], aux["topk_idx"], 0.01)[0], rel=1e-12)


def test_balance_bad_input():
    s, idx = random_routing(np.random.default_rng(0), 1, 9, 8, 2)
    with pytest.raises(ValueError, match="topk_idx must have shape"):
        dsv3.ops.moe_balance_loss(s[0], idx[0, :-1], 0.1)
    with pytest.raises(ValueError, match="topk_idx must have the rank of scores"):
        dsv3.ops.moe_balance_loss(s[0], idx, 0.1)
    sn = s[0].copy()
    sn[1, 1] = np.nan
    with pytest.raises(ValueError, match="scores must be finite"):
        dsv3.ops.moe_balance_loss(sn, idx[0], 0.1)
    with pytest.raises(ValueError, match=r"K = 9\) must be in \[1, n_routed_experts = 8\]"):
        dsv3.ops.moe_balance_loss(s[0], np.zeros((9, 9), np.int64), 0.1)
    with pytest.raises(IndexError, match="out of range"):
        dsv3.ops.moe_balance_loss(s[0], idx[0] + 7, 0.1)
    with pytest.raises(ValueError, match="alpha"):
        dsv3.ops.moe_balance_loss(s[0], idx[0], float("nan"))
