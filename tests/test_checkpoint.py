"""save_pretrained / from_pretrained: every dtype round-trips (fp8 within its quantisation
error), sharding, compatibility with the `safetensors` package, DeepSeek-V3's own layout,
corrupt and truncated files, and saves that fail midway."""
import json
import os

import numpy as np
import pytest

import dsv3
from dsv3 import checkpoint, safetensors_io as st


@pytest.fixture
def model():
    return dsv3.Model(dsv3.Config.tiny(), seed=3)


def tokens(cfg, n=9):
    return np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, n))


def test_float32_round_trip_identical(tmp_path, model):
    model.save_pretrained(tmp_path / "ck")
    files = sorted(os.listdir(tmp_path / "ck"))
    assert files == ["config.json", "model.safetensors"]
    back = dsv3.Model.from_pretrained(tmp_path / "ck")
    want = dict(model.config.to_dict(), quantization_config=None, dtype="float32")
    assert back.config.to_dict() == want
    t = tokens(model.config)
    assert np.array_equal(back.forward(t), model.forward(t))
    sd, sd2 = model.state_dict(), back.state_dict()
    assert all(np.array_equal(sd[k], sd2[k]) for k in sd)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]
    # loading starts from a model without the random draw (all 0) and writes every weight:
    # the identical state above covers the ones (norms) and the zeros (biases) too
    blank = dsv3.Model(model.config, _random_init=False).state_dict()
    assert not any(v.any() for v in blank.values())


def test_bfloat16_round_trip(tmp_path, model):
    model.save_pretrained(tmp_path / "bf", dtype="bfloat16")
    back = dsv3.Model.from_pretrained(tmp_path / "bf")
    sd, sd2 = model.state_dict(), back.state_dict()
    for k in sd:  # bf16 keeps 8 significand bits: relative error <= 2^-9
        assert np.all(np.abs(sd2[k] - sd[k]) <= np.abs(sd[k]) * 2.0 ** -8 + 1e-30), k
    t = tokens(model.config)
    assert np.abs(back.forward(t) - model.forward(t)).max() < 0.05


