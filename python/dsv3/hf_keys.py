"""Hugging Face config keys <-> dsv3's canonical fields (read by ``Config.from_dict``, written
by ``Config.to_dict``).

Reading accepts both transformers 4.x keys (top-level ``rope_theta`` / ``rope_scaling``,
``torch_dtype``) and 5.x keys (``rope_parameters: {rope_type, rope_theta, factor, ...}``,
``dtype``), the aliases transformers defines (``num_mtp_layers``, ``num_local_experts``,
``num_experts``) and the defaults of ``DeepseekV2Config`` when ``model_type`` is deepseek_v2.
Every key that would change the computation is either mapped onto a dsv3 field or refused with
a ``ValueError`` naming it; it is never kept and ignored. Keys that do not change the math
(``use_cache``, ``pad_token_id``, ``ep_size``, ``dtype``, ...) are kept and written back.

Writing gives the rope settings in both formats by default (``rope_format="both"``: 4.x readers
use the top-level keys, 5.x readers find the same values in ``rope_parameters``), and
``model_type`` / ``architectures`` whenever transformers' model of that name computes the same
model (``transformers_mismatch``).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, Optional

ROPE_FORMATS = ("both", "v4", "v5")
# model_type -> architecture dsv3 computes. kimi_k2 is Moonshot's name for the DeepseekV3
# architecture (its config.json declares DeepseekV3ForCausalLM): read as deepseek_v3, which
# AutoConfig opens without remote code, and written back as deepseek_v3.
_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "kimi_k2")
_MODEL_TYPE_ALIASES = {"kimi_k2": "deepseek_v3"}
_ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")
# Keys of architectures dsv3 does not implement (DeepSeek-V3.2's lightning indexer for its
# sparse attention): refused even without a model_type.
_UNSUPPORTED_KEYS = ("index_n_heads", "index_head_dim", "index_topk")
# Values transformers derives from other keys (DeepseekV3Config: head_dim = qk_rope_head_dim,
# qk_head_dim = qk_nope + qk_rope); dropped on reading, transformers recomputes them.
_DERIVED = ("head_dim", "qk_head_dim")
_ALIASES = {"num_mtp_layers": "num_nextn_predict_layers", "num_local_experts": "n_routed_experts",
            "num_experts": "n_routed_experts"}
# DeepseekV2Config's defaults where they differ from dsv3's (DeepSeek-V3's), applied to
# absent keys of a deepseek_v2 config. V2 has no MTP and no scoring_func key (softmax).
_V2_DEFAULTS = {
    "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048,
    "bos_token_id": 1, "eos_token_id": 2, "first_k_dense_replace": 0, "n_group": None,
    "n_routed_experts": 64, "n_shared_experts": 2, "routed_scaling_factor": 1.0,
    "topk_group": None, "topk_method": "greedy", "norm_topk_prob": False,
    "num_experts_per_tok": None, "moe_intermediate_size": 1407, "scoring_func": "softmax",
    "num_nextn_predict_layers": 0,
}
# The audit of every key of transformers' DeepseekV3Config / DeepseekV2Config (and of
# DeepSeek's own config.json) that is not a dsv3 field, an alias or derived: CHECKED keys change
# the math, so their values are validated in read() (only DeepSeek's are accepted) and kept;
# INERT keys do not change what the model computes (caching, output options, parallelism,
# training-code settings dsv3 does not read, metadata) and are kept and written back.
CHECKED = ("attention_bias", "attention_dropout", "mlp_bias", "hidden_act", "model_type",
           "architectures", "rope_parameters")
INERT = ("use_cache", "pad_token_id", "ep_size", "pretraining_tp", "output_router_logits",
         "aux_loss_alpha", "seq_aux", "auto_map", "dtype", "torch_dtype",
         "transformers_version", "_name_or_path", "id2label", "label2id", "problem_type",
         "return_dict", "output_attentions", "output_hidden_states", "is_encoder_decoder",
         "chunk_size_feed_forward")
# Top-level keys transformers' rope machinery reads besides rope_theta / rope_scaling /
# rope_parameters (standardize_rope_params moves them into rope_parameters): refused unless
# their value is the one dsv3 computes.
ROPE_KEYS = ("partial_rotary_factor", "rope_type", "attention_factor",
             "original_max_position_embeddings")
_YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
              "mscale_all_dim")


def _fail(key: str, msg: str) -> None:
    raise ValueError(f"[Config] {key}: {msg}")


def _check_architecture(d: Dict[str, Any]) -> None:
    mt = d.get("model_type")
    if mt is not None and mt not in _MODEL_TYPES:
        _fail("model_type", f"dsv3 implements {_MODEL_TYPES} (MLA + DeepSeekMoE), got {mt!r}"
              + (": DeepSeek-V3.2's sparse attention (lightning indexer) is not implemented"
                 if "32" in str(mt) else ""))
    archs = d.get("architectures")
    if archs is not None:
        if not isinstance(archs, list) or not archs:
            _fail("architectures", f"must be a non-empty list of names, got {archs!r}")
        for a in archs:
            if a not in _ARCHITECTURES:
                _fail("architectures", f"dsv3 implements {_ARCHITECTURES}, got {a!r}"
                      + (" (DeepSeek-V3.2's sparse attention with its lightning indexer is "
                         "not implemented)" if "V32" in str(a) else ""))
    for k in _UNSUPPORTED_KEYS:
        if k in d:
            _fail(k, "this is DeepSeek-V3.2's sparse-attention indexer, which dsv3 does not "
                  "implement (dsv3 computes dense MLA)")


def _resolve_aliases(d: Dict[str, Any]) -> None:
    for alias, name in _ALIASES.items():
        if alias not in d:
            continue
        v = d.pop(alias)
        if name in d and d[name] != v:
            _fail(name, f"{name}={d[name]!r} and its alias {alias}={v!r} disagree")
        d[name] = v


def _canonical_yarn(rs: Dict[str, Any], where: str) -> Dict[str, Any]:
    """A yarn dict with ``type: "yarn"`` (no rope_type / rope_theta), or ValueError."""
    kind = rs.get("rope_type", rs.get("type"))
    if "rope_type" in rs and "type" in rs and rs["rope_type"] != rs["type"]:
        _fail(where, f"type {rs['type']!r} and rope_type {rs['rope_type']!r} disagree")
    if kind != "yarn":
        _fail(where, f"rope type must be 'yarn' (or 'default' = no scaling), got {kind!r}")
    out = {"type": "yarn"}
    for k, v in rs.items():
        if k in ("type", "rope_type", "rope_theta"):
            continue
        if k == "attention_factor" and v is not None:
            _fail(where, "attention_factor (a fixed cos/sin scale) is not supported: dsv3 "
                  "derives it from mscale / mscale_all_dim")
        if k == "truncate" and v is not True:
            _fail(where, "truncate=false (an untruncated YaRN ramp) is not supported")
        if k == "partial_rotary_factor":
            _check_partial_rotary(v, where)
        if k in ("attention_factor", "truncate", "partial_rotary_factor"):
            continue
        if k not in _YARN_KEYS:
            _fail(where, f"unknown yarn parameter {k!r} (expected {_YARN_KEYS})")
        out[k] = v
    if out.get("factor") is None:
        _fail(where, "yarn needs a factor")
    _check_mscale(out, where)
    return out


def _check_partial_rotary(v: Any, where: str) -> None:
    if v not in (None, 1, 1.0) or isinstance(v, bool):
        name = "" if where == "partial_rotary_factor" else "partial_rotary_factor "
        _fail(where, f"{name}must be 1 (qk_rope_head_dim is the rotary dim), got {v!r}")


def _check_mscale(rs: Dict[str, Any], where: str) -> None:
    """dsv3 scales cos/sin by mscale(f, mscale) / mscale(f, mscale_all_dim) with defaults 1
    and 0 (DeepSeek's formula); transformers uses that ratio only when both are given and
    non-zero, else mscale(f, 1). Where the two disagree the config is ambiguous: refuse it."""
    f = rs.get("factor")
    if not isinstance(f, (int, float)) or isinstance(f, bool) or not math.isfinite(f) or f <= 1:
        return  # validated (or inert: m = 1 for factor <= 1) elsewhere
    ms, mad = rs.get("mscale"), rs.get("mscale_all_dim")
    from . import _core

    def m(x):
        return _core.yarn_mscale(float(f), float(x))  # the engine's formula (semantics §2.1)
    if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
               for v in (ms, mad)):
        return  # Config._validate_rope_scaling names the bad value
    ours = m(1.0 if ms is None else ms) / m(0.0 if mad is None else mad)
    theirs = m(ms) / m(mad) if (ms and mad) else m(1.0)
    if abs(ours - theirs) > 1e-12 * abs(ours):
        _fail(where, f"mscale={ms!r} with mscale_all_dim={mad!r} is read differently by "
              f"DeepSeek's formula (cos/sin x {ours:.6g}) and by transformers (x {theirs:.6g}); "
              "give both mscale and mscale_all_dim")


def _resolve_rope(d: Dict[str, Any]) -> None:
    """rope_parameters (5.x) and/or rope_theta + rope_scaling (4.x) -> rope_theta,
    rope_scaling (canonical yarn dict or None)."""
    rp = d.pop("rope_parameters", None)
    top = d.pop("original_max_position_embeddings", None)
    scaling4 = d.get("rope_scaling")
    if scaling4 is not None:
        if not isinstance(scaling4, dict):
            _fail("rope_scaling", f"must be null or a dict, got {scaling4!r}")
        scaling4 = _fill_original_max(_canonical_yarn(scaling4, "rope_scaling"), top, d)
    if rp is not None:
        if not isinstance(rp, dict):
            _fail("rope_parameters", f"must be a dict, got {rp!r}")
        if any(isinstance(v, dict) for v in rp.values()):
            _fail("rope_parameters", "per-layer-type rope parameters are not supported")
        kind = rp.get("rope_type", rp.get("type", "default"))
        scaling5 = None if kind == "default" else _fill_original_max(
            _canonical_yarn(rp, "rope_parameters"), top, d)
        theta5 = rp.get("rope_theta")
        if "rope_theta" in d and theta5 is not None and d["rope_theta"] != theta5:
            _fail("rope_theta", f"rope_theta={d['rope_theta']!r} and "
                  f"rope_parameters.rope_theta={theta5!r} disagree")
        if "rope_scaling" in d and scaling4 != scaling5:
            _fail("rope_scaling", f"rope_scaling={d['rope_scaling']!r} and rope_parameters="
                  f"{rp!r} disagree")
        if theta5 is not None:
            d["rope_theta"] = theta5
        scaling4 = scaling5
    d["rope_scaling"] = scaling4


def _fill_original_max(rs: Dict[str, Any], top: Any, d: Dict[str, Any]) -> Dict[str, Any]:
    """transformers' rule for an absent yarn original_max_position_embeddings: the top-level
    key, else max_position_embeddings; a top-level key that disagrees is refused."""
    if rs.get("original_max_position_embeddings") is None:
        rs["original_max_position_embeddings"] = (
            top if top is not None else d.get("max_position_embeddings", 4096))
    elif top is not None and rs["original_max_position_embeddings"] != top:
        _fail("original_max_position_embeddings", f"top-level {top!r} and the yarn "
              f"parameters' {rs['original_max_position_embeddings']!r} disagree")
    return rs


def derived_model_type(topk_method: str, scoring_func: str) -> str:
    """The transformers architecture computing this gate: DeepseekV2's softmax gates
    (greedy / group_limited_greedy), else DeepseekV3 (sigmoid + correction bias)."""
    if scoring_func == "softmax" and topk_method in ("greedy", "group_limited_greedy"):
        return "deepseek_v2"
    return "deepseek_v3"


def _architecture_name(model_type: str) -> str:
    return "DeepseekV2ForCausalLM" if model_type == "deepseek_v2" else "DeepseekV3ForCausalLM"


def _check_values(d: Dict[str, Any]) -> None:
    """The CHECKED keys (and architecture keys): only the values dsv3 computes."""
    _check_architecture(d)
    for k, bad, why in (("mlp_bias", True, "the MLPs have no biases"),
                        ("attention_bias", True, "the attention projections have no biases")):
        if d.get(k, False) is bad:
            _fail(k, f"true is not supported ({why})")
    drop = d.get("attention_dropout", 0.0)
    if drop not in (None, 0, 0.0):
        _fail("attention_dropout", f"dsv3 has no dropout; must be 0, got {drop!r}")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        _fail("hidden_act", f"only 'silu' (SwiGLU) is supported, got {act!r}")


def check_extra(extra: Dict[str, Any], fields) -> None:
    """``Config.extra`` (kept and written back as is): refuse what ``read`` would have mapped
    or consumed there (a field, an alias, a derived or rope key would be shadowed or ignored)
    and validate the CHECKED keys, as for a config.json."""
    consumed = set(_ALIASES) | set(_DERIVED) | set(ROPE_KEYS) | {
        "rope_parameters", "rope_scaling", "rope_theta", "extra"}
    for k in extra:
        if k in fields:
            _fail(k, "is a Config field: set it as one, not in extra (extra would be shadowed)")
        if k in consumed:
            _fail(k, "changes the math but would be ignored in extra: give it in a config "
                  "dict to Config.from_dict, or set the Config field it maps to")
    _check_values(extra)


def read(d: Dict[str, Any]) -> Dict[str, Any]:
    """A config.json dict (4.x or 5.x keys) -> a dict of dsv3's canonical keys."""
    d = copy.deepcopy(d)
    for k in ("model_type", "architectures"):
        if k in d and d[k] is None:  # transformers' to_dict() of a config built in memory
            del d[k]
    _check_values(d)
    if d.get("model_type") in _MODEL_TYPE_ALIASES:
        d["model_type"] = _MODEL_TYPE_ALIASES[d["model_type"]]
    if d.get("model_type") == "deepseek_v2" or d.get("architectures") == [_ARCHITECTURES[1]]:
        for k, v in _V2_DEFAULTS.items():
            d.setdefault(k, v)
    _resolve_aliases(d)
    for k in _DERIVED:
        d.pop(k, None)
    for k in ("n_group", "topk_group"):
        if k in d and d[k] is None:  # DeepseekV2Config: None = no grouping
            d[k] = 1
    if "num_key_value_heads" in d and d["num_key_value_heads"] is None:
        d["num_key_value_heads"] = d.get("num_attention_heads")  # transformers' rule
    _check_partial_rotary(d.pop("partial_rotary_factor", None), "partial_rotary_factor")
    for k in ("rope_type", "attention_factor"):
        if d.get(k) is not None:
            _fail(k, f"a top-level {k} is not supported (give the rope settings in "
                  "rope_parameters or rope_scaling)")
        d.pop(k, None)
    _resolve_rope(d)
    mt = d.get("model_type")
    derived = derived_model_type(d.get("topk_method", "noaux_tc"), d.get("scoring_func",
                                                                         "sigmoid"))
    # stored only when it is not what the gate implies (e.g. kimi_k2); written back either way
    if mt == derived:
        d.pop("model_type")
    if d.get("architectures") == [_architecture_name(mt or derived)]:
        d.pop("architectures")
    return d


def transformers_mismatch(d: Dict[str, Any]) -> Optional[str]:
    """Why transformers' model for this canonical dict's ``model_type`` (given, or derived
    from the gate) would compute something else, or None when it computes the same."""
    mt = d.get("model_type") or derived_model_type(d["topk_method"], d["scoring_func"])
    mt = _MODEL_TYPE_ALIASES.get(mt, mt)
    gate = (d["scoring_func"], d["topk_method"])
    if d.get("attention_type", "mla") != "mla":
        return (f"attention_type {d['attention_type']!r}: transformers has no DeepSeek "
                "architecture with MHA/GQA attention (it would load MLA weights at random)")
    if d.get("moe_layer_freq", 1) != 1:
        return "moe_layer_freq > 1: transformers makes every layer after the dense ones MoE"
    if not d.get("n_routed_experts"):
        return None  # dense: no gate
    if mt == "deepseek_v3" and gate != ("sigmoid", "noaux_tc"):
        return f"gate {gate}: transformers' DeepseekV3 computes sigmoid + noaux_tc only"
    if mt == "deepseek_v2":
        if gate[0] != "softmax" or gate[1] not in ("greedy", "group_limited_greedy"):
            return f"gate {gate}: transformers' DeepseekV2 computes softmax greedy gates only"
        if d.get("norm_topk_prob"):
            return ("norm_topk_prob true: transformers' DeepseekV2 router never normalises "
                    "the top-k weights")
    return None


def write(d: Dict[str, Any], rope_format: str = "both") -> Dict[str, Any]:
    """dsv3's canonical dict -> config.json keys (``rope_format``: "both", "v4" or "v5").
    ``model_type`` / ``architectures`` only when transformers' model of that name computes
    the same (``transformers_mismatch``): else none, so AutoModel refuses the checkpoint
    rather than opening a different model."""
    if rope_format not in ROPE_FORMATS:
        raise ValueError(f"[Config.to_dict] rope_format must be one of {ROPE_FORMATS}, got "
                         f"{rope_format!r}")
    d = copy.deepcopy(d)
    if transformers_mismatch(d) is not None:
        d.pop("model_type", None)
        d.pop("architectures", None)
    else:
        mt = d.get("model_type") or derived_model_type(d["topk_method"], d["scoring_func"])
        d["model_type"] = _MODEL_TYPE_ALIASES.get(mt, mt)
        d.setdefault("architectures", [_architecture_name(d["model_type"])])
    if not d.get("q_lora_rank"):
        d["q_lora_rank"] = None  # transformers: None (not 0) means a single q_proj
    theta, rs = d.pop("rope_theta"), d.pop("rope_scaling")
    if rope_format in ("both", "v4"):
        d["rope_theta"], d["rope_scaling"] = theta, rs
    if rope_format in ("both", "v5"):
        rp = {"rope_type": "default", "rope_theta": theta}
        if rs is not None:
            rp.update({k: v for k, v in rs.items() if k != "type"})
            rp["rope_type"] = "yarn"
        d["rope_parameters"] = rp
    return d


def write_dtype(d: Dict[str, Any], dtype: str, rope_format: str) -> None:
    """One storage-dtype key, consistent with the tensors: ``dtype`` (transformers 5.x),
    or ``torch_dtype`` when writing the 4.x format."""
    d.pop("dtype", None)
    d.pop("torch_dtype", None)
    d["torch_dtype" if rope_format == "v4" else "dtype"] = dtype

