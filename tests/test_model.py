"""The whole model (semantics §2.1-2.5): layout and names, forward vs the float64 reference, loss
parts, every named gradient vs autograd and finite differences, cached decoding, errors."""
import numpy as np
import pytest

import dsv3
from conftest import assert_close, get_torch
from hf_shapes import hf_shapes
from dsv3.reference.model import t_model

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}
VARIANTS = {
    "v3-sigmoid-groups-bias": dict(num_hidden_layers=4, first_k_dense_replace=2),
    "v2-softmax-greedy-noq": dict(topk_method="greedy", scoring_func="softmax", n_group=1,
                                  topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
                                  q_lora_rank=0, n_shared_experts=2),
    "yarn-group-limited": dict(rope_scaling=YARN, topk_method="group_limited_greedy",
                               scoring_func="softmax", norm_topk_prob=False),
    "gqa-tied-2mtp": dict(attention_type="gqa", num_key_value_heads=2, tie_word_embeddings=True,
                          num_nextn_predict_layers=2),
    "dense-mha": dict(n_routed_experts=None, attention_type="mha"),
}


def make(name, seed=0, bias_scale=0.05):
    cfg = dsv3.Config.tiny().replace(**VARIANTS[name])
    m = dsv3.Model(cfg, seed=seed)
    rng = np.random.default_rng(seed + 1)
    sd = m.state_dict()
    for k in sd:  # non-trivial norms and biases so that every path is exercised
        if k.endswith("norm.weight") or k.endswith("layernorm.weight"):
            sd[k] = (1 + 0.2 * rng.standard_normal(sd[k].shape)).astype(np.float32)
        if k.endswith("e_score_correction_bias"):
            sd[k] = (bias_scale * rng.standard_normal(sd[k].shape)).astype(np.float32)
        if k.endswith("gate.weight") and "mlp" in k:
            sd[k] = (0.3 * rng.standard_normal(sd[k].shape)).astype(np.float32)
    m.load_state_dict(sd)
    return cfg, m, sd


def torch_params(torch, sd):
    return {k: torch.tensor(v.astype(np.float64), requires_grad=not k.endswith("bias"))
            for k, v in sd.items()}


def test_layout_names_shapes_and_counts():
    for name in VARIANTS:
        cfg, m, sd = make(name)
        want = hf_shapes(cfg, mtp=True)
        assert {k: v.shape for k, v in sd.items()} == want, name
        assert m.num_parameters() == cfg.num_parameters(mtp=True) == sum(v.size for v in sd.values())
        assert m._m.num_parameters == m.num_parameters()
    cfg, m, sd = make("v3-sigmoid-groups-bias")
    assert "model.layers.4.eh_proj.weight" in sd and "model.layers.4.mlp.gate.e_score_correction_bias" in sd
    assert np.all(dsv3.Model(cfg, seed=3).state_dict()["model.layers.2.mlp.gate.e_score_correction_bias"] == 0)


def test_init_statistics_and_seed():
    cfg = dsv3.Config.small()
    a, b = dsv3.Model(cfg, seed=1).state_dict(), dsv3.Model(cfg, seed=1).state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    w = a["model.layers.1.mlp.experts.3.up_proj.weight"]
    assert abs(w.std() - cfg.initializer_range) < 0.002 and abs(w.mean()) < 0.002
    assert np.all(a["model.norm.weight"] == 1)
    c = dsv3.Model(cfg, seed=2).state_dict()
    assert not np.array_equal(a["lm_head.weight"], c["lm_head.weight"])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_and_losses_vs_reference(name):
    torch = get_torch()
    cfg, m, sd = make(name)
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 11))
    logits = m.forward(tokens[:, :-1])
    alpha = 0.05
    ref = t_model(torch, torch_params(torch, sd), cfg, tokens, alpha=alpha)
    err = np.max(np.abs(logits - ref["logits"].detach().numpy()))
    assert err <= 1e-4, f"{name}: max |dlogit| {err:.2e}"
    got = m.loss(tokens, alpha=alpha)
    for part in ("main", "mtp", "balance", "loss"):
        assert_close(f"{name} {part}", got[part], ref[part].item(), "fp32_reduce")
    assert m.forward(tokens[0, :-1]).shape == (10, cfg.vocab_size)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_gradient_vs_autograd(name):
    torch = get_torch()
    cfg, m, sd = make(name)
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(2, 9))
    P = torch_params(torch, sd)
    ref = t_model(torch, P, cfg, tokens, alpha=0.05)
    ref["loss"].backward()
    losses, grads = m.loss_and_grad(tokens, alpha=0.05)
    assert set(grads) == {k for k in sd if not k.endswith("e_score_correction_bias")}
    for k, g in grads.items():
        want = P[k].grad.numpy() if P[k].grad is not None else np.zeros_like(g)
        scale = max(np.abs(want).max(), 1e-3)
        assert_close(f"{name} d{k}", g, want, rtol=1e-4, atol=2e-5 * scale)


