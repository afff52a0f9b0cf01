"""dsv3.reference.torch_model (the benchmark peer) computes the same model: its float32 losses and
gradients agree with dsv3 (so the benchmarks compare equal work)."""

import numpy as np
import pytest

import dsv3
from conftest import assert_close, get_torch



@pytest.mark.parametrize("kw", [dict(), dict(attention_type="gqa", num_key_value_heads=2,
                                             topk_method="greedy", scoring_func="softmax",
                                             n_group=1, topk_group=1, norm_topk_prob=False)])
def test_torch_peer_matches(kw):
    get_torch()
    import torch
    from dsv3.reference.torch_model import TorchModel
    cfg = dsv3.Config.tiny().replace(**kw)
    m = dsv3.Model(cfg, seed=2)
    tm = TorchModel(cfg, m.state_dict())
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 10))
    assert_close("peer logits", tm(torch.from_numpy(tokens)).detach().numpy(), m.forward(tokens),
                 rtol=1e-4, atol=1e-4)
    out = tm.loss(torch.from_numpy(tokens), alpha=0.01)
    out["loss"].backward()
    got, grads = m.loss_and_grad(tokens, alpha=0.01)
    for k in ("main", "mtp", "balance", "loss"):
        assert_close(f"peer {k}", out[k].item(), got[k], rtol=1e-4, atol=1e-6)
    for k in ("lm_head.weight", "model.layers.1.mlp.gate.weight", "model.layers.0.self_attn.o_proj.weight"):
        g = tm.w(k).grad.numpy()
        assert_close(f"peer d{k}", grads[k], g, rtol=1e-3, atol=1e-5 * np.abs(g).max())
