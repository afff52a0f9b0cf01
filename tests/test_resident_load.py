"""dsv3.resident: memory-mapped, format-preserving checkpoint loading (issue #21).

References are independent of the loader: checkpoint.decode_tensors (the fp32 loading path)
for values, a torch float8_e4m3fn block quantizer written here from the formula for
quantize-on-load, /proc/self/status for the anonymous memory, the file's own bytes for
zero-copy."""
from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import dsv3
from dsv3 import _memory, resident
from dsv3 import checkpoint as ck
from dsv3 import safetensors_io as st

HERE = os.path.dirname(os.path.abspath(__file__))
MAKE = os.path.join(HERE, "..", "bench", "make_checkpoint.py")
sys.path.insert(0, os.path.join(HERE, "..", "bench"))
import make_checkpoint  # noqa: E402

has_resident = hasattr(dsv3.Model, "_from_resident")
needs_res = pytest.mark.skipif(not has_resident, reason="needs Model._from_resident (RES)")


@pytest.fixture(scope="module")
def model():
    return dsv3.Model(dsv3.Config.tiny(), seed=3)


def saved(tmp, model, dtype, sharded=False, name=None):
    d = str(tmp / (name or f"{dtype}{'-sh' if sharded else ''}"))
    model.save_pretrained(d, dtype=dtype, max_shard_bytes=60_000 if sharded else 4 << 30)
    return d


def reference(d):
    """checkpoint.load's float32 values of a directory (decode_tensors + rope permutation)."""
    cfg = dsv3.Config.from_json(os.path.join(d, "config.json"))
    qc = cfg.quantization_config or {}
    t = ck.decode_tensors(st.read_dir(d), d, tuple(qc.get("weight_block_size", (128, 128))))
    return ck.permute_rope(t, cfg, to_pairs=True) if not cfg.rope_interleave else t


def shares_file_map(a: np.ndarray) -> bool:
    """``a``'s base chain ends in an mmap.mmap (a view of a file map, not a copy)."""
    while a is not None:
        if isinstance(a, mmap.mmap):
            return True
        a = getattr(a, "base", None) if not isinstance(a, (bytes, bytearray)) else None
    return False


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    pytest.skip("no RssAnon in /proc/self/status")


