"""dsv3.ops.moe_gate vs the float64 reference of semantics §2.3 (dsv3.reference.moe).

Tolerances: indices must be identical. Weights within 1e-6 absolute + 1e-6 relative: the
C++ computes s in fp32 (expf with < 2 ulp error, one division), then one division by the sum
and one multiplication by routed_scaling_factor -- a few fp32 ulps (6e-8 relative each) of
values <= routed_scaling_factor.
Exact ties: inputs are dyadic (x in k/4, W in k/16, bias in k/64), so the logits are exact in
fp32 and float64 and equal logits give bit-equal scores in both; ties are planted by copying
expert rows, whole groups and zero tokens.
"""
from __future__ import annotations

import types
import zlib

import numpy as np
import pytest

import dsv3
from conftest import SIZES_ODD, noncontig, readonly
from dsv3.reference.moe import decision_margins, grouped, moe_cfg, ref_gate

W_RTOL, W_ATOL = 1e-6, 1e-6

CASES = {
    # DeepSeek-V3 style: sigmoid + correction bias, top-2-sum group scores
    "noaux_g1": dict(n_routed_experts=16, num_experts_per_tok=4, n_group=1, topk_group=1),
    "noaux_g4_k2": dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2),
    "noaux_g8_k4": dict(n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4),
    "noaux_g4_all": dict(n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=4),
    "noaux_k1": dict(n_routed_experts=8, num_experts_per_tok=1, n_group=4, topk_group=1),
    "noaux_softmax_nonorm": dict(n_routed_experts=12, num_experts_per_tok=3, n_group=3,
                                 topk_group=2, scoring_func="softmax", norm_topk_prob=False,
                                 routed_scaling_factor=1.0),
    # DeepSeek-V2 style: softmax, no bias
    "greedy": dict(n_routed_experts=16, num_experts_per_tok=6, n_group=1, topk_group=1,
                   topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                   routed_scaling_factor=1.0),
    "greedy_norm_groups_ignored": dict(n_routed_experts=16, num_experts_per_tok=3, n_group=4,
                                       topk_group=2, topk_method="greedy",
                                       scoring_func="softmax", norm_topk_prob=True),
    "group_limited": dict(n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
                          topk_method="group_limited_greedy", scoring_func="softmax",
                          norm_topk_prob=False, routed_scaling_factor=16.0),
}


def case_cfg(name: str) -> dsv3.Config:
    kw = dict(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
              routed_scaling_factor=2.5)
    kw.update(CASES[name])
    return moe_cfg(**kw)


