"""dsv3 against transformers' own DeepseekV3 / DeepseekV2 models, both directions:
checkpoints transformers writes load in dsv3 with the same logits (full, cached, greedy), and
everything dsv3 writes opens with AutoConfig / AutoModelForCausalLM with the same logits and
reads back into dsv3 bit-identically. Tiny random models built from configs; nothing is
downloaded."""
import json

import numpy as np
import pytest

import dsv3
from hf_helpers import (hf_greedy, hf_logits, load_hf, quiet, random_model, save_hf, torch,
                        transformers, v2_config, v3_config)

TOKENS = np.array([3, 17, 5, 60, 22, 9, 41, 8, 33, 1, 57, 12], np.int64)
LOGIT_TOL = 1e-4

HF_CASES = {
    "v3-yarn": lambda: v3_config(),
    # rope dim 8: the halves<->pairs permutation is not its own inverse (it is for dim 4)
    "v3-halves-noqlora": lambda: v3_config(rope_interleave=False, q_lora_rank=None,
                                           qk_rope_head_dim=8),
    "v3-no-yarn-theta": lambda: v3_config(rope_parameters={"rope_type": "default",
                                                           "rope_theta": 50000.0}),
    "v3-one-group": lambda: v3_config(n_group=1, topk_group=1),
    "v2-greedy": lambda: v2_config(),
    "v2-group-limited": lambda: v2_config(topk_method="group_limited_greedy", n_group=4,
                                          topk_group=2, q_lora_rank=None),
}


def _load_dsv3(directory, config):
    if getattr(config, "num_nextn_predict_layers", 0):
        # transformers defaults num_nextn_predict_layers to 1 but saves no MTP weights
        with pytest.warns(UserWarning, match="MTP disabled"):
            return dsv3.Model.from_pretrained(directory)
    return dsv3.Model.from_pretrained(directory)


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_transformers_checkpoint_loads_with_same_logits(tmp_path, case):
    config = HF_CASES[case]()
    ref = random_model(config)
    save_hf(ref, tmp_path / "hf")
    m = _load_dsv3(tmp_path / "hf", config)
    assert m.config.num_nextn_predict_layers == 0
    want = hf_logits(ref, TOKENS)
    got = m.forward(TOKENS)
    assert np.abs(got - want).max() < LOGIT_TOL, case
    # cached decoding: a 5-token prefill then one token at a time (absorbed MLA)
    cache = m.new_cache(batch=1, max_len=32)
    rows = [m.forward(TOKENS[None, :5], cache=cache, start_pos=0)[0]]
    rows += [m.forward(TOKENS[None, i:i + 1], cache=cache, start_pos=i)[0]
             for i in range(5, len(TOKENS))]
    assert np.abs(np.concatenate(rows) - want).max() < LOGIT_TOL, case
    # greedy generation, token for token
    n = 10
    assert m.generate(TOKENS[:4], max_new_tokens=n).tokens.tolist() == \
        hf_greedy(ref, TOKENS[:4], n), case