# ------------------------------------------------------------------ values and zero-copy
@pytest.mark.parametrize("dtype,own", [("fp8", "fp8"), ("bfloat16", "bf16"), ("float32", "fp32")])
@pytest.mark.parametrize("sharded", [False, True])
def test_own_format_is_zero_copy_and_equals_decode(tmp_path, model, dtype, own, sharded):
    d = saved(tmp_path, model, dtype, sharded)
    if sharded:
        assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    cfg, w, plan = resident.resident_tensors(d)
    assert plan.weights == own and plan.mapped_bytes > 0
    ref = reference(d)
    assert set(w) == set(model.parameter_shapes())
    got = resident.dequantized(w)
    for name in ref:
        if name in w:
            assert np.array_equal(got[name], ref[name]), name
    for name, v in w.items():
        fmt, mapped, _ = plan.tensors[name]
        if isinstance(v, tuple):
            assert v[0] == fmt and mapped == shares_file_map(v[1]), name
            assert not v[1].flags.writeable
            if v[0] == "fp8":
                assert v[2].shape == (-(-v[1].shape[0] // 128), -(-v[1].shape[1] // 128))
            else:
                assert v[2] is None
        else:
            assert fmt == "float32" and v.dtype == np.float32 and not shares_file_map(v)
    # the mapped bytes are the file's bytes at the header's offsets
    name = "model.layers.1.mlp.experts.0.up_proj.weight"
    fname = "model.safetensors"
    if sharded:
        with open(os.path.join(d, "model.safetensors.index.json")) as f:
            fname = json.load(f)["weight_map"][name]
    with open(os.path.join(d, fname), "rb") as f:
        entries, _, start, _ = st.parse_header(f, fname)
        _, shape, b, e = entries[name]
        f.seek(start + b)
        raw = f.read(e - b)
    assert w[name][1].tobytes() == raw


def test_mmap_false_copies(tmp_path, model):
    d = saved(tmp_path, model, "fp8")
    _, w, plan = resident.resident_tensors(d, mmap=False)
    assert plan.mapped_bytes == 0
    assert not any(isinstance(v, tuple) and shares_file_map(v[1]) for v in w.values())
    _, w2, _ = resident.resident_tensors(d)
    for n, v in w.items():
        if isinstance(v, tuple):
            assert np.array_equal(v[1], w2[n][1]) and np.array_equal(v[2], w2[n][2])


@pytest.mark.parametrize("dtype,weights", [("fp8", "fp8"), ("bfloat16", "bf16")])
def test_mapped_kv_b_proj_decodes_as_its_float32_copy(tmp_path, model, dtype, weights):
    # A kv_b_proj stored in the resident format is mapped (the absorbed decode reads its 1-2
    # byte weights: wlinear_rows_product, the GEMV, per-head dequantization); with mmap=False
    # it arrives as float32.
    # Both hold the same values, so decoding (the absorbed form) and speculative-verification-
    # sized calls give the same bits, and the float32 state equals the file's dequantization.
    d = saved(tmp_path, model, dtype)
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    _, w, plan = resident.resident_tensors(d, weights)
    assert isinstance(w[name], tuple) and w[name][0] == weights and plan.tensors[name][1]
    assert shares_file_map(w[name][1])
    _, w2, _ = resident.resident_tensors(d, weights, mmap=False)
    assert not isinstance(w2[name], tuple)
    mapped = dsv3.Model.from_pretrained(d, weights=weights)
    copied = dsv3.Model.from_pretrained(d, weights=weights, mmap=False)
    np.testing.assert_array_equal(mapped.state_dict()[name], reference(d)[name])
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, 12)
    for step in (1, 3):  # decode one token, and 3 at a time
        outs = []
        for m in (mapped, copied):
            c = m.new_cache(1, 16)
            outs.append(np.concatenate([m.forward(ids[None, i:i + step], c, start_pos=i)[0]
                                        for i in range(0, 12, step)]))
        np.testing.assert_array_equal(outs[0], outs[1])
    # and they are the logits of the float32 model of the file's values, to fp32 tolerance
    ref = dsv3.Model(model.config)
    ref.load_state_dict(reference(d))
    c = ref.new_cache(1, 16)
    want = np.concatenate([ref.forward(ids[None, i:i + 1], c, start_pos=i)[0] for i in range(12)])
    np.testing.assert_allclose(outs[0][:12], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def torch_quantize(w: np.ndarray):
    """DeepSeek's 128x128 block quantizer, written from the formula with torch: scale =
    max(amax, 1e-4) / 448 per block (fp32), codes = float8_e4m3fn(w / scale)."""
    torch = pytest.importorskip("torch")
    O, K = w.shape
    ob, kb = -(-O // 128), -(-K // 128)
    x = torch.zeros(ob * 128, kb * 128, dtype=torch.float32)
    x[:O, :K] = torch.from_numpy(w)
    blocks = x.reshape(ob, 128, kb, 128).abs().amax(dim=(1, 3))
    scale = torch.clamp(blocks, min=1e-4) / 448.0
    full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:O, :K]
    codes = (torch.from_numpy(w) / full).to(torch.float8_e4m3fn).view(torch.uint8)
    return codes.numpy(), scale.numpy()


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A bf16 and an fp32 checkpoint with matrices of several 128-row bands and partial
    blocks (make_checkpoint --tiny: hidden 256, intermediate 512, vocab 512)."""
    base = tmp_path_factory.mktemp("wide")
    cfg = make_checkpoint.config("moonlight_16b_a3b", tiny=True)
    bf = str(base / "bf16")
    make_checkpoint.write(bf, cfg, "bfloat16", 1 << 30, seed=5)
    m = dsv3.Model.from_pretrained(bf)
    f32 = str(base / "f32")
    m.save_pretrained(f32, dtype="float32")
    return bf, f32


@pytest.mark.parametrize("which", [0, 1])
def test_quantize_on_load_equals_full_tensor_quantizer(wide, which):
    d = wide[which]
    _, w, plan = resident.resident_tensors(d, "fp8")
    ref = reference(d)
    assert plan.weights == "fp8" and plan.transient_bytes > 0
    checked = 0
    for name, v in w.items():
        if not isinstance(v, tuple):
            assert np.array_equal(v, ref[name]), name
            continue
        if v[0] == "bf16":  # embedding / head: RNE of the stored value
            assert np.array_equal(v[1], st.bf16_bits(ref[name])), name
            continue
        assert v[0] == "fp8"
        codes, scales = torch_quantize(ref[name])
        assert np.array_equal(v[2], scales), name
        assert np.array_equal(v[1], codes), name
        checked += ref[name].shape[0] > 128
    assert checked >= 3  # several matrices of more than one band


def test_quantize_on_load_streams_in_bands(tmp_path):
    """Converting bf16 matrices of 4096 x 1024 to fp8 never holds one in fp32 (16 MiB): the
    numpy transients (tracemalloc) stay within the plan's few 128-row bands."""
    import tracemalloc
    cfg = make_checkpoint.config("moonlight_16b_a3b", tiny=True).replace(
        intermediate_size=4096, hidden_size=1024, num_hidden_layers=1)
    d = str(tmp_path / "ck")
    make_checkpoint.write(d, cfg, "bfloat16", 1 << 30)
    full = 4096 * cfg.hidden_size * 4
    tracemalloc.start()
    try:
        _, w, plan = resident.resident_tensors(d, "fp8")
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert w["model.layers.0.mlp.gate_proj.weight"][1].shape == (4096, cfg.hidden_size)
    assert plan.transient_bytes < full / 2
    assert peak - current <= plan.transient_bytes, (peak - current, plan.transient_bytes)


def test_fp32_to_bf16_is_rne(wide):
    d = wide[1]
    _, w, _ = resident.resident_tensors(d, "bf16")
    ref = reference(d)
    torch = pytest.importorskip("torch")
    for name, v in w.items():
        if isinstance(v, tuple):
            want = torch.from_numpy(ref[name]).to(torch.bfloat16).view(torch.int16).numpy()
            assert np.array_equal(v[1].view(np.int16), want), name


def test_fp8_to_bf16_and_fp32(tmp_path, model):
    d = saved(tmp_path, model, "fp8")
    ref = reference(d)
    _, w32, _ = resident.resident_tensors(d, "fp32")
    _, w16, _ = resident.resident_tensors(d, "bf16")
    torch = pytest.importorskip("torch")
    for name, v in w32.items():
        if isinstance(v, tuple):
            assert np.array_equal(v[1], ref[name]), name  # exact dequantization
            want = torch.from_numpy(ref[name]).to(torch.bfloat16).view(torch.int16).numpy()
            assert np.array_equal(w16[name][1].view(np.int16), want), name


def test_e5m2_checkpoint(tmp_path, model):
    d = saved(tmp_path, model, "fp8")
    tensors = st.read_dir(d)
    from dsv3 import fp8
    out = {}
    for n, t in tensors.items():
        if t.dtype == "F8_E4M3":
            codes, s = fp8.quantize(fp8.dequantize(np.array(t.data), tensors[n + "_scale_inv"]
                                                   .to_float32(), (128, 128)), "e5m2",
                                    block=(128, 128))
            out[n], out[n + "_scale_inv"] = ("F8_E5M2", codes), ("F32", s)
        elif n.endswith("_scale_inv"):
            continue
        else:
            out[n] = (t.dtype, np.array(t.data))
    st.write(os.path.join(d, "model.safetensors"), out)
    ref = reference(d)
    _, w, plan = resident.resident_tensors(d)
    assert plan.weights == "bf16"
    for n, v in w.items():
        if isinstance(v, tuple):
            assert v[0] == "bf16" and np.array_equal(v[1], st.bf16_bits(ref[n])), n
    _, w8, _ = resident.resident_tensors(d, "fp8")
    for n, v in w8.items():
        if isinstance(v, tuple) and v[0] == "fp8":
            codes, scales = torch_quantize(ref[n])
            assert np.array_equal(v[1], codes) and np.array_equal(v[2], scales), n


# ------------------------------------------------------------------ memory
@pytest.fixture(scope="module")
def big_fp8(tmp_path_factory):
    """~100 MB fp8 checkpoint (make_checkpoint: Moonlight's structure, hidden 1024)."""
    cfg = make_checkpoint.config("moonlight_16b_a3b", tiny=True).replace(
        hidden_size=1024, moe_intermediate_size=512, n_routed_experts=32, num_hidden_layers=3)
    d = str(tmp_path_factory.mktemp("big") / "ck")
    make_checkpoint.write(d, cfg, "fp8", 1 << 30, seed=1)
    return d


def test_mmap_load_adds_little_anonymous_memory(big_fp8):
    size = os.path.getsize(os.path.join(big_fp8, "model.safetensors"))
    assert size > 80e6
    before = rss_anon()
    _, w, plan = resident.resident_tensors(big_fp8)
    grown = rss_anon() - before
    assert plan.mapped_bytes > 0.95 * size
    assert grown < 0.1 * size, (grown, size)
    assert grown < plan.anonymous_bytes + plan.transient_bytes + (16 << 20)
    del w


@needs_res
def test_fp8_resident_model_adds_little_anonymous_memory(big_fp8):
    size = os.path.getsize(os.path.join(big_fp8, "model.safetensors"))
    before = rss_anon()
    m = dsv3.Model.from_pretrained(big_fp8, weights="auto")
    grown = rss_anon() - before
    assert grown < 0.1 * size, (grown, size)
    assert set(m.weight_formats().values()) >= {"fp8", "bf16"}
    assert m.resident_bytes() > 0.95 * size
    logits = m.forward(np.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, m.config.vocab_size) and np.isfinite(logits).all()


def test_memory_refusal(tmp_path, model, monkeypatch):
    d = saved(tmp_path, model, "fp8")
    monkeypatch.setattr(_memory, "UNCHECKED", 0)
    monkeypatch.setattr(_memory, "available", lambda: (1000, "a test limit"))
    with pytest.raises(_memory.MemoryBudgetError, match="anonymous") as e:
        resident.resident_tensors(d, "fp32")
    assert "a test limit" in str(e.value)
    # the plan counts mapped bytes apart: an own-format load needs only the small tensors
    _, stored = resident.inspect(d)
    p = resident.plan(dsv3.Config.tiny(), stored, None)
    assert p.anonymous_bytes < p.mapped_bytes


def test_bad_weights_value(tmp_path, model):
    d = saved(tmp_path, model, "fp8")
    with pytest.raises(ValueError, match="weights"):
        resident.resident_tensors(d, "int4")
    with pytest.raises(ValueError, match="weights"):
        dsv3.Model.from_pretrained(d, weights="fp16")


# ------------------------------------------------------------------ rope_interleave false
def test_rope_halves_permuted(tmp_path):
    cfg = dsv3.Config.tiny().replace(rope_interleave=False)
    m = dsv3.Model(cfg, seed=2)
    for dtype, own in (("fp8", "fp8"), ("bfloat16", "bf16")):
        d = str(tmp_path / dtype)
        m.save_pretrained(d, dtype=dtype)
        ref = reference(d)
        _, w, plan = resident.resident_tensors(d)
        assert plan.weights == own
        got = resident.dequantized(w)
        for n in ref:
            if n in got:
                assert np.array_equal(got[n], ref[n]), n
        q = "model.layers.0.self_attn.q_b_proj.weight"
        assert not plan.tensors[q][1] and not shares_file_map(w[q][1])


def test_rope_rows_across_scale_blocks_refused(tmp_path):
    cfg = dsv3.Config.tiny().replace(rope_interleave=False, qk_nope_head_dim=120,
                                     qk_rope_head_dim=16)
    m = dsv3.Model(cfg, seed=2)
    d = str(tmp_path / "ck")
    m.save_pretrained(d, dtype="fp8")
    with pytest.raises(ValueError, match="128-row scale blocks.*bf16"):
        resident.resident_tensors(d, "fp8")
    _, w, _ = resident.resident_tensors(d, "fp32")
    ref = reference(d)
    assert all(np.array_equal(resident.dequantized(w)[n], ref[n]) for n in w)


# ------------------------------------------------------------------ corrupt files
def _header(path):
    with open(path, "rb") as f:
        blob = f.read()
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _write_raw(path, header, data):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


W = "model.layers.1.mlp.experts.0.up_proj.weight"


def _retensor(d, edit):
    """Rewrite model.safetensors of ``d`` after ``edit({name: (dtype, array)})``."""
    path = os.path.join(d, "model.safetensors")
    t = {n: (x.dtype, np.array(x.data)) for n, x in st.read_dir(d).items()}
    edit(t)
    st.write(path, t)


def corruptions():
    def truncated(d, p):
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) - 100)

    def past_eof(d, p):
        h, data = _header(p)
        b, e = h[W]["data_offsets"]
        h[W]["data_offsets"] = [len(data) + 8, len(data) + 8 + (e - b)]
        _write_raw(p, h, data)

    def overlap(d, p):
        h, data = _header(p)
        other = "model.layers.1.mlp.experts.0.gate_proj.weight"
        h[W]["data_offsets"] = list(h[other]["data_offsets"])
        _write_raw(p, h, data)

    def misaligned(d, p):
        h, data = _header(p)
        for k, v in h.items():
            if k != "__metadata__":
                v["data_offsets"] = [v["data_offsets"][0] + 1, v["data_offsets"][1] + 1]
        _write_raw(p, h, b"\0" + data)

    def wrong_dtype(d, p):
        h, data = _header(p)
        h[W]["dtype"] = "U8"
        _write_raw(p, h, data)

    def length_mismatch(d, p):
        h, data = _header(p)
        h[W]["shape"] = [h[W]["shape"][0] + 1, h[W]["shape"][1]]
        _write_raw(p, h, data)

    def shape_mismatch(d, p):
        h, data = _header(p)
        h[W]["shape"] = h[W]["shape"][::-1]
        _write_raw(p, h, data)

    def scale_shape(d, p):
        _retensor(d, lambda t: t.__setitem__(W + "_scale_inv",
                                             ("F32", np.ones((2, 1), np.float32))))

    def nan_scale(d, p):
        def edit(t):
            s = t[W + "_scale_inv"][1].copy()
            s[0, 0] = np.nan
            t[W + "_scale_inv"] = ("F32", s)
        _retensor(d, edit)

    def nan_code(d, p):
        def edit(t):
            c = t[W][1].copy()
            c[3, 5] = 0x7F
            t[W] = ("F8_E4M3", c)
        _retensor(d, edit)

    def no_scale(d, p):
        _retensor(d, lambda t: t.pop(W + "_scale_inv"))

    return [("truncated shard", truncated, r"outside the data section"),
            ("offsets past EOF", past_eof, r"outside the data section"),
            ("overlap", overlap, r"overlap"),
            ("misaligned", misaligned, r"misaligned"),
            ("wrong dtype", wrong_dtype, r"do not match dtype|float type"),
            ("length mismatch", length_mismatch, r"do not match"),
            ("shape mismatch", shape_mismatch, r"layout expects"),
            ("scale shape", scale_shape, r"_scale_inv' has shape"),
            ("NaN scale", nan_scale, r"NaN"),
            ("NaN code", nan_code, r"NaN"),
            ("no scale", no_scale, r"has no")]


