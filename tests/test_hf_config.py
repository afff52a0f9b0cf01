"""Config files in transformers 4.x and 5.x keys: both read and written, never a
math-changing key kept and ignored, the DeepSeek family's configs, unknown architectures
refused."""
import json

import pytest

from dsv3 import Config
from hf_helpers import quiet, transformers

PRESETS = ["deepseek_v2", "deepseek_v2_lite", "deepseek_v3", "deepseek_v3_1",
           "moonlight_16b_a3b", "kimi_k2"]


def _through_transformers(d, tmp_path):
    """config.json -> transformers' config class -> its own save_pretrained -> dict."""
    (tmp_path / "in").mkdir(exist_ok=True)
    (tmp_path / "in" / "config.json").write_text(json.dumps(d))
    with quiet():
        c = transformers.AutoConfig.from_pretrained(str(tmp_path / "in"))
        c.save_pretrained(str(tmp_path / "out"))
    return json.loads((tmp_path / "out" / "config.json").read_text())


def _math(c):
    d = c.to_dict()
    for k in ("dtype", "torch_dtype", "transformers_version", "use_cache", "pad_token_id",
              "output_router_logits", "pretraining_tp", "attention_bias", "attention_dropout",
              "mlp_bias"):  # all validated
        d.pop(k, None)
    return d


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("rope_format", ["both", "v4", "v5"])
def test_presets_survive_a_transformers_resave(tmp_path, name, rope_format):
    c = getattr(Config, name)()
    resaved = _through_transformers(c.to_dict(rope_format), tmp_path)
    assert "rope_parameters" in resaved  # transformers 5 writes its own format
    back = Config.from_dict(resaved)
    assert _math(back) == _math(c)
    assert back.softmax_scale == c.softmax_scale


def test_published_v3_config_resaved_by_transformers(tmp_path, v3_config_path):
    """The issue's silent failure: V3's config.json re-saved by transformers 5 (rope
    settings only in rope_parameters) loaded with theta 10000 and no YaRN (scale 0.0722)."""
    with open(v3_config_path) as f:
        published = json.load(f)
    back = Config.from_dict(_through_transformers(published, tmp_path))
    assert round(back.softmax_scale, 4) == 0.1352
    assert _math(back) == _math(Config.deepseek_v3())


def test_formats_agree_and_conflicts_name_both():
    c = Config.tiny().replace(rope_theta=50000.0, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    v4, v5 = c.to_dict("v4"), c.to_dict("v5")
    assert "rope_parameters" not in v4 and "rope_scaling" not in v5 and "rope_theta" not in v5
    assert v5["rope_parameters"]["rope_type"] == "yarn"
    assert v5["rope_parameters"]["rope_theta"] == 50000.0
    assert Config.from_dict(v4) == Config.from_dict(v5) == Config.from_dict(c.to_dict()) == c
    bad = dict(c.to_dict(), rope_theta=10000.0)
    with pytest.raises(ValueError, match="rope_theta.*rope_parameters.rope_theta"):
        Config.from_dict(bad)
    bad = dict(c.to_dict(), rope_scaling=None)  # dsv3's old bug: null beside a yarn dict
    with pytest.raises(ValueError, match="rope_scaling.*rope_parameters.*disagree"):
        Config.from_dict(bad)


def test_transformers_v2_defaults():
    """A DeepseekV2Config written by transformers has no scoring_func (softmax) and n_group
    None; DeepseekV3Config's have no topk_method / scoring_func (sigmoid, noaux_tc)."""
    with quiet():
        d2 = transformers.DeepseekV2Config(num_experts_per_tok=6).to_dict()
        d3 = transformers.DeepseekV3Config().to_dict()
    c2, c3 = Config.from_dict(d2), Config.from_dict(d3)
    assert (c2.scoring_func, c2.topk_method, c2.n_group, c2.num_nextn_predict_layers) == \
        ("softmax", "greedy", 1, 0)
    assert c2.to_dict()["model_type"] == "deepseek_v2"
    assert (c3.scoring_func, c3.topk_method) == ("sigmoid", "noaux_tc")
    assert c3.to_dict()["architectures"] == ["DeepseekV3ForCausalLM"]


def test_aliases():
    d = Config.tiny().to_dict()
    d.pop("num_nextn_predict_layers")
    assert Config.from_dict(dict(d, num_mtp_layers=0)).num_nextn_predict_layers == 0
    with pytest.raises(ValueError, match="num_nextn_predict_layers.*num_mtp_layers"):
        Config.from_dict(dict(d, num_mtp_layers=0, num_nextn_predict_layers=1))


V32 = {"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32"}


@pytest.mark.parametrize("changes, match", [
    (V32, "model_type.*sparse attention"),
    ({"architectures": ["DeepseekV32ForCausalLM"]}, "architectures.*V3.2"),
    ({"index_topk": 2048, "index_n_heads": 64}, "index_"),
    ({"model_type": "llama"}, "model_type"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"attention_bias": True}, "attention_bias"),
    ({"num_key_value_heads": 2}, "num_key_value_heads.*MLA"),
    ({"rope_interleave": "yes"}, "rope_interleave"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.*yarn"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "mscale": 0.707}}, "mscale"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "attention_factor": 1.2}},
     "attention_factor"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "truncate": False}}, "truncate"),
    ({"rope_scaling": {"type": "yarn"}}, "factor"),
    ({"quantization_config": {"quant_method": "fp8", "scale_fmt": "e5m2"}}, "scale_fmt"),
    ({"model_type": "deepseek_v2", "topk_method": "greedy", "scoring_func": "softmax",
      "rope_interleave": False}, "rope_interleave"),
    # transformers' rope machinery reads these top-level keys too
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_type": "yarn"}, "rope_type"),
    ({"attention_factor": 1.2}, "attention_factor"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5}},
     "rope_scaling.*partial_rotary_factor"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "low_freq_factor": 1.0}},
     "unknown yarn parameter 'low_freq_factor'"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
      "original_max_position_embeddings": 128}, "original_max_position_embeddings.*128.*64"),
    ({"rope_scaling": None, "rope_parameters": {"full_attention": {"rope_type": "default"}}},
     "rope_parameters.*per-layer"),
    ({"rope_scaling": {"type": "yarn", "rope_type": "linear", "factor": 4.0}},
     "type 'yarn' and rope_type 'linear' disagree"),
    ({"rope_scaling": None, "rope_parameters": "yarn"}, "rope_parameters.*must be a dict"),
    ({"architectures": "DeepseekV3ForCausalLM"}, "architectures.*list"),
])
def test_refused_keys_name_themselves(changes, match):
    d = Config.tiny().to_dict("v4")
    d.update(changes)
    with pytest.raises(ValueError, match=match):
        Config.from_dict(d)