FD_RTOL = 1e-4   # of |g| per direction (the fp32 gradients measure ~1e-6 of it); see fd_rejections


@pytest.fixture(scope="module")
def fd_table():
    """The C++ gradients of a model that routes every token to every expert (routing is
    piecewise constant; with all experts selected the set cannot change under a step), and for
    each named parameter three random directions v with the central difference of the FLOAT64
    reference loss along each, (L(x+hv) - L(x-hv)) / 2h with h = 1e-4 * rms(x): truncation
    ~h^2 and float64 rounding ~1e-16 |L| / h are both far below the fp32 gradient's error."""
    torch = get_torch()
    cfg = dsv3.Config.tiny().replace(num_experts_per_tok=8, n_group=1, topk_group=1,
                                     num_hidden_layers=2, rope_scaling=YARN)
    m = dsv3.Model(cfg, seed=5)
    rng = np.random.default_rng(1)
    sd = m.state_dict()
    for k in sd:  # non-trivial norms so that their gradients are not special
        if k.endswith("norm.weight") or k.endswith("layernorm.weight"):
            sd[k] = (1 + 0.2 * rng.standard_normal(sd[k].shape)).astype(np.float32)
    m.load_state_dict(sd)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 7))
    _, grads = m.loss_and_grad(tokens, alpha=0.1)
    P = {k: torch.tensor(v.astype(np.float64)) for k, v in sd.items()}

    def loss64(name, w):
        with torch.no_grad():
            return t_model(torch, {**P, name: torch.tensor(w)}, cfg, tokens, alpha=0.1)["loss"].item()

    table = {}
    for n in sorted(grads):
        x = sd[n].astype(np.float64)
        h = 1e-4 * float(np.sqrt(np.mean(x * x)))
        V = rng.standard_normal((3,) + x.shape)
        table[n] = (V, [(loss64(n, x + h * v) - loss64(n, x - h * v)) / (2 * h) for v in V])
    return sd, grads, table


def fd_rejections(name, g, V, nums):
    """Why g is not the gradient whose directional derivatives along V are nums: a direction
    fails when |<g, v> - num| > FD_RTOL * |g| * |v| / sqrt(n) (|<g, v>| is ~|g| for v of unit
    normal entries, so this is relative to the gradient's own magnitude; no absolute floor, a
    zero gradient passes only if the true one is zero). A gradient off by a factor c fails a
    direction unless |<g, v>| < FD_RTOL |g| / |c - 1| (for 1.1: one direction in ~1000)."""
    g = np.asarray(g, dtype=np.float64)
    gnorm = float(np.linalg.norm(g))
    out = []
    for d, (v, num) in enumerate(zip(V, nums)):
        ana = float(np.sum(g * v))
        tol = FD_RTOL * gnorm * float(np.linalg.norm(v)) / np.sqrt(v.size)
        if not abs(ana - num) <= tol:
            out.append(f"{name} direction {d}: analytic {ana:.8g} vs finite difference "
                       f"{num:.8g} (|diff| {abs(ana - num):.3e} > tol {tol:.3e})")
    return out


def test_gradients_finite_differences(fd_table):
    """Every named gradient of the C++ model along three random directions vs central
    differences of the float64 reference loss (semantics §2.1-2.5)."""
    sd, grads, table = fd_table
    assert set(table) == {k for k in sd if not k.endswith("e_score_correction_bias")}
    bad = [msg for n in sorted(table) for msg in fd_rejections(n, grads[n], *table[n])]
    assert not bad, "\n".join(bad)


CORRUPTIONS = {"zeroed": lambda g: np.zeros_like(g), "negated": lambda g: -g,
               "scaled by 1.1": lambda g: 1.1 * g}


def test_finite_differences_reject_every_wrong_gradient(fd_table):
    """The check above can fail: each parameter's gradient zeroed, negated or scaled by 1.1
    (the others left correct) is rejected, for every one of the parameters."""
    _, grads, table = fd_table
    accepted = [f"{n} {c}" for n in sorted(table) for c, f in CORRUPTIONS.items()
                if not fd_rejections(n, f(grads[n]), *table[n])]
    assert not accepted, "wrong gradients accepted: " + ", ".join(accepted)
    assert len(table) == 93


def test_shared_embedding_and_head_get_mtp_gradient():
    cfg, m, sd = make("v3-sigmoid-groups-bias")
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, size=(2, 9))
    _, g_all = m.loss_and_grad(tokens)
    _, g_main = m.loss_and_grad(tokens, mtp_weight=0.0)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert np.abs(g_all[k] - g_main[k]).max() > 1e-6, k
    assert not np.any(g_main["model.layers.4.eh_proj.weight"])