@pytest.mark.parametrize("what,corrupt,msg", corruptions(),
                         ids=[c[0].replace(" ", "_") for c in corruptions()])
def test_corrupt_single_file_raises_naming_file_and_tensor(tmp_path, model, what, corrupt, msg):
    d = saved(tmp_path, model, "fp8")
    p = os.path.join(d, "model.safetensors")
    corrupt(d, p)
    with pytest.raises(ValueError, match=msg) as e:
        resident.resident_tensors(d)
    text = str(e.value)
    assert "model.safetensors" in text, text
    tensor = "tensor" if what in ("truncated shard", "overlap", "misaligned") else W
    assert tensor in text, text
    if what == "misaligned":  # a copy needs no alignment
        _, w, _ = resident.resident_tensors(d, mmap=False)
        assert np.array_equal(resident.dequantized(w)[W], reference(d)[W])


def test_wrong_dtype_same_length_raises(tmp_path, model):
    d = saved(tmp_path, model, "float32")
    p = os.path.join(d, "model.safetensors")
    h, data = _header(p)
    h[W]["dtype"] = "I32"
    _write_raw(p, h, data)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor '.*up_proj.weight': dtype "
                                         r"I32, expected a float type"):
        resident.resident_tensors(d)


def test_nan_in_mapped_bf16_weight(tmp_path, model):
    d = saved(tmp_path, model, "bfloat16")

    def edit(t):
        c = t[W][1].copy()
        c[1, 1] = 0x7FC0
        t[W] = ("BF16", c)
    _retensor(d, edit)
    with pytest.raises(ValueError, match=f"model.safetensors: tensor '{W}' holds 1 NaN"):
        resident.resident_tensors(d)