def test_fp8_layout_and_round_trip(tmp_path, model):
    model.save_pretrained(tmp_path / "f8", dtype="fp8")
    cfg = json.loads((tmp_path / "f8" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    stored, _ = st.read(str(tmp_path / "f8" / "model.safetensors"))
    q = "model.layers.1.mlp.experts.3.up_proj.weight"
    assert stored[q].dtype == "F8_E4M3" and stored[q + "_scale_inv"].shape == (1, 1)
    # DeepSeek-V3's released layout, name by name (written out here, not derived from the code)
    fp8 = ["model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.q_b_proj.weight",
           "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
           "model.layers.0.self_attn.kv_b_proj.weight", "model.layers.0.self_attn.o_proj.weight",
           "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
           "model.layers.1.mlp.experts.0.gate_proj.weight",
           "model.layers.1.mlp.shared_experts.up_proj.weight",
           "model.layers.2.self_attn.o_proj.weight", "model.layers.2.mlp.experts.7.down_proj.weight"]
    bf16 = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.1.mlp.gate.weight", "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.q_a_layernorm.weight",
            "model.layers.0.self_attn.kv_a_layernorm.weight", "model.layers.2.eh_proj.weight",
            "model.layers.2.enorm.weight", "model.layers.2.shared_head.norm.weight"]
    for n in fp8:
        assert stored[n].dtype == "F8_E4M3" and stored[n + "_scale_inv"].dtype == "F32", n
    for n in bf16:
        assert stored[n].dtype == "BF16" and n + "_scale_inv" not in stored, n
    for n in ("model.layers.1.mlp.gate.e_score_correction_bias",
              "model.layers.2.mlp.gate.e_score_correction_bias"):
        assert stored[n].dtype == "F32", n
    back = dsv3.Model.from_pretrained(tmp_path / "f8")
    sd, sd2 = model.state_dict(), back.state_dict()
    for k in sd:
        if checkpoint.is_fp8_linear(k, sd[k].shape):
            # e4m3: 3 mantissa bits -> relative error <= 2^-4 of the block's scale range
            amax = np.abs(sd[k]).max()
            assert np.abs(sd2[k] - sd[k]).max() <= amax * 2.0 ** -4, k
    t = tokens(model.config)
    a, b = model.forward(t), back.forward(t)
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()


def test_sharded_and_package_compat(tmp_path, model):
    model.save_pretrained(tmp_path / "sh", max_shard_bytes=100_000)
    files = os.listdir(tmp_path / "sh")
    assert "model.safetensors.index.json" in files and len(files) > 3
    back = dsv3.Model.from_pretrained(tmp_path / "sh")
    t = tokens(model.config)
    assert np.array_equal(back.forward(t), model.forward(t))
    sf = pytest.importorskip("safetensors.numpy")
    model.save_pretrained(tmp_path / "one")
    loaded = sf.load_file(str(tmp_path / "one" / "model.safetensors"))
    sd = model.state_dict()
    assert set(loaded) == set(sd) and all(np.array_equal(loaded[k], sd[k]) for k in sd)
    # bf16 and fp8 files load in the package (through torch) with the same values
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file
    for dt in ("bfloat16", "fp8"):
        model.save_pretrained(tmp_path / dt, dtype=dt)
        ours = dsv3.Model.from_pretrained(tmp_path / dt).state_dict()
        pk = load_file(str(tmp_path / dt / "model.safetensors"))
        for k, v in sd.items():
            t = pk[k]
            if t.dtype == torch.float8_e4m3fn:  # value = code * scale_inv (one 128x128 block)
                val = t.float().numpy() * pk[k + "_scale_inv"].numpy()[0, 0]
            else:
                val = t.float().numpy()
            assert np.array_equal(val, ours[k]), (dt, k)


def test_deepseek_style_checkpoint(tmp_path, model):
    """A checkpoint shaped like DeepSeek-V3's release: FP8 codes + scale_inv written by the
    safetensors package, BF16 others, the MTP layer's copies of embedding and head."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        if (".self_attn." in k or ".mlp." in k) and v.ndim == 2 and not k.endswith("mlp.gate.weight"):
            codes, scales = dsv3.fp8.quantize(v, "e4m3", block=(128, 128))
            out[k] = torch.from_numpy(codes).view(torch.float8_e4m3fn)
            out[k + "_scale_inv"] = torch.from_numpy(scales)
        elif k.endswith("e_score_correction_bias"):
            out[k] = torch.from_numpy(v)
        else:
            out[k] = torch.from_numpy(v).to(torch.bfloat16)
    mtp = f"model.layers.{model.config.num_hidden_layers}."
    out[mtp + "embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
    out[mtp + "shared_head.head.weight"] = out["lm_head.weight"].clone()
    d = tmp_path / "ds"
    d.mkdir()
    save_file(out, str(d / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                  "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    (d / "config.json").write_text(json.dumps(cfg))
    back = dsv3.Model.from_pretrained(d)
    k = "model.layers.0.self_attn.kv_b_proj.weight"
    codes, scales = dsv3.fp8.quantize(sd[k], "e4m3", block=(128, 128))
    want = dsv3.fp8.decode(codes, "e4m3") * scales[0, 0]
    assert np.array_equal(back.state_dict()[k], want)


def test_corrupt_and_truncated(tmp_path, model):
    model.save_pretrained(tmp_path / "c")
    p = tmp_path / "c" / "model.safetensors"
    good = p.read_bytes()
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="truncated"):
        dsv3.Model.from_pretrained(tmp_path / "c")
    p.write_bytes(good[:8] + b"x" * 20 + good[28:])
    with pytest.raises(ValueError, match="safetensors"):
        dsv3.Model.from_pretrained(tmp_path / "c")
    p.write_bytes(good)
    cfgp = tmp_path / "c" / "config.json"
    cfg = json.loads(cfgp.read_text())
    cfg["hidden_size"] = 64
    cfgp.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="must have shape"):
        dsv3.Model.from_pretrained(tmp_path / "c")
    with pytest.raises(FileNotFoundError):
        dsv3.Model.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="dtype"):
        model.save_pretrained(tmp_path / "x", dtype="int4")


def test_failed_save_keeps_previous_checkpoint(tmp_path, model, monkeypatch):
    model.save_pretrained(tmp_path / "keep")
    before = (tmp_path / "keep" / "model.safetensors").read_bytes()
    other = dsv3.Model(model.config, seed=9)

    def boom(*a, **k):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(checkpoint, "publish_dir", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        other.save_pretrained(tmp_path / "keep")
    assert (tmp_path / "keep" / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep"]
    monkeypatch.undo()
    other.save_pretrained(tmp_path / "keep")  # overwrite works (atomic exchange)
    back = dsv3.Model.from_pretrained(tmp_path / "keep")
    t = tokens(model.config)
    assert np.array_equal(back.forward(t), other.forward(t))
    assert sorted(os.listdir(tmp_path)) == ["keep"]


def test_info_cli_on_checkpoint(tmp_path, model):
    import subprocess
    import sys
    model.save_pretrained(tmp_path / "ck")
    r = subprocess.run([sys.executable, "-m", "dsv3", "info", str(tmp_path / "ck"), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["parameters"]["total"] == model.config.num_parameters()