def dyadic_inputs(rng, T, D, cfg, bias_mode):
    """x, W, bias with exact ties planted (see module docstring)."""
    E = cfg.n_routed_experts
    x = (rng.integers(-4, 5, size=(T, D)) / 4).astype(np.float32)
    W = (rng.integers(-4, 5, size=(E, D)) / 16).astype(np.float32)
    b = (rng.integers(-8, 9, size=E) / 64).astype(np.float32)
    W[1] = W[0]                      # tie inside group 0
    b[1] = b[0]
    if E >= 8:
        W[E - 1] = W[2]              # tie across groups
        b[E - 1] = b[2]
    if grouped(cfg):
        per = E // cfg.n_group
        W[per:2 * per] = W[:per]     # group 1 is a copy of group 0: tied group scores
        b[per:2 * per] = b[:per]
    x[0] = 0.0                       # every logit 0: every score tied
    if T > 2:
        x[T // 2] = x[1]             # two identical tokens
    if bias_mode is None:
        return x, W, None
    return x, W, (np.zeros(E, np.float32) if bias_mode == "zero" else b)


def bias_modes(cfg):
    return ["zero", "random"] if cfg.topk_method == "noaux_tc" else [None]


PARAMS = [(name, T, bm) for name in CASES for T in SIZES_ODD for bm in bias_modes(case_cfg(name))]


@pytest.mark.parametrize("name,T,bias_mode", PARAMS)
def test_gate_matches_reference_with_ties(name, T, bias_mode):
    cfg = case_cfg(name)
    rng = np.random.default_rng(zlib.crc32(f"{name}/{T}/{bias_mode}".encode()))
    x, W, b = dyadic_inputs(rng, T, 32, cfg, bias_mode)
    idx, w = dsv3.ops.moe_gate(x, W, b, cfg)
    ridx, rw, _ = ref_gate(x, W, b, cfg)
    assert idx.dtype == np.int64 and w.dtype == np.float32
    assert idx.shape == w.shape == (T, cfg.num_experts_per_tok)
    bad = np.nonzero(np.any(idx != ridx, axis=-1))[0]
    assert bad.size == 0, (f"{name} T={T} bias={bias_mode}: indices differ at tokens "
                           f"{bad[:5]}: got {idx[bad[:3]]} want {ridx[bad[:3]]}")
    np.testing.assert_allclose(w, rw, rtol=W_RTOL, atol=W_ATOL, err_msg=f"{name} T={T}")


@pytest.mark.parametrize("name", ["noaux_g4_k2", "noaux_g8_k4", "noaux_g1", "greedy",
                                  "group_limited"])
def test_all_tied_token_picks_lowest_indices(name):
    """x = 0 ties every score (and with zero bias every group): the tie rule of semantics §2.3 then picks the
    first topk_group groups and, inside them, the lowest expert indices, in order."""
    cfg = case_cfg(name)
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    x = np.zeros((3, 16), np.float32)
    W = np.random.default_rng(0).standard_normal((E, 16)).astype(np.float32)
    b = np.zeros(E, np.float32) if cfg.topk_method == "noaux_tc" else None
    idx, w = dsv3.ops.moe_gate(x, W, b, cfg)
    np.testing.assert_array_equal(idx, np.tile(np.arange(K), (3, 1)))
    s = 0.5 if cfg.scoring_func == "sigmoid" else 1.0 / E
    want = (1.0 / K if cfg.norm_topk_prob else s) * cfg.routed_scaling_factor
    np.testing.assert_allclose(w, np.full((3, K), want), rtol=W_RTOL, atol=W_ATOL)


@pytest.mark.parametrize("name", ["noaux_g8_k4", "noaux_g4_k2", "greedy", "group_limited"])
def test_gate_gaussian_inputs(name):
    """Real-valued inputs (logits rounded differently in fp32 and float64): indices must be
    identical wherever the float64 decision margins exceed 1e-5 (fp32 rounding of the logits
    is ~1e-6 here); at most 2% of tokens may fall below that margin."""
    cfg = case_cfg(name)
    rng = np.random.default_rng(7)
    T, D, E = 257, 64, cfg.n_routed_experts
    x = rng.standard_normal((T, D)).astype(np.float32)
    W = (rng.standard_normal((E, D)) * 0.2).astype(np.float32)
    b = (rng.standard_normal(E) * 0.05).astype(np.float32) if cfg.topk_method == "noaux_tc" else None
    idx, w = dsv3.ops.moe_gate(x, W, b, cfg)
    ridx, rw, _ = ref_gate(x, W, b, cfg)
    clear = decision_margins(x, W, b, cfg) > 1e-5
    assert clear.mean() >= 0.98, f"{name}: only {clear.mean():.3f} of tokens are well separated"
    np.testing.assert_array_equal(idx[clear], ridx[clear], err_msg=name)
    # weights use fp32 logits of non-dyadic data: ~1e-6 relative error on the logits
    np.testing.assert_allclose(w[clear], rw[clear], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("name", ["noaux_g1", "noaux_g4_k2", "noaux_g8_k4", "noaux_softmax_nonorm"])
def test_bias_changes_selection_not_weights(name):
    cfg = case_cfg(name)
    rng = np.random.default_rng(3)
    T, D, E, K = 129, 32, cfg.n_routed_experts, cfg.num_experts_per_tok
    x = (rng.integers(-4, 5, size=(T, D)) / 4).astype(np.float32)
    W = (rng.integers(-4, 5, size=(E, D)) / 16).astype(np.float32)
    b0 = np.zeros(E, np.float32)
    b1 = (rng.integers(-8, 9, size=E) / 128).astype(np.float32)
    i0, w0 = dsv3.ops.moe_gate(x, W, b0, cfg)
    i1, w1 = dsv3.ops.moe_gate(x, W, b1, cfg)
    changed = np.any(np.sort(i0, -1) != np.sort(i1, -1), axis=-1)
    assert changed.mean() > 0.1, "a bias of +-1/16 should change many selections"
    # The weights of a selection never depend on the bias: rebuilt from the UNBIASED scores.
    _, _, s = ref_gate(x, W, None, cfg)
    for idx, w in ((i0, w0), (i1, w1)):
        want = np.take_along_axis(s, idx, -1)
        if cfg.norm_topk_prob:
            want = want / (want.sum(-1, keepdims=True) + 1e-20)
        np.testing.assert_allclose(w, want * cfg.routed_scaling_factor, rtol=W_RTOL, atol=W_ATOL)
    # Same selected set -> same weight per expert (the order may differ).
    same = ~changed
    assert same.any()
    o0, o1 = np.argsort(i0[same], -1), np.argsort(i1[same], -1)
    np.testing.assert_allclose(np.take_along_axis(w0[same], o0, -1),
                               np.take_along_axis(w1[same], o1, -1), rtol=W_RTOL, atol=W_ATOL)


def test_batched_noncontiguous_readonly_inputs():
    cfg = case_cfg("noaux_g4_k2")
    rng = np.random.default_rng(11)
    x, W, b = dyadic_inputs(rng, 2 * 33, 16, cfg, "random")
    idx, w = dsv3.ops.moe_gate(x, W, b, cfg)
    i3, w3 = dsv3.ops.moe_gate(noncontig(x.reshape(2, 33, 16)), readonly(W), readonly(b), cfg)
    assert i3.shape == (2, 33, cfg.num_experts_per_tok)
    np.testing.assert_array_equal(i3.reshape(idx.shape), idx)
    np.testing.assert_array_equal(w3.reshape(w.shape), w)


# ------------------------------------------------------------------------------ bad input
def _inputs(cfg, T=5, D=8):
    rng = np.random.default_rng(0)
    E = cfg.n_routed_experts
    x = rng.standard_normal((T, D)).astype(np.float32)
    W = rng.standard_normal((E, D)).astype(np.float32)
    b = np.zeros(E, np.float32) if cfg.topk_method == "noaux_tc" else None
    return x, W, b


def test_bad_config_rejected_by_config_and_by_the_kernel():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        moe_cfg(n_routed_experts=4, num_experts_per_tok=5, n_group=1, topk_group=1)
    with pytest.raises(ValueError, match="n_group"):
        moe_cfg(n_routed_experts=10, n_group=4, topk_group=2)
    cfg = case_cfg("noaux_g4_k2")
    x, W, b = _inputs(cfg)
    # A Config mutated after validation (or any object with the fields) is checked in C++.
    for field, value, pattern in (("num_experts_per_tok", 17, "num_experts_per_tok"),
                                  ("n_group", 3, "n_group"),
                                  ("topk_group", 5, "topk_group"),
                                  ("num_experts_per_tok", 9, r"num_experts_per_tok \(9\) must be <= topk_group"),
                                  ("topk_method", "top1", "topk_method"),
                                  ("scoring_func", "relu", "scoring_func"),
                                  ("routed_scaling_factor", float("nan"), "routed_scaling_factor")):
        bad = types.SimpleNamespace(**{**cfg.to_dict(), field: value})
        with pytest.raises(ValueError, match=r"\[moe_gate\] " + pattern):
            dsv3.ops.moe_gate(x, W, b, bad)


def test_bad_arrays():
    cfg = case_cfg("noaux_g4_k2")
    x, W, b = _inputs(cfg)
    with pytest.raises(ValueError, match=r"bias \(n_routed_experts,\) must have shape \(16,\)"):
        dsv3.ops.moe_gate(x, W, b[:-1], cfg)
    with pytest.raises(ValueError, match="bias .*required"):
        dsv3.ops.moe_gate(x, W, None, cfg)
    with pytest.raises(ValueError, match="bias .*only defined for topk_method noaux_tc"):
        dsv3.ops.moe_gate(x, W, b, case_cfg("greedy"))
    with pytest.raises(ValueError, match=r"weight .*must have shape \(16, 8\)"):
        dsv3.ops.moe_gate(x, W[:, :-1], b, cfg)
    with pytest.raises(TypeError, match="x must be a float32"):
        dsv3.ops.moe_gate(x.astype(np.float64), W, b, cfg)
    with pytest.raises(TypeError, match="bias must be a float32"):
        dsv3.ops.moe_gate(x, W, [0.0] * 16, cfg)
    for bad_value in (np.nan, np.inf):
        xn = x.copy()
        xn[3, 2] = bad_value
        with pytest.raises(ValueError, match=r"\[moe_gate\] x must be finite"):
            dsv3.ops.moe_gate(xn, W, b, cfg)
    bn = b.copy()
    bn[0] = np.nan
    with pytest.raises(ValueError, match=r"\[moe_gate\] bias must be finite"):
        dsv3.ops.moe_gate(x, W, bn, cfg)
    # the gate scans its logits instead of its weight: a bad weight must still be named, also
    # where it meets a zero of x (inf * 0 = NaN), with no tokens (no logits to scan) and with
    # more than 16 tokens (the logits from sgemm, not the GEMV)
    xz = x.copy()
    xz[:, 1] = 0.0
    x20 = _inputs(cfg, T=20)[0]
    for bad_value in (np.nan, np.inf, -np.inf):
        Wn = W.copy()
        Wn[5, 1] = bad_value
        for xs in (x, xz, x[:0], x20):
            with pytest.raises(ValueError, match=r"\[moe_gate\] weight must be finite, found .* at flat index 41"):
                dsv3.ops.moe_gate(xs, Wn, b, cfg)
        # x is named before weight, as before the logit scan
        xn = x20.copy()
        xn[17, 3] = bad_value
        with pytest.raises(ValueError, match=r"\[moe_gate\] x must be finite, found .* at flat index 139"):
            dsv3.ops.moe_gate(xn, Wn, b, cfg)
    # finite inputs whose logits overflow are routed, as before the logit scan (not refused)
    xo, Wo = np.full_like(x, 1e20), np.full_like(W, 1e20)
    idx, w = dsv3.ops.moe_gate(xo, Wo, b, cfg)[:2]
    assert np.all((idx >= 0) & (idx < 16))
    with pytest.raises(TypeError, match="'num_experts_per_tok' is missing"):
        dsv3.ops.moe_gate(x, W, b, types.SimpleNamespace(n_routed_experts=16))
