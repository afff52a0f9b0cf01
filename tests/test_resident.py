"""Resident low-precision weights (Model._from_resident): a model whose projection matrices stay
in fp32 / bf16 / FP8 E4M3 + 128x128 weight_scale_inv, dequantized inside the linear kernels.

The resident weights are made here from an ordinary model's state_dict by an independent
quantizer written with torch (torch.float8_e4m3fn per 128x128 block, scale = amax / 448 =
weight_scale_inv; torch's bf16 rounding). The reference is an fp32 Model loaded with the
torch-DEQUANTIZED weights, so both models compute the same function and differ only by fp32
reassociation (per-K-block sums times the block scale vs sgemm over the dequantized matrix).
Tolerance: |a - b| <= 2e-5 * max|b| on every compared tensor; one doubled scale block breaks it.
"""
import gc
import threading

import numpy as np
import pytest

import dsv3
from conftest import get_torch

RTOL = 2e-5
BK = 128

RESIDENT_SUFFIXES = ("q_a_proj.weight", "q_b_proj.weight", "q_proj.weight", "k_proj.weight",
                     "v_proj.weight", "kv_a_proj_with_mqa.weight", "o_proj.weight",
                     "gate_proj.weight", "up_proj.weight", "down_proj.weight", "eh_proj.weight")


def resident_capable(name):
    return (name in ("model.embed_tokens.weight", "lm_head.weight")
            or name.split(".")[-2] + ".weight" in RESIDENT_SUFFIXES)


