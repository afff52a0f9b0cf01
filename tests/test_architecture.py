"""Contracts of the engine's single sources: the topk_method mapping refuses unknown values,
non-finite inputs raise their own exception type (a ValueError), and the Python layer ops read
their weight names from the engine's layout."""
import types

import numpy as np
import pytest

import dsv3
from dsv3 import _core, ops


def _config_object(cfg, **changes):
    # a plain object with the Config's attributes: bypasses Config.validate, so the engine's
    # own checks are what runs
    attrs = {name: getattr(cfg, name) for name in cfg.field_names()}
    attrs.update(kv_heads=cfg.kv_heads, softmax_scale=cfg.softmax_scale)
    attrs.update(changes)
    return types.SimpleNamespace(**attrs)


def test_engine_refuses_unknown_topk_method_and_scoring_func():
    cfg = dsv3.Config.tiny()
    with pytest.raises(ValueError, match="topk_method must be"):
        _core.Model(_config_object(cfg, topk_method="bogus"), 0)
    with pytest.raises(ValueError, match="scoring_func must be"):
        _core.Model(_config_object(cfg, scoring_func="bogus"), 0)
    x = np.zeros((3, cfg.hidden_size), np.float32)
    w = np.zeros((cfg.n_routed_experts, cfg.hidden_size), np.float32)
    with pytest.raises(ValueError, match="topk_method must be"):
        _core.moe_gate(x, w, None, _config_object(cfg, topk_method="bogus"))


def test_non_finite_input_raises_non_finite_error():
    cfg = dsv3.Config.tiny()
    params = ops.init_moe_params(cfg, seed=0)
    x = np.zeros((4, cfg.hidden_size), np.float32)
    x[2, 1] = np.nan
    assert issubclass(_core.NonFiniteError, ValueError)
    with pytest.raises(_core.NonFiniteError, match="must be finite"):
        ops.moe_forward(x, params, cfg)


def test_moe_param_shapes_are_the_model_layout():
    cfg = dsv3.Config.tiny()
    layer = next(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    prefix = f"model.layers.{layer}.mlp."
    sd = dsv3.Model(cfg, seed=0).state_dict()
    want = {k[len(prefix):]: v.shape for k, v in sd.items() if k.startswith(prefix)}
    assert ops.moe_param_shapes(cfg) == want
    assert list(ops.moe_param_shapes(cfg)) == list(want)  # layout order


def test_moe_param_shapes_refuse_a_config_without_experts():
    cfg = dsv3.Config.tiny()
    with pytest.raises(ValueError, match=r"\[moe_param_shapes\] n_routed_experts must be >= 1 "
                                         r"\(the config has no MoE layers\)"):
        ops.moe_param_shapes(_config_object(cfg, n_routed_experts=None))
    with pytest.raises(ValueError, match=r"\[moe_param_shapes\] n_routed_experts must be >= 1"):
        ops.moe_param_shapes(_config_object(cfg, n_routed_experts=0))


def test_config_takes_the_topk_methods_from_the_engine():
    cfg = dsv3.Config.tiny()
    methods = _core.topk_methods()
    assert methods == ["noaux_tc", "greedy", "group_limited_greedy"]
    for m in methods:  # each listed value is one the engine accepts
        _core.moe_param_specs(_config_object(cfg, topk_method=m, n_group=1, topk_group=1), 8)
    with pytest.raises(ValueError, match=r"topk_method.*must be one of \('noaux_tc', 'greedy', "
                                         r"'group_limited_greedy'\)"):
        cfg.replace(topk_method="bogus")


def test_moe_param_specs_carry_the_layout_init():
    cfg = dsv3.Config.tiny()
    specs = _core.moe_param_specs(cfg, cfg.hidden_size)
    inits = {name: init for name, _, init in specs}
    assert inits.pop("gate.e_score_correction_bias") == "zeros"
    assert set(inits.values()) == {"normal"}
    params = ops.init_moe_params(cfg, seed=0)
    assert not params["gate.e_score_correction_bias"].any()
    assert params["gate.weight"].std() > 0