def _index(d):
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        return json.load(f)


def _set_index(d, idx):
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump(idx, f)


def test_index_consistency(tmp_path, model):
    d = saved(tmp_path, model, "fp8", sharded=True)
    good = _index(d)
    shards = sorted(set(good["weight_map"].values()))
    assert len(shards) >= 2
    idx = json.loads(json.dumps(good))
    idx["weight_map"][W] = "model-00099-of-00099.safetensors"
    _set_index(d, idx)
    with pytest.raises(ValueError, match=rf"index.json names shard model-00099.*'{W}'.*missing"):
        resident.resident_tensors(d)
    idx = json.loads(json.dumps(good))
    idx["weight_map"]["model.layers.0.ghost.weight"] = shards[0]
    _set_index(d, idx)
    with pytest.raises(ValueError, match=r"not found in their shards.*ghost.*" + shards[0]):
        resident.resident_tensors(d)
    idx = json.loads(json.dumps(good))
    shard = idx["weight_map"].pop(W)
    _set_index(d, idx)
    with pytest.raises(ValueError, match=rf"{shard}: tensor '{W}' is not indexed"):
        resident.resident_tensors(d)
    idx = json.loads(json.dumps(good))
    other = next(s for s in shards if s != shard)
    idx["weight_map"][W] = other
    _set_index(d, idx)
    with pytest.raises(ValueError, match=rf"'{W}' is not indexed to this shard"):
        resident.resident_tensors(d)
    _set_index(d, good)
    resident.resident_tensors(d)


