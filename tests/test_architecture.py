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