def test_transformers_bfloat16_checkpoint(tmp_path):
    ref = random_model(v3_config()).to(torch.bfloat16)
    save_hf(ref, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    m = _load_dsv3(tmp_path / "hf", ref.config)
    # reloaded, not ref.float(): .to(bfloat16) also rounded ref's rope inv_freq buffer
    want = hf_logits(load_hf(tmp_path / "hf"), TOKENS)
    assert np.abs(m.forward(TOKENS) - want).max() < LOGIT_TOL


def test_mtp_less_warning_points_at_the_caller(tmp_path):
    save_hf(random_model(v3_config()), tmp_path / "hf")
    with pytest.warns(UserWarning, match="MTP disabled") as record:
        dsv3.Model.from_pretrained(tmp_path / "hf")
    assert record[0].filename == __file__


def test_strict_load_refuses_missing_mtp(tmp_path):
    save_hf(random_model(v3_config()), tmp_path / "hf")
    with pytest.raises(KeyError, match="missing keys"):
        dsv3.Model.from_pretrained(tmp_path / "hf", strict=True)


def test_rope_interleave_false_is_a_permutation(tmp_path):
    """The halves layout loads into dsv3's pairs and saves back to the same bytes."""
    ref = random_model(v3_config(rope_interleave=False))
    save_hf(ref, tmp_path / "hf")
    m = _load_dsv3(tmp_path / "hf", ref.config)
    m.save_pretrained(tmp_path / "again")
    again = load_hf(tmp_path / "again")
    assert again.config.rope_interleave is False
    theirs = ref.state_dict()
    for k, v in again.state_dict().items():
        if k in theirs:
            assert torch.equal(v, theirs[k]), k


def _dsv3_model(**changes):
    cfg = dsv3.Config.tiny().replace(
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        **changes)
    m = dsv3.Model(cfg, seed=3)
    rng = np.random.default_rng(3)
    sd = {k: (v + rng.standard_normal(v.shape).astype(np.float32) *
              (0.05 if "bias" in k else 0.2)).astype(np.float32)
          for k, v in m.state_dict().items()}
    m.load_state_dict(sd)
    return m


DSV3_CASES = {
    "v3": {},
    "v3-halves": {"rope_interleave": False},
    "v3-noqlora-halves": {"q_lora_rank": 0, "rope_interleave": False, "qk_rope_head_dim": 8},
    "v2-softmax": {"topk_method": "group_limited_greedy", "scoring_func": "softmax",
                   "norm_topk_prob": False, "routed_scaling_factor": 1.0},
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", sorted(DSV3_CASES))
def test_dsv3_checkpoint_opens_with_automodel(tmp_path, case, dtype):
    m = _dsv3_model(**DSV3_CASES[case])
    m.save_pretrained(tmp_path / "ck", dtype=dtype)
    written = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert written["dtype"] == dtype and "torch_dtype" not in written
    auto = transformers.AutoConfig.from_pretrained(str(tmp_path / "ck"))
    want_type = "deepseek_v2" if case.startswith("v2") else "deepseek_v3"
    assert auto.model_type == want_type
    assert auto.architectures == [{"deepseek_v2": "DeepseekV2ForCausalLM",
                                   "deepseek_v3": "DeepseekV3ForCausalLM"}[want_type]]
    hf = load_hf(tmp_path / "ck")
    back = dsv3.Model.from_pretrained(tmp_path / "ck")
    assert np.abs(back.forward(TOKENS) - hf_logits(hf, TOKENS)).max() < LOGIT_TOL
    if dtype == "float32":  # bit-identical round trip; greedy generation token for token
        sd, sd2 = m.state_dict(), back.state_dict()
        assert all(np.array_equal(sd[k], sd2[k]) for k in sd)
        assert back.generate(TOKENS[:4], max_new_tokens=10).tokens.tolist() == \
            hf_greedy(hf, TOKENS[:4], 10)
    # transformers' own re-save (it keeps no MTP layer) reads back into dsv3 bit-identically
    save_hf(hf, tmp_path / "resaved")
    again = _load_dsv3(tmp_path / "resaved", hf.config).state_dict()
    sd = back.state_dict()
    assert again and all(np.array_equal(v, sd[k]) for k, v in again.items())
    assert set(sd) - set(again) == {k for k in sd if k.startswith("model.layers.2.")}


def _fp8_reference(directory, block=128):
    """The float32 weights an FP8 checkpoint means (semantics §2.6: w = q * scale_inv per 128x128
    block, partial blocks at the edges), decoded with torch, independently of dsv3."""
    from safetensors.torch import load_file
    raw = load_file(str(directory / "model.safetensors"))
    out = {}
    for k, v in raw.items():
        if k.endswith("_scale_inv"):
            continue
        if v.dtype == torch.float8_e4m3fn:
            s = raw[k + "_scale_inv"].float()
            s = s.repeat_interleave(block, 0).repeat_interleave(block, 1)
            out[k] = v.float() * s[:v.shape[0], :v.shape[1]]
        else:
            out[k] = v.float()
    return out


@pytest.mark.parametrize("hidden", [48, 136])
def test_fp8_checkpoint_opens_with_automodel(tmp_path, hidden):
    """hidden 48: every weight is one partial 128x128 block. hidden 136: blocks of 128 + 8
    columns, where transformers 5.23's dequantizer is wrong (it infers the block as
    dim // grid = 68 instead of the config's 128); there the transformers model is given the
    correctly dequantized weights instead of copying its mistake."""
    m = _dsv3_model(hidden_size=hidden)
    m.save_pretrained(tmp_path / "f8", dtype="fp8")
    assert transformers.AutoConfig.from_pretrained(
        str(tmp_path / "f8")).quantization_config["weight_block_size"] == [128, 128]
    ref = _fp8_reference(tmp_path / "f8")
    back = dsv3.Model.from_pretrained(tmp_path / "f8")
    sd = back.state_dict()
    for k, v in ref.items():
        if k in sd:
            assert np.array_equal(sd[k], v.numpy()), k
    hf = load_hf(tmp_path / "f8")  # transformers dequantizes FP8 to bf16 on a CPU
    theirs = hf.state_dict()
    name = "model.layers.0.self_attn.q_a_proj.weight"
    ok = torch.equal(theirs[name], ref[name].bfloat16().float())
    assert ok == (hidden == 48), "transformers' FP8 dequantizer changed: revisit this test"
    # a transformers model holding exactly the checkpoint's weights: same logits
    from safetensors.torch import save_file
    (tmp_path / "exact").mkdir()
    save_file(ref, str(tmp_path / "exact" / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "f8" / "config.json").read_text())
    del cfg["quantization_config"]
    cfg["dtype"] = "float32"  # else transformers rounds the weights to bf16 on loading
    (tmp_path / "exact" / "config.json").write_text(json.dumps(cfg))
    want = hf_logits(load_hf(tmp_path / "exact"), TOKENS)
    assert np.abs(back.forward(TOKENS) - want).max() < LOGIT_TOL
    m2 = dsv3.Model.from_pretrained(tmp_path / "f8")
    m2.save_pretrained(tmp_path / "f8b", dtype="fp8")  # requantizing dequantized weights
    again = dsv3.Model.from_pretrained(tmp_path / "f8b")
    assert all(np.array_equal(v, again.state_dict()[k]) for k, v in sd.items())


def test_ue8m0_scales(tmp_path):
    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
          "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}
    m = _dsv3_model(quantization_config=qc)
    m.save_pretrained(tmp_path / "f8", dtype="fp8")
    cfg = json.loads((tmp_path / "f8" / "config.json").read_text())
    assert cfg["quantization_config"]["scale_fmt"] == "ue8m0"
    from safetensors.torch import load_file, save_file
    raw = load_file(str(tmp_path / "f8" / "model.safetensors"))
    scales = [v.numpy() for k, v in raw.items() if k.endswith("_scale_inv")]
    assert scales and all(np.all(np.frexp(s)[0] == 0.5) for s in scales)
    ref = _fp8_reference(tmp_path / "f8")
    sd = dsv3.Model.from_pretrained(tmp_path / "f8").state_dict()
    assert all(np.array_equal(sd[k], v.numpy()) for k, v in ref.items() if k in sd)
    name = next(k for k in raw if k.endswith("_scale_inv"))
    raw[name] = raw[name] * 1.5  # no longer powers of two
    save_file(raw, str(tmp_path / "f8" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not powers of two"):
        dsv3.Model.from_pretrained(tmp_path / "f8")


def test_mtp_module_matches_transformers(tmp_path):
    """transformers' MtpModel (generate(use_mtp=True)) on a dsv3 checkpoint: the same
    draft logits. It looks for MTP weights only at model.layers.61 (DeepSeek-V3's depth), so
    the main model has 61 layers here (dense, to keep the test fast; the MTP block is MoE)."""
    from transformers.modeling_layers import MtpModel
    m = _dsv3_model(num_hidden_layers=61, first_k_dense_replace=61)
    m.save_pretrained(tmp_path / "ck")
    hf = load_hf(tmp_path / "ck")
    with quiet():
        mtp = MtpModel.from_pretrained(hf).float().eval()
    t = TOKENS[None, :8]
    with torch.no_grad():
        h = hf.model(torch.as_tensor(t)).last_hidden_state
        # transformers places the MTP rows at the drafted token's position (dsv3 at the main
        # row's): a uniform shift, which RoPE's relative scores do not see
        pos = torch.arange(1, t.shape[1])[None]
        hk = mtp.forward_layer(0, h[:, :-1], pos, None, input_ids=torch.as_tensor(t[:, 1:]))
        want = mtp._project_to_logits(hk).numpy()
    _, hidden = m.forward_with_hidden(t, m.new_cache(1, 16), 0)
    got, _ = m.mtp_forward(hidden[:, :-1], t[:, 1:], m.new_mtp_cache(1, 16), 0, 1)
    assert np.abs(got - want).max() < LOGIT_TOL


@pytest.mark.parametrize("att", [{}, {"q_lora_rank": None}, {"attention_type": "gqa",
                                                             "num_key_value_heads": 2}])
def test_halves_layout_round_trip(tmp_path, att):
    """rope_interleave false: the files hold permuted rope rows, the model reloads identically
    (every attention kind, MTP layer included)."""
    m = _dsv3_model(rope_interleave=False, **att)
    if att.get("attention_type"):  # transformers has no GQA DeepSeek: saved unlabelled
        with pytest.warns(UserWarning, match="without model_type"):
            m.save_pretrained(tmp_path / "ck")
    else:
        m.save_pretrained(tmp_path / "ck")
    from safetensors.torch import load_file
    stored = load_file(str(tmp_path / "ck" / "model.safetensors"))
    name = ("model.layers.2.self_attn." + ("k_proj" if att.get("attention_type") else
                                           "kv_a_proj_with_mqa") + ".weight")
    sd = m.state_dict()
    assert not np.array_equal(stored[name].numpy(), sd[name])  # MTP layer permuted too
    back = dsv3.Model.from_pretrained(tmp_path / "ck")
    assert all(np.array_equal(v, back.state_dict()[k]) for k, v in sd.items())
    assert np.array_equal(back.forward(TOKENS), m.forward(TOKENS))


def test_weight_block_size_is_honoured(tmp_path):
    """An FP8 checkpoint in 64x64 blocks (hand-written with torch; partial blocks at the 48-
    and 96-wide edges) loads as its blocks mean, not as 128x128 blocks."""
    from safetensors.torch import load_file, save_file
    m = _dsv3_model()
    m.save_pretrained(tmp_path / "f8", dtype="fp8")
    m.save_pretrained(tmp_path / "f32")
    fp8_names = [k for k, v in load_file(str(tmp_path / "f8" / "model.safetensors")).items()
                 if v.dtype == torch.float8_e4m3fn]
    raw = load_file(str(tmp_path / "f32" / "model.safetensors"))
    b = 64
    for k in fp8_names:
        w = raw[k]
        grid = (-(-w.shape[0] // b), -(-w.shape[1] // b))
        pad = torch.zeros(grid[0] * b, grid[1] * b)
        pad[:w.shape[0], :w.shape[1]] = w
        blocks = pad.reshape(grid[0], b, grid[1], b)
        s = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp_min(2.0 ** -20)
        q = (blocks / s[:, None, :, None]).reshape(pad.shape)[:w.shape[0], :w.shape[1]]
        raw[k] = q.to(torch.float8_e4m3fn)
        raw[k + "_scale_inv"] = s
    (tmp_path / "b64").mkdir()
    save_file(raw, str(tmp_path / "b64" / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "f8" / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [b, b]
    (tmp_path / "b64" / "config.json").write_text(json.dumps(cfg))
    ref = _fp8_reference(tmp_path / "b64", block=b)
    sd = dsv3.Model.from_pretrained(tmp_path / "b64").state_dict()
    assert fp8_names and all(np.array_equal(sd[k], ref[k].numpy()) for k in fp8_names)


UNLABELLED = {
    "v2-normalised": {"topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": True,
                      "routed_scaling_factor": 1.0},
    "mha": {"attention_type": "mha"},
    "gqa": {"attention_type": "gqa", "num_key_value_heads": 2},
    "softmax-noaux": {"scoring_func": "softmax"},
}


@pytest.mark.parametrize("case", sorted(UNLABELLED))
def test_no_label_where_transformers_computes_differently(tmp_path, case):
    """A checkpoint transformers would open as a different model carries no model_type /
    architectures (AutoConfig refuses it) and a warning on saving; dsv3 reads it back."""
    m = _dsv3_model(**UNLABELLED[case])
    with pytest.warns(UserWarning, match="without model_type") as record:
        m.save_pretrained(tmp_path / "ck")
    assert record[0].filename == __file__
    written = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert "model_type" not in written and "architectures" not in written
    with quiet(), pytest.raises(ValueError):
        transformers.AutoConfig.from_pretrained(str(tmp_path / "ck"))
    back = dsv3.Model.from_pretrained(tmp_path / "ck")
    sd = m.state_dict()
    assert all(np.array_equal(v, back.state_dict()[k]) for k, v in sd.items())
    assert np.array_equal(back.forward(TOKENS), m.forward(TOKENS))


def test_transformers_v2_router_does_not_normalise(tmp_path):
    """Why v2-normalised is not labelled: transformers 5.23's DeepseekV2 router ignores
    norm_topk_prob, so the same file labelled deepseek_v2 by hand opens as a different model.
    When this fails, transformers normalises: label these checkpoints again."""
    m = _dsv3_model(**UNLABELLED["v2-normalised"])
    with pytest.warns(UserWarning):
        m.save_pretrained(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg.update(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"])
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    hf = load_hf(tmp_path / "ck")
    assert hf.config.norm_topk_prob is True
    assert np.abs(m.forward(TOKENS) - hf_logits(hf, TOKENS)).max() > 0.1
