"""The safetensors reader/writer: compatibility with the `safetensors` package both ways,
bf16 rounding vs PyTorch, sharding, atomic writes, corrupt and truncated files."""
import json
import os
import struct

import numpy as np
import pytest

from dsv3 import safetensors_io as st
from conftest import get_torch


def sample(rng):
    return {"a.weight": rng.standard_normal((3, 5)).astype(np.float32),
            "b.bias": rng.standard_normal(7).astype(np.float32),
            "ids": np.arange(4, dtype=np.int64),
            "scalar": np.array(2.5, dtype=np.float32),
            "empty": np.zeros((0, 3), dtype=np.float32)}


def test_round_trip_and_package_compat(tmp_path, rng):
    sf = pytest.importorskip("safetensors.numpy")
    t = sample(rng)
    p = str(tmp_path / "x.safetensors")
    st.write(p, {k: (st.numpy_dtype_name(v), v) for k, v in t.items()}, {"format": "np"})
    back = sf.load_file(p)
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and np.array_equal(back[k], t[k]), k
    p2 = str(tmp_path / "y.safetensors")
    sf.save_file(t, p2, metadata={"k": "v"})
    ours, meta = st.read(p2)
    assert meta == {"k": "v"}
    for k in t:
        assert np.array_equal(ours[k].data, t[k]), k
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_bf16_matches_torch(tmp_path, rng):
    torch = get_torch()
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 1e3,
                        np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, 1e-40, -1e-45],
                                 dtype=np.float32)])
    want = torch.tensor(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(st.bf16_bits(x), want)
    nan = st.bf16_to_f32(st.bf16_bits(np.array([np.nan], np.float32)))
    assert np.isnan(nan).all()
    from safetensors.torch import save_file
    p = str(tmp_path / "bf.safetensors")
    save_file({"w": torch.tensor(x[:100]).to(torch.bfloat16)}, p)
    got = st.read(p)[0]["w"]
    assert got.dtype == "BF16"
    assert np.array_equal(got.to_float32(), torch.tensor(x[:100]).to(torch.bfloat16).float().numpy())


def test_sharding(tmp_path, rng):
    t = {f"t{i}": rng.standard_normal(100).astype(np.float32) for i in range(10)}
    files = st.write_sharded(str(tmp_path), {k: ("F32", v) for k, v in t.items()}, 1000)
    assert "model.safetensors.index.json" in files and len(files) == 6
    idx = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert idx["metadata"]["total_size"] == 4000 and set(idx["weight_map"]) == set(t)
    back = st.read_dir(str(tmp_path))
    assert all(np.array_equal(back[k].data, t[k]) for k in t)
    os.remove(tmp_path / files[0])
    with pytest.raises(ValueError, match="missing"):
        st.read_dir(str(tmp_path))


def corrupt_variants(good: bytes):
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8:8 + n])
    yield "truncated data", good[:-3]
    yield "truncated header", good[:8 + n // 2]
    yield "tiny", good[:5]
    yield "huge header length", struct.pack("<Q", 1 << 40) + good[8:]
    yield "bad json", good[:8] + b"[" + good[9:]
    h = dict(header)
    h["a.weight"] = dict(h["a.weight"], data_offsets=[0, 8])
    yield "size mismatch", encode(h, good[8 + n:])
    h = dict(header)
    h["b.bias"] = dict(h["b.bias"], data_offsets=[0, 28])
    yield "overlap", encode(h, good[8 + n:])
    h = dict(header)
    h["a.weight"] = dict(h["a.weight"], dtype="Q99")
    yield "dtype", encode(h, good[8 + n:])


def encode(header, data):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_corrupt_files_raise_value_error(tmp_path, rng):
    t = {"a.weight": rng.standard_normal((3, 5)).astype(np.float32),
         "b.bias": rng.standard_normal(7).astype(np.float32)}
    p = tmp_path / "g.safetensors"
    st.write(str(p), {k: ("F32", v) for k, v in t.items()})
    good = p.read_bytes()
    for what, blob in corrupt_variants(good):
        q = tmp_path / f"bad-{what.replace(' ', '_')}.safetensors"
        q.write_bytes(blob)
        with pytest.raises(ValueError, match="safetensors"):
            st.read(str(q))
            pytest.fail(f"corrupt file ({what}) was read without error")


def test_failed_write_leaves_previous_file(tmp_path, rng, monkeypatch):
    p = str(tmp_path / "m.safetensors")
    st.write(p, {"w": ("F32", np.ones(4, np.float32))})
    before = (tmp_path / "m.safetensors").read_bytes()

    class Boom(Exception):
        pass

    def explode(*a, **k):
        raise Boom()

    monkeypatch.setattr(os, "fsync", explode)
    with pytest.raises(Boom):
        st.write(p, {"w": ("F32", np.zeros(4, np.float32))})
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]
