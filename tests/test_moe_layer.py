"""The MoE layer (dsv3.ops.moe_forward / moe_backward) vs float64 references.

- Forward vs a dense float64 reference that runs every expert on every token (dsv3.reference.moe).
  Tolerance TOL["fp32"] scaled to the output: rtol 1e-5, atol 1e-5 * max|y| -- three chained
  fp32 GEMMs over D, F <= 64 terms plus the weighted sum of K+1 expert outputs.
- Every gradient vs PyTorch float64 autograd with the routing fixed to the kernel's (checked
  equal to the reference's first). Tolerance rtol 2e-5, atol 2e-5 * max|grad| (TOL
  "fp32_grad" relative to the gradient's scale: one more GEMM/reduction than the forward, and
  the gate weight's gradient is a sum over all tokens of differences of products).
- Finite differences through the fp32 kernel (conftest.fd_check), on tokens whose routing
  margins are far larger than the perturbation; the loss asserts the routing did not move.
"""
from __future__ import annotations

import types
from typing import Dict

import numpy as np
import pytest

import dsv3
from conftest import SIZES_ODD, fd_check, get_torch, noncontig, readonly
from dsv3.reference.moe import decision_margins, moe_cfg, ref_gate, ref_moe_forward, torch_moe_grads

LAYERS = {
    "v3": dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
               n_shared_experts=1),
    "v3_shared2": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                       n_shared_experts=2),
    "v2_greedy": dict(n_routed_experts=8, num_experts_per_tok=3, n_group=1, topk_group=1,
                      topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                      routed_scaling_factor=1.0, n_shared_experts=2),
    "group_limited_noshared": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4,
                                   topk_group=2, topk_method="group_limited_greedy",
                                   scoring_func="softmax", norm_topk_prob=False,
                                   routed_scaling_factor=16.0, n_shared_experts=0),
    "k1": dict(n_routed_experts=4, num_experts_per_tok=1, n_group=1, topk_group=1,
               topk_method="greedy", scoring_func="sigmoid", norm_topk_prob=False,
               routed_scaling_factor=1.5, n_shared_experts=1),
}
D, F = 24, 8


def layer_cfg(name: str, **extra) -> dsv3.Config:
    kw = dict(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
              routed_scaling_factor=2.5, hidden_size=D, moe_intermediate_size=F)
    kw.update(LAYERS[name])
    kw.update(extra)
    return moe_cfg(**kw)


def make_params(cfg, seed: int, bias_scale: float = 0.1) -> Dict[str, np.ndarray]:
    """Weights ~ N(0, 1/fan_in) (activations O(1)); a random correction bias."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in dsv3.ops.moe_param_shapes(cfg).items():
        if name == "gate.e_score_correction_bias":
            out[name] = (rng.standard_normal(shape) * bias_scale).astype(np.float32)
        else:
            out[name] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    return out


def assert_scaled(name, got, want, rtol, scale_tol):
    """|got - want| <= rtol |want| + scale_tol * max|want| (floor 1e-6: a gradient that is
    zero up to rounding, e.g. the gate's with K = 1 and norm_topk_prob, compares absolutely)."""
    want = np.asarray(want, np.float64)
    atol = scale_tol * max(float(np.max(np.abs(want), initial=0.0)), 1e-6)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)


def bias_of(params):
    return params.get("gate.e_score_correction_bias")


# ----------------------------------------------------------------------------- forward
FWD = [(n, shape) for n in LAYERS for shape in [(T,) for T in SIZES_ODD] + [(2, 33)]]