def test_missing_and_unexpected_tensors(tmp_path, model):
    d = saved(tmp_path, model, "fp8")
    _retensor(d, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(KeyError, match="model.norm.weight"):
        resident.resident_tensors(d)


def test_ue8m0_scales_checked(tmp_path):
    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
          "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}
    m = dsv3.Model(dsv3.Config.tiny().replace(quantization_config=qc), seed=1)
    d = str(tmp_path / "ck")
    m.save_pretrained(d, dtype="fp8")
    resident.resident_tensors(d)

    def edit(t):
        s = t[W + "_scale_inv"][1] * np.float32(1.5)
        t[W + "_scale_inv"] = ("F32", s)
    _retensor(d, edit)
    with pytest.raises(ValueError, match="powers of two"):
        resident.resident_tensors(d)


# ------------------------------------------------------------------ mapped files replaced
def test_overwrite_by_save_keeps_mapped_weights(tmp_path, model):
    d = saved(tmp_path, model, "fp8", name="live")
    _, w, _ = resident.resident_tensors(d)
    before = {n: (v[1].copy(), None if v[2] is None else np.array(v[2]))
              for n, v in w.items() if isinstance(v, tuple)}
    dsv3.Model(dsv3.Config.tiny(), seed=99).save_pretrained(d, dtype="fp8")
    for n, (data, s) in before.items():
        assert np.array_equal(w[n][1], data), n
        assert s is None or np.array_equal(w[n][2], s), n
    _, w2, _ = resident.resident_tensors(d)
    assert not np.array_equal(w2[W][1], w[W][1])  # the new checkpoint is a different model


@needs_res
def test_overwrite_by_save_keeps_logits(tmp_path, model):
    d = saved(tmp_path, model, "fp8", name="live")
    live = dsv3.Model.from_pretrained(d, weights="auto")
    toks = np.array([[1, 5, 9, 2, 7]])
    want = live.forward(toks)
    dsv3.Model(dsv3.Config.tiny(), seed=99).save_pretrained(d, dtype="fp8")
    assert np.array_equal(live.forward(toks), want)
    assert not np.allclose(dsv3.Model.from_pretrained(d, weights="auto").forward(toks), want)


# ------------------------------------------------------------------ the resident model
@needs_res
@pytest.mark.parametrize("dtype", ["fp8", "bfloat16", "float32"])
def test_resident_logits_equal_fp32_of_dequantized(tmp_path, model, dtype):
    from conftest import assert_close
    d = saved(tmp_path, model, dtype)
    res = dsv3.Model.from_pretrained(d, weights="auto")
    ref = dsv3.Model.from_pretrained(d)  # fp32 slab of the same decoded weights
    toks = np.array([[1, 5, 9, 2, 7, 3, 3, 8]])
    assert_close(f"{dtype} resident logits", res.forward(toks), ref.forward(toks),
                 rtol=1e-4, atol=1e-5)
    fmts = res.weight_formats()
    own = {"fp8": "fp8", "bfloat16": "bf16", "float32": "fp32"}[dtype]
    assert fmts[W] == own


# ------------------------------------------------------------------ make_checkpoint
def test_make_checkpoint_tiny_loads(tmp_path):
    out = str(tmp_path / "v2lite")
    r = subprocess.run([sys.executable, MAKE, out, "--model", "deepseek_v2_lite", "--dtype",
                        "fp8", "--tiny", "--shard-gb", "0.001"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    idx = _index(out)
    assert len(set(idx["weight_map"].values())) >= 2
    cfg, w, plan = resident.resident_tensors(out)
    assert plan.weights == "fp8" and cfg.q_lora_rank in (None, 0) and cfg.scoring_func == "softmax"
    want = make_checkpoint.config("deepseek_v2_lite", tiny=True)
    from dsv3 import _core
    assert {n: tuple(s) for n, s in _core.param_layout(want)} == \
        {n: (v[1].shape if isinstance(v, tuple) else v.shape) for n, v in w.items()}
    ref = reference(out)
    got = resident.dequantized(w)
    assert all(np.array_equal(got[n], ref[n]) for n in w)
    # the real dims (from the presets), counted without writing them
    assert dsv3.Config.deepseek_v2_lite().num_parameters() == 15_706_484_224
    lay = resident.layout_stored(dsv3.Config.moonlight_16b_a3b(), "fp8")
    assert lay["model.embed_tokens.weight"] == ("BF16", (163840, 2048))
    assert lay["model.layers.1.mlp.experts.63.down_proj.weight"] == ("F8_E4M3", (2048, 1408))
    assert lay["model.layers.1.mlp.experts.63.down_proj.weight_scale_inv"] == ("F32", (16, 11))
    assert lay["model.layers.0.mlp.gate_proj.weight"] == ("F8_E4M3", (11264, 2048))
    assert lay["model.layers.1.mlp.gate.e_score_correction_bias"] == ("F32", (64,))