# dims above 128 and not multiples of it: ragged 128x128 blocks on both axes
BASE = dict(vocab_size=200, hidden_size=160, intermediate_size=144, moe_intermediate_size=136,
            num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=1,
            num_attention_heads=2, num_key_value_heads=2, q_lora_rank=136, kv_lora_rank=40,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4,
            n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
            max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
CONFIGS = {
    "mla_qlora_moe": dict(),
    "mla_no_qlora": dict(q_lora_rank=None),
    "mha": dict(attention_type="mha"),
    "gqa_tied": dict(attention_type="gqa", num_attention_heads=4, num_key_value_heads=2,
                     tie_word_embeddings=True),
}


def config(kind):
    return dsv3.Config.tiny().replace(**{**BASE, **CONFIGS[kind]})


# ---------------------------------------------------------------- the independent quantizers
def quant_fp8(w):
    """(codes uint8 [O,K], scale_inv float32 [ceil(O/128), ceil(K/128)], dequantized fp32)."""
    torch = get_torch()
    t = torch.from_numpy(w)
    O, K = t.shape
    codes = torch.empty((O, K), dtype=torch.uint8)
    sinv = torch.empty(((O + BK - 1) // BK, (K + BK - 1) // BK), dtype=torch.float32)
    deq = torch.empty((O, K), dtype=torch.float64)
    for i in range(sinv.shape[0]):
        for j in range(sinv.shape[1]):
            rows, cols = slice(i * BK, (i + 1) * BK), slice(j * BK, (j + 1) * BK)
            blk = t[rows, cols]
            amax = float(blk.abs().max())
            s = torch.tensor(amax / 448.0 if amax > 0 else 1.0, dtype=torch.float32)
            q = (blk / s).to(torch.float8_e4m3fn)
            codes[rows, cols] = q.view(torch.uint8)
            sinv[i, j] = s
            deq[rows, cols] = q.to(torch.float64) * float(s)
    return codes.numpy(), sinv.numpy(), deq.to(torch.float32).numpy()


def quant_bf16(w):
    torch = get_torch()
    b = torch.from_numpy(w).to(torch.bfloat16)
    return b.view(torch.int16).numpy().view(np.uint16).copy(), b.to(torch.float32).numpy()


def make_weights(state, fmt_of):
    """(weights for _from_resident, dequantized fp32 state, {name: format held})."""
    weights, deq, formats = {}, {}, {}
    for name, w in state.items():
        fmt = fmt_of(name)
        if fmt == "fp8":
            codes, sinv, d = quant_fp8(w)
            weights[name], deq[name] = ("fp8", codes, sinv), d
        elif fmt == "bf16":
            bits, d = quant_bf16(w)
            weights[name], deq[name] = ("bf16", bits, None), d
        elif fmt == "fp32":
            weights[name], deq[name] = ("fp32", w.copy(), None), w
        else:  # a plain float32 array, copied into the slab
            weights[name], deq[name] = w.copy(), w
        formats[name] = fmt
    return weights, deq, formats


def is_kv_b(name):
    return name.endswith("kv_b_proj.weight")


def policy(kind):
    if kind in ("fp8", "bf16"):
        return lambda n: kind if resident_capable(n) or is_kv_b(n) else "copy"
    cycle = ["fp8", "bf16", "fp32", "copy"]
    counter = {}

    def mixed(n):
        if not (resident_capable(n) or is_kv_b(n)):
            return "copy"
        counter[n] = counter.get(n, len(counter))
        return cycle[counter[n] % 4]
    return mixed


_CACHE = {}


def build(kind, fmt, seed=5):
    key = (kind, fmt, seed)
    if key not in _CACHE:
        cfg = config(kind)
        base = dsv3.Model(cfg, seed=seed)
        weights, deq, formats = make_weights(base.state_dict(), policy(fmt))
        ref = dsv3.Model(cfg, seed=0)
        ref.load_state_dict(deq)
        _CACHE[key] = (cfg, weights, deq, formats, ref, dsv3.Model._from_resident(cfg, weights))
    return _CACHE[key]


def close(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and np.abs(a - b).max() <= RTOL * np.abs(b).max()


def assert_close(a, b, what):
    err = np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max()
    assert close(a, b), f"{what}: max |a-b| / max|b| = {err:.3g} > {RTOL}"


def tokens(cfg, B, T, seed=0):
    return np.random.default_rng(seed).integers(2, cfg.vocab_size, size=(B, T))


# ---------------------------------------------------------------- agreement with the reference
CASES = [("mla_qlora_moe", "fp8"), ("mla_qlora_moe", "bf16"), ("mla_qlora_moe", "mixed"),
         ("mla_no_qlora", "fp8"), ("mha", "fp8"), ("mha", "mixed"), ("gqa_tied", "bf16")]


@pytest.mark.parametrize("kind,fmt", CASES)
def test_forward_and_cached_decoding_match_the_dequantized_reference(kind, fmt):
    cfg, _, _, formats, ref, res = build(kind, fmt)
    assert res.is_resident and not ref.is_resident
    attn = "model.layers.0.self_attn."
    assert (attn + {"mla_qlora_moe": "q_a_proj.weight", "mla_no_qlora": "q_proj.weight",
                    "mha": "k_proj.weight", "gqa_tied": "k_proj.weight"}[kind]) in formats
    assert ("lm_head.weight" in formats) == (kind != "gqa_tied")  # tied: the embedding heads
    assert (attn + "q_a_proj.weight" in formats) == (kind == "mla_qlora_moe")
    tok = tokens(cfg, 2, 9)
    assert_close(res.forward(tok), ref.forward(tok), "forward")
    # cached: prefill 5 then 4 single-token steps, batch 2
    cr, cf = res.new_cache(2, 16), ref.new_cache(2, 16)
    assert_close(res.forward(tok[:, :5], cr, 0), ref.forward(tok[:, :5], cf, 0), "prefill")
    for p in range(5, 9):
        assert_close(res.forward(tok[:, p:p + 1], cr, p), ref.forward(tok[:, p:p + 1], cf, p),
                     f"decode step at {p}")
    for name, f in formats.items():
        if resident_capable(name):
            assert res.weight_format(name) == (f if f != "copy" else "fp32")


@pytest.mark.parametrize("code,at", [(0x7F, (3, 7)), (0xFF, (3, 7)), (0x7F, (-1, -1))])
def test_a_nan_code_in_a_resident_fp8_weight_reaches_the_decoded_logits(code, at):
    """Resident fp8 views are checked for NaN codes once, when the model is made, so that the
    decode GEMV skips its per-row-group check; a view holding one keeps the check. One NaN code
    in a shared expert's down_proj (row 3, or the very last code) makes that row of the layer's
    output NaN, hence every logit, in a prefill and a 1-token decode step; the model without it
    stays finite."""
    cfg, weights, _, formats, _, res = build("mla_qlora_moe", "fp8")
    name = next(n for n, f in formats.items() if f == "fp8" and "shared_experts.down_proj" in n)
    fmt, codes, sinv = weights[name]
    bad = codes.copy()
    bad[at] = code
    nan_model = dsv3.Model._from_resident(cfg, dict(weights, **{name: (fmt, bad, sinv)}))
    tok = tokens(cfg, 1, 4)
    for m, want_nan in ((nan_model, True), (res, False)):
        cache = m.new_cache(1, 8)
        pre = m.forward(tok[:, :3], cache, 0)
        step = m.forward(tok[:, 3:4], cache, 3)
        for what, y in (("prefill", pre), ("decode", step)):
            assert (np.isnan(y).all() if want_nan else np.isfinite(y).all()), (what, want_nan)


@pytest.mark.parametrize("kind,fmt", [("mla_qlora_moe", "fp8"), ("mha", "mixed")])
def test_hidden_mtp_and_generation_match(kind, fmt):
    cfg, _, _, _, ref, res = build(kind, fmt)
    tok = tokens(cfg, 2, 7, seed=1)
    lr, hr = res.forward_with_hidden(tok, res.new_cache(2, 16), 0)
    lf, hf = ref.forward_with_hidden(tok, ref.new_cache(2, 16), 0)
    assert_close(lr, lf, "forward_with_hidden logits")
    assert_close(hr, hf, "forward_with_hidden hidden")
    # the same h^0 into both MTP modules
    mr, mf = res.new_mtp_cache(2, 16), ref.new_mtp_cache(2, 16)
    outr = res.mtp_forward(hf[:, :6], tok[:, 1:7], mr, 0)
    outf = ref.mtp_forward(hf[:, :6], tok[:, 1:7], mf, 0)
    assert_close(outr[0], outf[0], "mtp logits")
    assert_close(outr[1], outf[1], "mtp h^k")
    prompt = tok[0, :4]
    g = ref.generate(prompt, max_new_tokens=8).tokens
    assert np.array_equal(res.generate(prompt, max_new_tokens=8).tokens, g)
    spec = res.generate(prompt, max_new_tokens=8, speculative="mtp")
    assert np.array_equal(spec.tokens, g)
    assert spec.stats["mtp_forwards"] > 0
    assert np.array_equal(list(res.stream(prompt, max_new_tokens=8)), g)
    # the loss without gradients runs too
    lres, lref = res.loss(tok)["loss"], ref.loss(tok)["loss"]
    assert abs(lres - lref) <= 1e-5 * abs(lref)


def test_a_doubled_scale_block_breaks_the_comparison():
    cfg, weights, _, _, ref, res = build("mla_qlora_moe", "fp8")
    tok = tokens(cfg, 2, 9)
    want = ref.forward(tok)
    assert close(res.forward(tok), want)
    for name in ("lm_head.weight", "model.layers.1.mlp.experts.0.down_proj.weight"):
        fmt, codes, sinv = weights[name]
        bad = sinv.copy()
        bad[-1, -1] *= 2  # the ragged corner block
        w2 = dict(weights)
        w2[name] = (fmt, codes, bad)
        assert not close(dsv3.Model._from_resident(cfg, w2).forward(tok), want), name


def test_state_dict_formats_and_bytes():
    cfg, weights, deq, formats, _, res = build("mla_qlora_moe", "mixed")
    sd = res.state_dict()
    assert set(sd) == set(deq)
    for name in deq:  # e4m3 * scale and bf16 widening are exact in fp32: bitwise equal
        assert sd[name].dtype == np.float32 and np.array_equal(sd[name], deq[name]), name
    wf = res.weight_formats()
    for name, f in formats.items():
        if len(deq[name].shape) == 2:
            want = "fp32" if f == "copy" or not resident_capable(name) else f
            assert wf[name] == want, name
    assert wf["model.layers.0.self_attn.kv_b_proj.weight"] == "fp32"  # dequantized on load
    assert set(wf.values()) == {"fp32", "bf16", "fp8"}
    # bytes: resident ones in their format; the slab holds the rest, 64-byte aligned entries
    held = slab = 0
    for name, a in deq.items():
        f = formats[name] if resident_capable(name) else "copy"
        if f == "fp8":
            O, K = a.shape
            held += O * K + 4 * (-(-O // BK)) * (-(-K // BK))
        elif f == "bf16":
            held += 2 * a.size
        elif f == "fp32":
            held += 4 * a.size
        else:
            slab += 4 * (-(-a.size // 16) * 16)
    assert res.resident_bytes() == held + slab
    fp32_model = dsv3.Model(cfg)
    assert fp32_model.resident_bytes() > res.resident_bytes()
    assert set(fp32_model.weight_formats().values()) == {"fp32"}


def test_arrays_are_kept_alive_and_memory_maps_work(tmp_path):
    cfg, weights, _, _, ref, _ = build("mla_qlora_moe", "fp8")
    tok = tokens(cfg, 1, 6)
    w2 = {}
    for i, (name, v) in enumerate(weights.items()):
        if isinstance(v, tuple) and v[0] == "fp8" and i % 2 == 0:  # half of them memory-mapped
            path = tmp_path / f"{i}.bin"
            v[1].tofile(path)
            w2[name] = ("fp8", np.memmap(path, np.uint8, "r", shape=v[1].shape), v[2].copy())
        elif isinstance(v, tuple):
            w2[name] = (v[0], v[1].copy(), None if v[2] is None else v[2].copy())
        else:
            w2[name] = v.copy()
    res = dsv3.Model._from_resident(cfg, w2)
    del w2
    gc.collect()
    assert close(res.forward(tok), ref.forward(tok))


# ---------------------------------------------------------------- refusals
def small_weights():
    cfg, weights, _, _, _, res = build("mla_qlora_moe", "fp8")
    return cfg, dict(weights), res


FP8_NAME = "model.layers.0.self_attn.o_proj.weight"


def test_bad_entries_raise_naming_the_tensor():
    cfg, w, _ = small_weights()
    fmt, codes, sinv = w[FP8_NAME]
    O, K = codes.shape
    bad = {
        "wrong dtype": ((fmt, codes.astype(np.int8), sinv), TypeError, "uint8"),
        "bf16 as float16": (("bf16", codes.astype(np.float16), None), TypeError, "uint16"),
        "wrong shape": ((fmt, np.ascontiguousarray(codes.T), sinv), ValueError, "shape"),
        "scale shape": ((fmt, codes, np.ones((sinv.shape[0] + 1, sinv.shape[1]), np.float32)),
                        ValueError, "scale_inv"),
        "scale dtype": ((fmt, codes, sinv.astype(np.float64)), TypeError, "scale_inv"),
        "non-contiguous": ((fmt, np.zeros((O, 2 * K), np.uint8)[:, ::2], sinv), ValueError,
                           "C-contiguous"),
        "unknown format": (("int4", codes, sinv), ValueError, "fp8"),
        "scale for bf16": (("bf16", np.zeros((O, K), np.uint16), sinv), ValueError, "None"),
        "short tuple": ((fmt, codes), TypeError, "tuple"),
        "float64 copy": (np.zeros((O, K)), TypeError, "float32"),
    }
    for what, (value, exc, text) in bad.items():
        w2 = dict(w)
        w2[FP8_NAME] = value
        with pytest.raises(exc, match=text) as ei:
            dsv3.Model._from_resident(cfg, w2)
        assert FP8_NAME in str(ei.value), what
    for v in (np.nan, np.inf):
        s2 = sinv.copy()
        s2[0, 0] = v
        w2 = dict(w)
        w2[FP8_NAME] = (fmt, codes, s2)
        with pytest.raises(ValueError, match="non-finite weight_scale_inv") as ei:
            dsv3.Model._from_resident(cfg, w2)
        assert FP8_NAME in str(ei.value)


def test_names_missing_unknown_and_not_resident_capable():
    cfg, w, _ = small_weights()
    w2 = dict(w)
    del w2[FP8_NAME]
    with pytest.raises(KeyError, match="missing weights.*o_proj"):
        dsv3.Model._from_resident(cfg, w2)
    w2 = dict(w)
    w2["model.layers.0.self_attn.nonsense.weight"] = w[FP8_NAME]
    with pytest.raises(KeyError, match="unknown names.*nonsense"):
        dsv3.Model._from_resident(cfg, w2)
    for name in ("model.norm.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.1.mlp.gate.e_score_correction_bias",
                 "model.layers.0.input_layernorm.weight"):
        w2 = dict(w)
        w2[name] = ("fp32", w[name], None)
        with pytest.raises(ValueError, match="cannot be resident") as ei:
            dsv3.Model._from_resident(cfg, w2)
        assert name in str(ei.value)
    with pytest.raises(TypeError, match="dict"):
        dsv3.Model._from_resident(cfg, list(w.items()))


def test_training_entry_points_refuse_a_resident_model(tmp_path):
    cfg, _, deq, _, _, res = build("mla_qlora_moe", "fp8")
    tok = tokens(cfg, 2, 6)
    with pytest.raises(ValueError, match="from_pretrained"):
        res.loss_and_grad(tok)
    with pytest.raises(ValueError, match="from_pretrained"):
        dsv3.Trainer(res)
    with pytest.raises(ValueError, match="from_pretrained"):
        res.load_state_dict(deq)
    with pytest.raises(ValueError, match="from_pretrained"):  # the engine refuses too
        res._m.loss(tok, 0.0, 0.0, True)
    with pytest.raises(ValueError, match="read-only"):
        res._m.set_param("model.norm.weight", deq["model.norm.weight"])
    with pytest.raises(KeyError):
        res.weight_format("nope")
    # save_pretrained writes the dequantized weights; they load back as an fp32 model
    res.save_pretrained(tmp_path / "ck")
    back = dsv3.Model.from_pretrained(tmp_path / "ck")
    assert not back.is_resident
    assert close(back.forward(tok), res.forward(tok))


def test_deterministic_across_runs_and_concurrent_readers():
    # (same thread count: the fp32 parts of the model split work by thread count)
    cfg, _, _, _, _, res = build("mla_qlora_moe", "mixed")
    tok = tokens(cfg, 2, 9)
    want = res.forward(tok)
    assert np.array_equal(res.forward(tok), want)
    out = [None] * 2

    def run(i):
        out[i] = res.forward(tok)
    ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all(np.array_equal(o, want) for o in out)
