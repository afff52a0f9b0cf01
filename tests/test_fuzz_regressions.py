"""Inputs found by fuzzing (tests/fuzz/fuzz_checkpoint.py), kept as regression tests."""
import base64
import json
import time

import pytest

import dsv3


def test_huge_layer_count_counts_in_constant_time():
    # fuzz (config target): {"num_hidden_layers": 22129280} took 89 s in a per-layer loop
    d = json.loads(base64.b64decode("ewogCiAgIm51bV9oaWRkZW5fbGF5ZXJzIjogMjIxMjkyODAKfQo="))
    t = time.perf_counter()
    c = dsv3.Config.from_dict(d)
    n = c.num_parameters(active=True, mtp=True)
    assert time.perf_counter() - t < 1.0
    per_layer = dsv3.Config.deepseek_v3().replace(num_hidden_layers=10).num_parameters()
    assert n > per_layer


@pytest.mark.parametrize("L,k,freq", [(1, 0, 1), (7, 3, 2), (9, 2, 3), (61, 3, 1), (5, 5, 1)])
def test_closed_form_counts_match_per_layer_sum(L, k, freq):
    c = dsv3.Config.tiny().replace(num_hidden_layers=L, first_k_dense_replace=k, moe_layer_freq=freq,
                                   num_nextn_predict_layers=2)
    for active in (False, True):
        for mtp in (False, True):
            want = c.vocab_size * c.hidden_size * 2 + c.hidden_size + sum(
                c._block_params(i, active) for i in range(L))
            if mtp:
                want += sum(3 * c.hidden_size + 2 * c.hidden_size ** 2 + c._block_params(L + j, active)
                            for j in range(2))
            assert c.num_parameters(active=active, mtp=mtp) == want


def test_absurd_sizes_rejected():
    with pytest.raises(ValueError, match="hidden_size"):
        dsv3.Config.tiny().replace(hidden_size=2 ** 40)


@pytest.mark.parametrize("field", ["intermediate_size", "n_routed_experts", "hidden_size"])
def test_absurd_integral_float_sizes_rejected(field):
    # fuzz (config target): {"intermediate_size": 1097777777777777777777700.4} is an integral
    # float; converted to int after the 2^31 check, it reached the engine's parameter counts
    # and raised pybind11's cast RuntimeError instead of a ValueError naming the field
    with pytest.raises(ValueError, match=field):
        dsv3.Config.from_dict({**dsv3.Config.tiny().to_dict(), field: 1.0977777777777778e24})


def test_huge_expert_count_counts_in_constant_time():
    # fuzz (config target): {"n_routed_experts": 2129280} took > 10 s and 2.7 GB, building
    # every expert's parameter names to count them
    d = json.loads(base64.b64decode(
        "ewogICJpcm91YCI6IDgsCiAgIm5fcm91cm91YCI6IDgsCiAgIm5fcm91dGVkX2V4cGVydHMiOiAyMTI5MjgwCn0K"))
    t = time.perf_counter()
    c = dsv3.Config.from_dict(d)
    n_all, n_active = c.num_parameters(), c.num_parameters(active=True)
    assert time.perf_counter() - t < 1.0
    # each routed expert: gate, up, down (3 D x moe_inter), a router row (D), a bias entry
    v3 = dsv3.Config.deepseek_v3()
    per_expert = 3 * v3.hidden_size * v3.moe_intermediate_size + v3.hidden_size + 1
    n_moe = v3.num_moe_layers(0, v3.num_hidden_layers)
    assert n_all - v3.num_parameters() == n_moe * (c.n_routed_experts - 256) * per_expert
    # the activated count keeps the whole router (every token scores every expert)
    router_row = v3.hidden_size + 1
    assert n_active - v3.num_parameters(active=True) == n_moe * (c.n_routed_experts - 256) * router_row


def test_expert_count_extrapolation_matches_the_model_tensors():
    # the counts come from one- and two-expert blocks; the model's own tensors have all E
    c = dsv3.Config.tiny().replace(n_routed_experts=12, num_experts_per_tok=3, n_group=4,
                                   topk_group=2, num_nextn_predict_layers=0)
    sd = dsv3.Model(c, seed=0).state_dict()
    for i in range(c.num_hidden_layers):
        size = sum(v.size for k, v in sd.items() if k.startswith(f"model.layers.{i}."))
        assert c._block_params(i, active=False) == size
        if c.is_moe_layer(i):
            idle = sum(v.size for k, v in sd.items() if k.startswith(f"model.layers.{i}.mlp.experts.")
                       and int(k.split(".")[5]) >= c.num_experts_per_tok)
            assert c._block_params(i, active=True) == size - idle


def test_huge_rope_dim_counts_without_a_rotary_table():
    t = time.perf_counter()
    c = dsv3.Config.tiny().replace(qk_rope_head_dim=2 ** 30)
    assert c.num_parameters() > 2 ** 30
    assert time.perf_counter() - t < 1.0


def test_parameter_count_overflow_raises():
    c = dsv3.Config.deepseek_v3().replace(hidden_size=2 ** 31 - 1, moe_intermediate_size=2 ** 31 - 1)
    with pytest.raises(ValueError, match="exceeds 2\\^63"):
        c.num_parameters()


def test_model_beyond_memory_raises_at_once():
    # building a 2^28-expert layout (names for every expert) took the machine down
    c = dsv3.Config.tiny().replace(n_routed_experts=2 ** 28, n_group=1, topk_group=1)
    t = time.perf_counter()
    with pytest.raises(MemoryError, match="GiB"):
        dsv3.Model(c)
    assert time.perf_counter() - t < 1.0
