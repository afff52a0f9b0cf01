"""MLA (semantics §2.2) and the MHA/GQA baselines: training form vs the float64 reference, every
gradient vs autograd and finite differences, absorbed vs naive decoding, prefill + decode vs
one full forward, cache sizes, and the error cases."""
import numpy as np
import pytest

import dsv3
from dsv3 import ops
from conftest import assert_close, fd_check, get_torch, randn
from dsv3.reference.nn import random_attention_params, t_mha, t_mla

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}

CONFIGS = {
    "mla-qlora": dict(),
    "mla-noq": dict(q_lora_rank=0),
    "mla-yarn": dict(rope_scaling=YARN),
    "mla-noq-yarn": dict(q_lora_rank=None, rope_scaling=YARN),
    "mha": dict(attention_type="mha"),
    "gqa-yarn": dict(attention_type="gqa", num_key_value_heads=2, rope_scaling=YARN),
    # DeepSeek-V3's head dims (nope 128, rope 64, v 128): full AVX-512 vectors in the strided
    # v/dv, the wide tiles and B-panel packing of the attention products
    "mla-v3-heads": dict(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
}


def cfg_of(name):
    return dsv3.Config.tiny().replace(**CONFIGS[name])


def reference(torch, x, P, cfg, start_pos=0):
    f = t_mla if cfg.attention_type == "mla" else t_mha
    return f(torch, x, P, cfg, start_pos)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("B,T,start", [(1, 1, 0), (2, 7, 0), (2, 33, 5), (1, 70, 100)])
def test_layer_forward_backward_vs_autograd(rng, name, B, T, start):
    torch = get_torch()
    cfg = cfg_of(name)
    P = random_attention_params(cfg, rng)
    x = randn(rng, B, T, cfg.hidden_size)
    out = ops.attention_layer(x, P, cfg, start)
    Pt = {k: torch.tensor(v.astype(np.float64), requires_grad=True) for k, v in P.items()}
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    ref = reference(torch, xt, Pt, cfg, start)
    assert_close(f"{name} forward B{B} T{T}", out, ref.detach().numpy(), "fp32_reduce")
    d_out = randn(rng, *out.shape)
    ref.backward(torch.tensor(d_out.astype(np.float64)))
    dx, grads = ops.attention_layer_backward(d_out, x, P, cfg, start)
    assert set(grads) == set(P)
    assert_close(f"{name} dx", dx, xt.grad.numpy(), "fp32_reduce")
    for k in P:
        assert_close(f"{name} d{k}", grads[k], Pt[k].grad.numpy(), "fp32_reduce")


@pytest.mark.parametrize("name", ["mla-qlora", "mla-noq-yarn", "gqa-yarn"])
def test_layer_finite_differences(rng, name):
    cfg = cfg_of(name)
    P = random_attention_params(cfg, rng)
    x = randn(rng, 2, 5, cfg.hidden_size)
    d_out = randn(rng, 2, 5, cfg.hidden_size)
    dx, grads = ops.attention_layer_backward(d_out, x, P, cfg, 3)
    names = sorted(P)

    def loss(x_, *ws):
        Q = dict(zip(names, ws))
        return float(np.sum(ops.attention_layer(x_, Q, cfg, 3).astype(np.float64) * d_out))

    fd_check(name, loss, [x] + [P[k] for k in names], [dx] + [grads[k] for k in names], rng,
             directions=2)


def run_decode(cfg, P, x, chunks, absorbed=True, cache=None):
    """Feed x (B, T, D) through layer 0 in the given chunk sizes; returns the outputs."""
    cache = cache or dsv3.KVCache(cfg, x.shape[0], 64, layers=1)
    outs, pos = [], 0
    for n in chunks:
        outs.append(ops.attention_layer_decode(x[:, pos:pos + n], P, cfg, cache, 0, pos, absorbed))
        pos += n
    return np.concatenate(outs, 1), cache


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_then_decode_equals_full_forward(rng, name):
    cfg = cfg_of(name)
    P = random_attention_params(cfg, rng)
    x = randn(rng, 2, 23, cfg.hidden_size)
    full = ops.attention_layer(x, P, cfg)
    for chunks in ([23], [10] + [1] * 13, [5, 7, 1, 10]):
        got, cache = run_decode(cfg, P, x, chunks)
        assert_close(f"{name} decode chunks {chunks}", got, full, "fp32_reduce")
        assert cache.length == [23]


@pytest.mark.parametrize("name", ["mla-qlora", "mla-noq-yarn"])
def test_absorbed_equals_naive(rng, name):
    cfg = cfg_of(name)
    P = random_attention_params(cfg, rng)
    x = randn(rng, 3, 19, cfg.hidden_size)
    a, ca = run_decode(cfg, P, x, [8, 1, 1, 9], absorbed=True)
    n, cn = run_decode(cfg, P, x, [8, 1, 1, 9], absorbed=False)
    assert_close(f"{name} absorbed vs naive", a, n, "fp32_reduce")
    assert np.array_equal(ca.layer_data(0), cn.layer_data(0))


def test_latent_cache_holds_normalised_latent_and_roped_kpe(rng):
    """The cache rows are exactly [kv_a_layernorm(c_kv) | rope(k_pe)] of the reference."""
    torch = get_torch()
    cfg = cfg_of("mla-yarn")
    P = random_attention_params(cfg, rng)
    x = randn(rng, 1, 9, cfg.hidden_size)
    _, cache = run_decode(cfg, P, x, [4, 5])
    from dsv3.reference.nn import t_rmsnorm, t_rope
    Dc = cfg.kv_lora_rank
    kva = torch.tensor(x.astype(np.float64)) @ torch.tensor(P["kv_a_proj_with_mqa.weight"].astype(np.float64)).T
    c = t_rmsnorm(torch, kva[..., :Dc], torch.tensor(P["kv_a_layernorm.weight"].astype(np.float64)),
                  cfg.rms_norm_eps)
    kpe = t_rope(torch, kva[..., Dc:].view(1, 9, 1, -1), np.arange(9), cfg)[:, :, 0]
    rows = cache.layer_data(0)[0, :9]
    assert_close("cached latent", rows[:, :Dc], c[0].numpy())
    assert_close("cached k_pe", rows[:, Dc:], kpe[0].numpy())


@pytest.mark.parametrize("name,per_layer", [("mla-qlora", 16 + 4), ("mha", 4 * (12 + 8)),
                                            ("gqa-yarn", 2 * (12 + 8))])
def test_cache_bytes(name, per_layer):
    cfg = cfg_of(name)
    cache = dsv3.KVCache(cfg, batch=3, max_len=50)
    assert cache.bytes_per_token == per_layer * cfg.num_hidden_layers * 4
    assert cache.nbytes == 3 * 50 * cache.bytes_per_token
    assert cache.bytes_per_token == cfg.kv_cache_bytes_per_token("float32")
    assert cache.kind == ("latent" if name.startswith("mla") else "kv")


def test_rollback_overwrites(rng):
    """Decoding again from an earlier start_pos overwrites the tail (speculative rollback)."""
    cfg = cfg_of("mla-qlora")
    P = random_attention_params(cfg, rng)
    x = randn(rng, 1, 12, cfg.hidden_size)
    y = randn(rng, 1, 3, cfg.hidden_size)
    want, ref_cache = run_decode(cfg, P, x, [12])
    _, cache = run_decode(cfg, P, x, [9])
    ops.attention_layer_decode(y, P, cfg, cache, 0, 9)          # rejected tokens
    got = ops.attention_layer_decode(x[:, 9:], P, cfg, cache, 0, 9)  # roll back and redo
    assert_close("after rollback", got, want[:, 9:], "fp32_reduce")
    assert np.array_equal(cache.layer_data(0)[:, :12], ref_cache.layer_data(0)[:, :12])


def test_errors_leave_cache_unchanged(rng):
    cfg = cfg_of("mla-qlora")
    P = random_attention_params(cfg, rng)
    cache = dsv3.KVCache(cfg, batch=1, max_len=8, layers=1)
    x = randn(rng, 1, 6, cfg.hidden_size)
    ops.attention_layer_decode(x, P, cfg, cache, 0, 0)
    before = cache.layer_data(0)
    with pytest.raises(ValueError, match="exceeds the cache capacity"):
        ops.attention_layer_decode(randn(rng, 1, 3, cfg.hidden_size), P, cfg, cache, 0, 6)
    with pytest.raises(ValueError, match="start_pos 7 does not continue"):
        ops.attention_layer_decode(randn(rng, 1, 1, cfg.hidden_size), P, cfg, cache, 0, 7)
    with pytest.raises(ValueError, match="batch 2"):
        ops.attention_layer_decode(randn(rng, 2, 1, cfg.hidden_size), P, cfg, cache, 0, 6)
    with pytest.raises(IndexError, match="layer 1"):
        ops.attention_layer_decode(randn(rng, 1, 1, cfg.hidden_size), P, cfg, cache, 1, 0)
    bad = dict(P, **{"kv_b_proj.weight": P["kv_b_proj.weight"][:, :-1]})
    with pytest.raises(ValueError, match=r"params\['kv_b_proj.weight'\] must have shape"):
        ops.attention_layer_decode(randn(rng, 1, 1, cfg.hidden_size), bad, cfg, cache, 0, 6)
    assert np.array_equal(cache.layer_data(0), before) and cache.length == [6]
    with pytest.raises(ValueError, match="missing: o_proj.weight"):
        ops.attention_layer(x, {k: v for k, v in P.items() if k != "o_proj.weight"}, cfg)
    extra = dict(P, **{"extra.weight": P["o_proj.weight"]})
    for call in (lambda: ops.attention_layer(x, extra, cfg),
                 lambda: ops.attention_layer_backward(x, x, extra, cfg),
                 lambda: ops.attention_layer_decode(x[:, :1], extra, cfg, cache, 0, 6)):
        with pytest.raises(ValueError, match="unexpected: extra.weight"):
            call()
    assert np.array_equal(cache.layer_data(0), before) and cache.length == [6]
    with pytest.raises(ValueError, match="hidden_size"):
        ops.attention_layer(randn(rng, 1, 6, 7), P, cfg)
    with pytest.raises(TypeError, match="float32"):
        ops.attention_layer(x.astype(np.float64), P, cfg)
    with pytest.raises(ValueError, match="latent cache"):
        ops.attention_layer_decode(x, P, cfg, dsv3.KVCache(cfg_of("mha"), 1, 8), 0, 0)
    with pytest.raises(ValueError, match="exceed this machine's memory"):
        dsv3.KVCache(dsv3.Config.deepseek_v3(), batch=1 << 20, max_len=1 << 20)


@pytest.mark.parametrize("threads", [1, 2])
def test_long_context_split_keys_equal_naive(rng, threads):
    """Decoding against >= 512 cached tokens splits the keys across threads; the merged
    softmax must equal the naive form (and the 1-thread, unsplit path)."""
    cfg = cfg_of("mla-yarn")
    P = random_attention_params(cfg, rng)
    x = randn(rng, 1, 700, cfg.hidden_size, scale=0.5)
    n0 = dsv3.get_num_threads()
    try:
        dsv3.set_num_threads(threads)
        outs = []
        for absorbed in (True, False):
            cache = dsv3.KVCache(cfg, 1, 701, layers=1)
            ops.attention_layer_decode(x[:, :690], P, cfg, cache, 0, 0, absorbed)
            outs.append(np.concatenate([ops.attention_layer_decode(x[:, t:t + 1], P, cfg, cache, 0, t, absorbed)
                                        for t in range(690, 700)], 1))
    finally:
        dsv3.set_num_threads(n0)
    assert_close(f"split-key decode, {threads} threads", outs[0], outs[1], "fp32_reduce")


KEEP_SCRIPT = r"""
import numpy as np, dsv3
from dsv3 import ops
from dsv3.reference.nn import random_attention_params
out = {}
for name, kw in (("mla", {}), ("gqa", dict(attention_type="gqa", num_key_value_heads=2))):
    cfg = dsv3.Config.tiny().replace(**kw)
    rng = np.random.default_rng(5)
    P = random_attention_params(cfg, rng)
    x = rng.standard_normal((2, 70, cfg.hidden_size)).astype(np.float32)
    d = rng.standard_normal(x.shape).astype(np.float32)
    dx, g = ops.attention_layer_backward(d, x, P, cfg)
    out[name + "_dx"] = dx
    for k, v in g.items():
        out[name + "_" + k] = v
np.savez(OUT, **out)
"""


def test_kept_probabilities_equal_recomputed(tmp_path):
    """The layer backward from the attention probabilities kept by the forward equals the one
    that recomputes them (DSV3_KEEP_ATTN_PROBS=0), to fp32 rounding."""
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    res = {}
    for tag, env in (("kept", {}), ("recomputed", {"DSV3_KEEP_ATTN_PROBS": "0"})):
        path = tmp_path / f"{tag}.npz"
        e = dict(os.environ, **env)
        e["PYTHONPATH"] = os.pathsep.join([here, e.get("PYTHONPATH", "")])
        subprocess.run([sys.executable, "-c", f"OUT = {str(path)!r}\n" + KEEP_SCRIPT], env=e,
                       check=True)
        with np.load(path) as z:  # closes the archive
            res[tag] = dict(z)
    for key, x in res["recomputed"].items():
        # gradients are sums of O(100) products of O(1) values: fp32 rounding ~1e-6 relative
        np.testing.assert_allclose(res["kept"][key], x, rtol=1e-4, atol=1e-5, err_msg=key)
