"""Tiny random transformers DeepseekV3 / DeepseekV2 models built from configs (nothing is
downloaded), for the test_hf_*.py files. transformers and torch are test dependencies."""
from __future__ import annotations

import contextlib
import logging
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

YARN5 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
         "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
         "mscale": 1.0, "mscale_all_dim": 1.0}
TINY = dict(vocab_size=64, hidden_size=48, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
            topk_group=2, first_k_dense_replace=1, max_position_embeddings=256,
            routed_scaling_factor=2.5, bos_token_id=0, eos_token_id=None)


@contextlib.contextmanager
def quiet():
    """transformers' load reports and deprecation notices: not what these tests check (pytest
    turns warnings into errors)."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)
        transformers.logging.set_verbosity(level)


def v3_config(**kw):
    d = dict(TINY, rope_parameters=dict(YARN5))
    d.update(kw)
    return transformers.DeepseekV3Config(**d)


def v2_config(**kw):
    d = dict(TINY, rope_parameters=dict(YARN5, mscale=0.707, mscale_all_dim=0.707),
             topk_method="greedy", routed_scaling_factor=1.0)
    d.update(kw)
    return transformers.DeepseekV2Config(**d)


def random_model(config, seed=0):
    """A transformers causal LM with every weight random (std 0.2: logits far from flat, so
    a wrong rope or gate shows), norms 1 + noise and random gate correction biases."""
    with quiet():
        torch.manual_seed(seed)
        cls = (transformers.DeepseekV2ForCausalLM if config.model_type == "deepseek_v2"
               else transformers.DeepseekV3ForCausalLM)
        config._attn_implementation = "eager"
        m = cls(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(m.named_parameters()) + list(m.named_buffers()):
            if not p.is_floating_point() or "inv_freq" in name:
                continue
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("e_score_correction_bias"):
                p.copy_(0.05 * noise)
            else:
                p.copy_(0.2 * noise)
    return m


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens)[None])).logits[0].float().numpy()


def hf_greedy(model, prompt, n) -> list:
    with quiet(), torch.no_grad():
        out = model.generate(torch.as_tensor(np.asarray(prompt)[None]), max_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0,
                             min_new_tokens=n)
    return out[0, len(prompt):].tolist()


def load_hf(directory):
    with quiet():
        m = transformers.AutoModelForCausalLM.from_pretrained(
            str(directory), attn_implementation="eager")
    return m.float().eval()


def save_hf(model, directory):
    with quiet():
        model.save_pretrained(str(directory))