@pytest.mark.parametrize("name,shape", FWD)
def test_forward_matches_dense_reference(name, shape):
    cfg = layer_cfg(name)
    params = make_params(cfg, seed=len(name) * 100 + shape[-1])
    rng = np.random.default_rng(shape[-1])
    x = rng.standard_normal(shape + (D,)).astype(np.float32)
    y, aux = dsv3.ops.moe_forward(x, params, cfg)
    ridx, rw, s = ref_gate(x, params["gate.weight"], bias_of(params), cfg)
    K, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_array_equal(aux["topk_idx"].reshape(-1, K), ridx, err_msg=name)
    np.testing.assert_allclose(aux["topk_weight"].reshape(-1, K), rw, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(aux["scores"].reshape(-1, E), s, rtol=1e-6, atol=1e-7)
    want = ref_moe_forward(x, params, cfg, ridx, rw).reshape(x.shape)
    assert_scaled(f"{name} {shape} y", y, want, 1e-5, 1e-5)
    load = np.bincount(ridx.ravel(), minlength=E)
    np.testing.assert_array_equal(aux["expert_load"], load)
    assert aux["max_violation"] == pytest.approx(load.max() / load.mean() - 1, rel=1e-12)
    assert aux["balance_loss"] == 0.0


def identity_experts(cfg, Dx: int, scale_by_expert: bool):
    """Experts that return their input (times e+1 if scale_by_expert): x carries a constant 1
    in its last channel, gate_proj reads 20 * that channel (silu(20) = 20 in fp32), up_proj = I,
    down_proj = I / 20. No shared expert."""
    E = cfg.n_routed_experts
    params = {"gate.weight": np.random.default_rng(5).standard_normal((E, Dx)).astype(np.float32)}
    if cfg.topk_method == "noaux_tc":
        params["gate.e_score_correction_bias"] = np.zeros(E, np.float32)
    g = np.zeros((Dx, Dx), np.float32)
    g[:, -1] = 20.0
    for e in range(E):
        c = (e + 1) if scale_by_expert else 1
        params[f"experts.{e}.gate_proj.weight"] = g
        params[f"experts.{e}.up_proj.weight"] = np.eye(Dx, dtype=np.float32)
        params[f"experts.{e}.down_proj.weight"] = np.eye(Dx, dtype=np.float32) * np.float32(c / 20)
    return params


@pytest.mark.parametrize("T", SIZES_ODD)
@pytest.mark.parametrize("name", ["v3", "v2_greedy"])
def test_dispatch_combine_identity_experts(name, T):
    Dx = 16
    cfg = layer_cfg(name, hidden_size=Dx, moe_intermediate_size=Dx, n_shared_experts=0)
    rng = np.random.default_rng(T)
    x = rng.standard_normal((T, Dx)).astype(np.float32)
    x[:, -1] = 1.0
    y, aux = dsv3.ops.moe_forward(x, identity_experts(cfg, Dx, False), cfg)
    wsum = aux["topk_weight"].astype(np.float64).sum(-1)
    np.testing.assert_allclose(y, x * wsum[:, None], rtol=1e-6, atol=1e-6)
    # Expert e scales by e+1: checks each weight is paired with its own expert's output.
    y2, aux2 = dsv3.ops.moe_forward(x, identity_experts(cfg, Dx, True), cfg)
    coef = (aux2["topk_weight"] * (aux2["topk_idx"] + 1)).astype(np.float64).sum(-1)
    np.testing.assert_allclose(y2, x * coef[:, None], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("K,n_shared", [(2, 1), (1, 0)])
def test_all_tokens_on_one_expert(K, n_shared):
    """A bias that dwarfs the scores sends every token to the same experts: the load is as
    unbalanced as it gets and the other experts are empty. With K = 1 and no shared expert
    one item holds all rows, so (with 2+ threads) it runs alone with threaded BLAS.
    Forward and every gradient."""
    cfg = layer_cfg("v3", n_group=1, topk_group=1, num_experts_per_tok=K,
                    n_shared_experts=n_shared)
    params = make_params(cfg, seed=1)
    params["gate.e_score_correction_bias"] = np.zeros(16, np.float32)
    params["gate.e_score_correction_bias"][[5, 9]] = [10.0, 5.0]
    x = np.random.default_rng(2).standard_normal((129, D)).astype(np.float32)
    y, aux = dsv3.ops.moe_forward(x, params, cfg)
    assert np.all(aux["topk_idx"] == [5, 9][:K])
    assert aux["max_violation"] == pytest.approx(16 / K - 1)
    ridx, rw, _ = ref_gate(x, params["gate.weight"], bias_of(params), cfg)
    assert_scaled("y", y, ref_moe_forward(x, params, cfg, ridx, rw), 1e-5, 1e-5)
    dy = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    dx, grads = dsv3.ops.moe_backward(dy, x, params, cfg)
    _, tdx, tgrads = torch_moe_grads(get_torch(), x, params, cfg, aux["topk_idx"], dy)
    assert_scaled("dx", dx, tdx, 2e-5, 2e-5)
    for k, g in grads.items():
        assert_scaled(f"d{k}", g, tgrads[k], 2e-5, 2e-5)
    if K == 1:  # w = s / (s + 1e-20) * rsf is constant: the gate gets no gradient
        assert np.max(np.abs(grads["gate.weight"])) < 1e-12


def test_deterministic_and_thread_count():
    cfg = layer_cfg("v3")
    params = make_params(cfg, seed=3)
    x = np.random.default_rng(4).standard_normal((129, D)).astype(np.float32)
    dy = np.random.default_rng(5).standard_normal((129, D)).astype(np.float32)
    y1, _ = dsv3.ops.moe_forward(x, params, cfg)
    y2, _ = dsv3.ops.moe_forward(x, params, cfg)
    dx1, g1 = dsv3.ops.moe_backward(dy, x, params, cfg, balance_alpha=0.01)
    dx2, g2 = dsv3.ops.moe_backward(dy, x, params, cfg, balance_alpha=0.01)
    assert np.array_equal(y1, y2) and np.array_equal(dx1, dx2)
    assert all(np.array_equal(g1[k], g2[k]) for k in g1)
    n = dsv3.get_num_threads()
    try:
        dsv3.set_num_threads(1)
        y1t, _ = dsv3.ops.moe_forward(x, params, cfg)
        dx1t, g1t = dsv3.ops.moe_backward(dy, x, params, cfg, balance_alpha=0.01)
    finally:
        dsv3.set_num_threads(n)
    assert_scaled("y 1 thread", y1t, y1, 1e-5, 1e-6)
    assert_scaled("dx 1 thread", dx1t, dx1, 1e-5, 1e-6)
    for k in g1:
        assert_scaled(f"{k} 1 thread", g1t[k], g1[k], 1e-5, 1e-6)


# ---------------------------------------------------------------------------- backward
GRAD = [(n, shape, alpha) for n in LAYERS for shape, alpha in (((1, D), 0.0), ((33, D), 0.0),
                                                                ((2, 31, D), 0.05))]


@pytest.mark.parametrize("name,shape,alpha", GRAD)
def test_gradients_vs_torch_autograd(name, shape, alpha):
    torch = get_torch()
    cfg = layer_cfg(name)
    params = make_params(cfg, seed=11 + shape[-2])
    rng = np.random.default_rng(12)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    _, aux = dsv3.ops.moe_forward(x, params, cfg, balance_alpha=alpha)
    idx = aux["topk_idx"]
    ridx, _, _ = ref_gate(x, params["gate.weight"], bias_of(params), cfg)
    np.testing.assert_array_equal(idx.reshape(ridx.shape), ridx)
    dx, grads = dsv3.ops.moe_backward(dy, x, params, cfg, balance_alpha=alpha)
    L, tdx, tgrads = torch_moe_grads(torch, x, params, cfg, idx, dy, alpha)
    assert set(grads) == set(params) - {"gate.e_score_correction_bias"}
    assert_scaled(f"{name} dx", dx, tdx, 2e-5, 2e-5)
    for k, g in grads.items():
        assert g.shape == params[k].shape and g.dtype == np.float32
        assert_scaled(f"{name} {shape} d{k}", g, tgrads[k], 2e-5, 2e-5)
    # experts without tokens get exactly zero gradient
    load = np.bincount(idx.ravel(), minlength=cfg.n_routed_experts)
    for e in np.nonzero(load == 0)[0]:
        assert not np.any(grads[f"experts.{e}.down_proj.weight"])
    if alpha:  # the balance loss alone reaches the gate weight
        _, g0 = dsv3.ops.moe_backward(np.zeros_like(dy), x, params, cfg, balance_alpha=alpha)
        _, _, t0 = torch_moe_grads(torch, x, params, cfg, idx, np.zeros_like(dy), alpha)
        assert np.any(g0["gate.weight"])
        assert_scaled(f"{name} balance-only dgate", g0["gate.weight"], t0["gate.weight"], 2e-5, 2e-5)


def separated_tokens(cfg, params, n, margin, seed):
    """n tokens whose float64 routing margins all exceed `margin` (data selection)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((40 * n, D)).astype(np.float32)
    m = decision_margins(x, params["gate.weight"], bias_of(params), cfg)
    keep = np.nonzero(m > margin)[0][:n]
    assert len(keep) == n, f"only {len(keep)} well-separated tokens"
    return x[keep]


@pytest.mark.parametrize("name", list(LAYERS))
def test_gradients_vs_finite_differences(name, rng):
    cfg = layer_cfg(name)
    params = make_params(cfg, seed=21)
    x = separated_tokens(cfg, params, 9, margin=0.03, seed=22)
    R = np.random.default_rng(23).standard_normal(x.shape)
    alpha = 0.05
    base_idx = dsv3.ops.moe_forward(x, params, cfg)[1]["topk_idx"]
    busy = int(np.bincount(base_idx.ravel()).argmax())
    proj = ("gate_proj", "up_proj", "down_proj")
    names = ["gate.weight"] + [f"experts.{busy}.{m}.weight" for m in proj]
    if cfg.n_shared_experts:
        names += [f"shared_experts.{m}.weight" for m in proj]

    def loss(xx, *ws):
        p = dict(params)
        p.update(zip(names, ws))
        y, a = dsv3.ops.moe_forward(xx, p, cfg, balance_alpha=alpha)
        assert np.array_equal(a["topk_idx"], base_idx), "routing moved under the perturbation"
        return float(np.sum(y.astype(np.float64) * R)) + a["balance_loss"]

    dx, grads = dsv3.ops.moe_backward(R.astype(np.float32), x, params, cfg, balance_alpha=alpha)
    fd_check(name, loss, [x] + [params[n] for n in names], [dx] + [grads[n] for n in names], rng,
             directions=2, rel_step=3e-3)


# --------------------------------------------------------------------------- contracts
def test_noncontiguous_readonly_and_shapes():
    cfg = layer_cfg("v3")
    params = make_params(cfg, seed=31)
    x = np.random.default_rng(32).standard_normal((2, 5, D)).astype(np.float32)
    y, aux = dsv3.ops.moe_forward(x, params, cfg)
    ro = {k: readonly(v) for k, v in params.items()}
    y2, _ = dsv3.ops.moe_forward(noncontig(x), ro, cfg)
    assert np.array_equal(y, y2)
    assert aux["topk_idx"].shape == (2, 5, 4) and aux["scores"].shape == (2, 5, 16)
    dx, g = dsv3.ops.moe_backward(noncontig(np.ones_like(x)), readonly(x), ro, cfg)
    assert dx.shape == x.shape
    y0, aux0 = dsv3.ops.moe_forward(np.zeros((0, D), np.float32), params, cfg)
    assert y0.shape == (0, D) and not aux0["expert_load"].any()


def test_layer_bad_input():
    cfg = layer_cfg("v3")
    params = make_params(cfg, seed=41)
    x = np.random.default_rng(42).standard_normal((6, D)).astype(np.float32)
    fwd = dsv3.ops.moe_forward
    p = dict(params)
    del p["experts.3.up_proj.weight"]
    with pytest.raises(ValueError, match="missing: experts.3.up_proj.weight"):
        fwd(x, p, cfg)
    with pytest.raises(ValueError, match="unexpected: experts.16.up_proj.weight"):
        fwd(x, {**params, "experts.16.up_proj.weight": params["experts.0.up_proj.weight"]}, cfg)
    with pytest.raises(ValueError, match=r"experts.2.down_proj.weight must have shape \(24, 8\)"):
        fwd(x, {**params, "experts.2.down_proj.weight": params["experts.2.gate_proj.weight"]}, cfg)
    with pytest.raises(ValueError, match=r"gate.e_score_correction_bias must have shape \(16,\)"):
        fwd(x, {**params, "gate.e_score_correction_bias": np.zeros(15, np.float32)}, cfg)
    with pytest.raises(TypeError, match="shared_experts.gate_proj.weight must be a float32"):
        fwd(x, {**params, "shared_experts.gate_proj.weight":
                params["shared_experts.gate_proj.weight"].astype(np.float64)}, cfg)
    with pytest.raises(ValueError, match=r"x .* must have 2 to 3 dimensions"):
        fwd(x[0], params, cfg)
    xn = x.copy()
    xn[2, 5] = np.nan
    with pytest.raises(ValueError, match=r"\[moe_forward\] x must be finite"):
        fwd(xn, params, cfg)
    with pytest.raises(ValueError, match=r"\[moe_backward\] x must be finite"):
        dsv3.ops.moe_backward(np.ones_like(x), xn, params, cfg)
    with pytest.raises(ValueError, match="dy must have the shape of x"):
        dsv3.ops.moe_backward(np.ones((5, D), np.float32), x, params, cfg)
    with pytest.raises(ValueError, match="balance_alpha"):
        fwd(x, params, cfg, balance_alpha=-1.0)
    bad = types.SimpleNamespace(**{**cfg.to_dict(), "num_experts_per_tok": 17})
    with pytest.raises(ValueError, match=r"\[moe_forward\] num_experts_per_tok"):
        fwd(x, params, bad)


DECODE_PASS_SCRIPT = r"""
import numpy as np, dsv3
cfg = dsv3.Config.tiny()
base = dsv3.Model(cfg, seed=3)
# bf16-resident copy of every expert / projection matrix (bits rounded here, RNE)
weights = {}
for name, w in base.state_dict().items():
    if name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight", "o_proj.weight")):
        u = w.view(np.uint32).astype(np.uint64)
        weights[name] = ("bf16", ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16), None)
    else:
        weights[name] = w
models = {"fp32": base, "bf16": dsv3.Model._from_resident(cfg, weights)}
ids = np.random.default_rng(0).integers(2, cfg.vocab_size, size=(2, 12))
out = {}
for tag, m in models.items():
    cache = m.new_cache(2, 32)
    out[tag + "_prefill"] = m.forward(ids[:, :6], cache, 0)
    out[tag + "_one"] = m.forward(ids[:, 6:7], cache, 6)      # one token per sequence
    out[tag + "_three"] = m.forward(ids[:, 7:10], cache, 7)   # a verification-sized chunk
np.savez(OUT, **out)
"""


def test_decode_moe_pass_equals_expert_by_expert(tmp_path):
    """Decoding's MoE runs every expert's GEMVs of a step as one parallel pass (moe.cpp
    run_experts_gemv); DSV3_MOE_DECODE_PASS=0 runs the same products expert by expert
    (moe_run_experts' general path). Same kernels per matrix, so the logits are bit-identical,
    for fp32 and bf16-resident experts, 1- and 3-token steps."""
    import os
    import subprocess
    import sys
    res = {}
    for tag, env in (("pass", {}), ("by_expert", {"DSV3_MOE_DECODE_PASS": "0"})):
        path = tmp_path / f"{tag}.npz"
        subprocess.run([sys.executable, "-c", f"OUT = {str(path)!r}\n" + DECODE_PASS_SCRIPT],
                       env=dict(os.environ, **env), check=True)
        with np.load(path) as z:
            res[tag] = dict(z)
    assert set(res["pass"]) == set(res["by_expert"])
    for key, x in res["by_expert"].items():
        assert np.isfinite(x).all(), key
        assert np.array_equal(res["pass"][key], x), key