def test_yarn_original_max_position_follows_transformers():
    d = Config.tiny().to_dict("v4")
    d["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    c = Config.from_dict(d)
    assert c.rope_scaling["original_max_position_embeddings"] == d["max_position_embeddings"]


@pytest.mark.parametrize("cls", ["DeepseekV3Config", "DeepseekV2Config"])
def test_every_transformers_key_is_audited(cls):
    """Each key transformers writes is a dsv3 field, an alias, derived, validated (CHECKED) or
    known not to change the math (INERT): a new key in a later transformers fails here."""
    from dsv3 import hf_keys
    with quiet():
        keys = set(getattr(transformers, cls)().to_dict())
    known = set(Config.field_names()) | set(hf_keys._ALIASES) | set(hf_keys._DERIVED) | \
        set(hf_keys.CHECKED) | set(hf_keys.INERT)
    assert keys <= known, sorted(keys - known)


def test_published_v3_keys_are_audited(v3_config_path):
    from dsv3 import hf_keys
    with open(v3_config_path) as f:
        keys = set(json.load(f))
    known = set(Config.field_names()) | set(hf_keys.CHECKED) | set(hf_keys.INERT)
    assert keys <= known, sorted(keys - known)


@pytest.mark.parametrize("extra", [
    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e4, "factor": 4}},
    {"rope_scaling": {"type": "yarn", "factor": 4.0}}, {"rope_theta": 5e4},
    {"partial_rotary_factor": 0.5}, {"num_mtp_layers": 1}, {"num_experts": 4},
    {"head_dim": 8}, {"mlp_bias": True}, {"attention_bias": True}, {"hidden_act": "gelu"},
    {"attention_dropout": 0.1}, {"model_type": "llama"}, {"index_topk": 2048}])
def test_extra_is_audited_too(extra):
    """Review W2: Config(extra=...) and a config dict's "extra" go through the same audit as
    the keys of a config.json (a rope or alias key there would be kept and ignored)."""
    (key,) = extra
    with pytest.raises(ValueError, match=key):
        Config.tiny().replace(extra=extra)
    with pytest.raises(ValueError, match=key):
        Config.from_dict(dict(Config.tiny().to_dict(), extra=extra))


def test_yarn_without_original_max_beside_filled_rope_parameters():
    """Review R1: transformers fills rope_parameters' original_max_position_embeddings with
    max_position_embeddings when the 4.x rope_scaling has none: the same setting."""
    d = Config.tiny().to_dict("v4")
    d["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": d["rope_theta"], "factor": 4.0,
                            "original_max_position_embeddings": d["max_position_embeddings"]}
    c = Config.from_dict(d)
    assert c.rope_scaling["original_max_position_embeddings"] == d["max_position_embeddings"]


def test_kimi_k2_is_written_as_deepseek_v3(tmp_path):
    """Review R2: AutoConfig maps kimi_k2 only with remote code; it is the DeepseekV3
    architecture, so dsv3 reads and writes it as deepseek_v3."""
    c = Config.kimi_k2()
    assert c.to_dict()["model_type"] == "deepseek_v3"
    c.to_json(tmp_path)
    with quiet():
        assert transformers.AutoConfig.from_pretrained(str(tmp_path)).model_type == \
            "deepseek_v3"
    assert Config.from_dict(dict(c.to_dict(), model_type="kimi_k2")) == c


def test_null_num_key_value_heads_means_num_attention_heads():
    """Review R3: transformers reads num_key_value_heads null as num_attention_heads."""
    d = dict(Config.tiny().to_dict(), num_key_value_heads=None)
    assert Config.from_dict(d).num_key_value_heads == d["num_attention_heads"]


def test_no_q_lora_round_trips():
    """Review R4: q_lora_rank 0 and None are one setting (written as null)."""
    c = Config.tiny().replace(q_lora_rank=0)
    assert c.q_lora_rank is None and Config.from_dict(c.to_dict()) == c