def test_mtp_loss_formula():
    """mtp = (lambda/D) sum_k (1/T) sum_{valid i} -log p_k(t_{i+k+1}): scaling lambda scales it
    linearly and the main loss does not move."""
    cfg, m, _ = make("gqa-tied-2mtp")
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, size=(3, 8))
    a, b = m.loss(tokens, mtp_weight=0.3), m.loss(tokens, mtp_weight=0.6)
    assert abs(b["mtp"] - 2 * a["mtp"]) < 1e-9 and a["main"] == b["main"]
    assert m.loss(tokens, mtp_weight=0.0)["mtp"] == 0.0


@pytest.mark.parametrize("name", ["v3-sigmoid-groups-bias", "gqa-tied-2mtp", "dense-mha"])
def test_prefill_plus_decode_equals_full_forward(name):
    cfg, m, _ = make(name)
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, size=(2, 13))
    full = m.forward(tokens)
    cache = m.new_cache(batch=2, max_len=32)
    parts = [m.forward(tokens[:, :6], cache=cache, start_pos=0)]
    for t in range(6, 13):
        parts.append(m.forward(tokens[:, t:t + 1], cache=cache, start_pos=t))
    assert_close(f"{name} prefill+decode", np.concatenate(parts, 1), full, "fp32_reduce")
    assert cache.length == [13] * cfg.num_hidden_layers
    if cfg.attention_type == "mla":
        assert cache.bytes_per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4
    logits, hidden = m.forward_with_hidden(tokens[:, 12:13], cache, 12)
    assert hidden.shape == (2, 1, cfg.hidden_size)


def test_failed_cached_forward_leaves_consistent_cache():
    """A failure in a later layer must not leave earlier layers' rewritten rows vouched for."""
    cfg, m, sd = make("v3-sigmoid-groups-bias")
    tokens = np.random.default_rng(8).integers(0, cfg.vocab_size, size=(1, 12))
    cache = m.new_cache(1, 16)
    m.forward(tokens[:, :10], cache=cache)
    bad = dict(sd)
    bad["model.layers.2.mlp.gate.weight"] = np.full_like(sd["model.layers.2.mlp.gate.weight"], np.nan)
    m.load_state_dict(bad)
    with pytest.raises(ValueError, match="finite"):
        m.forward(tokens[:, 8:12], cache=cache, start_pos=8)
    assert cache.length == [8] * cfg.num_hidden_layers  # only the untouched prefix remains
    m.load_state_dict(sd)
    got = m.forward(tokens[:, 8:12], cache=cache, start_pos=8)
    assert_close("after failed call", got, m.forward(tokens)[:, 8:12], "fp32_reduce")
    with pytest.raises(ValueError, match="does not continue"):
        m.forward(tokens[:, :1], cache=dsv3.KVCache(cfg, 1, 16), start_pos=9)


def test_errors():
    cfg, m, sd = make("v3-sigmoid-groups-bias")
    with pytest.raises(IndexError, match="token id 64"):
        m.forward(np.array([[1, 64]]))
    with pytest.raises(IndexError, match="token id -1"):
        m.loss(np.array([[1, -1, 3]]))
    with pytest.raises(ValueError, match="N >= 2|at least 2"):
        m.loss(np.array([[1]]))
    with pytest.raises(TypeError, match="integer"):
        m.forward(np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="dimensions"):
        m.forward(np.zeros((1, 2, 3), dtype=np.int64))
    with pytest.raises(KeyError, match="missing keys"):
        m.load_state_dict({k: v for k, v in sd.items() if k != "lm_head.weight"})
    with pytest.raises(KeyError, match="unexpected keys"):
        m.load_state_dict(dict(sd, extra=np.zeros(1, np.float32)))
    with pytest.raises(ValueError, match="must have shape"):
        m.load_state_dict(dict(sd, **{"lm_head.weight": np.zeros((3, 3), np.float32)}))
    with pytest.raises(TypeError, match="float32"):
        m.load_state_dict(dict(sd, **{"lm_head.weight": sd["lm_head.weight"].astype(np.float64)}))
    missing, unexpected = m.load_state_dict({"model.norm.weight": sd["model.norm.weight"], "x": 1},
                                            strict=False)
    assert "lm_head.weight" in missing and unexpected == ["x"]
    cache = m.new_cache(1, 8)
    with pytest.raises(ValueError, match="batch 2"):
        m.forward(np.zeros((2, 1), np.int64), cache=cache)
    with pytest.raises(ValueError, match="capacity"):
        m.forward(np.zeros((1, 9), np.int64), cache=cache)
    with pytest.raises(ValueError, match="does not continue"):
        m.forward(np.zeros((1, 1), np.int64), cache=cache, start_pos=3)
    with pytest.raises(ValueError, match="not made for this model"):
        m.forward(np.zeros((1, 1), np.int64), cache=dsv3.KVCache(cfg.replace(kv_lora_rank=8), 1, 8))
    with pytest.raises(TypeError):
        dsv3.Model({"hidden_size": 3})
    np.testing.assert_array_equal(m.state_dict()["lm_head.weight"], sd["lm_head.weight"])
