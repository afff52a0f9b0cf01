"""dsv3.Config (semantics §1): HF field names, JSON round trip, presets, validation, counts."""
import json

import pytest

from dsv3 import Config
from hf_shapes import count, hf_shapes


def test_v3_json_equals_preset(v3_config_path):
    c = Config.from_json(v3_config_path)
    assert c == Config.deepseek_v3()
    with open(v3_config_path) as f:
        published = json.load(f)
    d = c.to_dict()
    for k, v in published.items():  # every published key written back, same value
        assert d[k] == v, k


def test_json_round_trip_keeps_unknown_keys(tmp_path):
    d = Config.tiny().to_dict(rope_format="v4")  # the rope keys edited below: 4.x only
    d["my_research_flag"] = {"nested": [1, 2]}
    d["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1, "mscale_all_dim": 1}
    c = Config.from_dict(d)
    assert c.extra["my_research_flag"] == {"nested": [1, 2]}
    c.to_json(tmp_path)
    back = Config.from_json(tmp_path / "config.json")
    assert back == c and back.to_dict()["my_research_flag"] == {"nested": [1, 2]}
    assert not list(tmp_path.glob("*.tmp*"))  # atomic write left no temporary file


@pytest.mark.parametrize("name", ["tiny", "small", "deepseek_v3", "deepseek_v2_lite"])
def test_presets_round_trip_and_count(name):
    c = getattr(Config, name)()
    assert Config.from_dict(json.loads(c.to_json())) == c
    assert c.num_parameters(mtp=True) == count(hf_shapes(c, mtp=True))
    assert c.num_parameters() == count(hf_shapes(c, mtp=False))


def test_preset_sizes():
    assert 50_000 <= Config.tiny().num_parameters(mtp=True) <= 200_000      # ~100k
    assert 5e6 <= Config.small().num_parameters(mtp=True) <= 20e6             # demo size


def test_v3_counts():
    c = Config.deepseek_v3()
    assert round(c.num_parameters() / 1e9) == 671                 # the report's 671B
    assert 36.5e9 <= c.num_parameters(active=True) <= 38e9           # "37B activated"
    assert c.kv_cache_bytes_per_token("bfloat16") == 70_272
    assert c.kv_cache_bytes_per_token("bfloat16", "mha") == 4_997_120
    assert c.kv_cache_bytes_per_token("bfloat16", "gqa", 8, 128) == 249_856
    assert c.kv_cache_bytes_per_token("float32") == 2 * 70_272
    # MTP: 61*? the published checkpoint holds 685B = 671B + 14B of MTP (incl. a copy of the
    # embedding and head, which dsv3 shares and does not count again)
    mtp_own = c.num_parameters(mtp=True) - c.num_parameters()
    assert 685e9 - 671e9 - 2 * 129280 * 7168 - 1e9 < mtp_own < 685e9 - 671e9


def test_v2_lite_counts():
    c = Config.deepseek_v2_lite()
    assert round(c.num_parameters() / 1e8) == 157                  # 15.7B total
    assert not c.uses_q_lora and c.num_nextn_predict_layers == 0


def test_softmax_scale():
    assert round(Config.deepseek_v3().softmax_scale, 6) == 0.135234
    assert Config.tiny().softmax_scale == pytest.approx(12 ** -0.5)


@pytest.mark.parametrize("changes,field", [
    ({"topk_group": 9}, "topk_group"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
    ({"n_group": 7}, "n_group"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"hidden_size": 1.5}, "hidden_size"),
    ({"topk_method": "fancy"}, "topk_method"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"attention_type": "linear"}, "attention_type"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
    ({"rope_scaling": {"type": "yarn", "factor": -2}}, "rope_scaling"),
    ({"first_k_dense_replace": 100}, "first_k_dense_replace"),
    ({"eos_token_id": 10**9}, "eos_token_id"),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, "quantization_config"),
    ({"mtp_loss_weight": -0.1}, "mtp_loss_weight"),
    ({"norm_topk_prob": "yes"}, "norm_topk_prob"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_invalid_combinations_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        Config.deepseek_v3().replace(**changes)


def test_topk_exceeding_chosen_groups():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        Config.tiny().replace(n_group=4, topk_group=1, num_experts_per_tok=3)


def test_no_moe_and_no_q_lora():
    c = Config.tiny().replace(n_routed_experts=None, q_lora_rank=0)
    assert not c.is_moe_layer(1) and not c.uses_q_lora
    assert c.num_parameters(mtp=True) == count(hf_shapes(c))


@pytest.mark.parametrize("att", ["mha", "gqa"])
def test_baseline_counts(att):
    c = Config.tiny().replace(attention_type=att, num_key_value_heads=2)
    assert c.num_parameters(mtp=True) == count(hf_shapes(c))
    kvh = 4 if att == "mha" else 2
    assert c.kv_cache_bytes_per_token("float32") == 4 * 2 * kvh * (12 + 8)


def test_bad_json(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Config.from_json(p)
    p.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        Config.from_json(p)
    with pytest.raises(TypeError):
        Config.from_dict([1, 2])
    with pytest.raises(ValueError, match="dtype"):
        Config.tiny().kv_cache_bytes_per_token("int3")
