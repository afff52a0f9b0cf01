"""Model configuration: Hugging Face ``DeepseekV3Config`` field names and meanings (semantics §1).

A real DeepSeek-V3 ``config.json`` loads unchanged (``Config.from_json``), in transformers 4.x
keys or 5.x ``rope_parameters`` (see :mod:`dsv3.hf_keys`); keys that do not change the math are
kept in ``extra`` and written back by ``to_dict`` / ``to_json``; keys that would change it are
interpreted or refused. Every invalid value or combination raises ``ValueError`` naming the field.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from . import hf_keys
from ._files import open_regular

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2,
                "float8": 1, "fp8": 1, "e4m3": 1}
_ATTENTION_TYPES = ("mla", "mha", "gqa")


@dataclass
class Config:
    # --- Hugging Face DeepseekV3Config fields (defaults are DeepSeek-V3's) ---
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    q_lora_rank: Optional[int] = 1536     # 0 / None: no query compression (a single q_proj)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: Optional[int] = 256  # 0 / None: every layer is a dense MLP
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[Union[int, List[int]]] = 1
    initializer_range: float = 0.02
    quantization_config: Optional[Dict[str, Any]] = None
    # True: a checkpoint's q/k rope rows hold adjacent pairs (DeepSeek's layout, computed
    # as is); False: halves (x_i, x_{i+d/2}), permuted to pairs when loading and back when saving
    rope_interleave: bool = True
    # --- dsv3 additions ---
    attention_type: str = "mla"           # "mla" | "mha" | "gqa" (baselines for comparison)
    mtp_loss_weight: float = 0.3          # lambda of the MTP loss
    bias_update_speed: float = 0.001      # gamma of aux-loss-free balancing
    seq_aux_loss_alpha: float = 1e-4      # alpha of the sequence-wise balance loss
    # --- keys of a config.json that dsv3 does not interpret, written back unchanged ---
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Config":
        """From a config.json dict: transformers 4.x or 5.x keys (both may be present; when
        they disagree, ValueError naming both)."""
        if not isinstance(d, dict):
            raise TypeError(f"[Config.from_dict] expected a dict, got {type(d).__name__}")
        d = hf_keys.read(d)
        names = set(cls.field_names())
        known = {k: copy.deepcopy(v) for k, v in d.items() if k in names}
        extra = {k: copy.deepcopy(v) for k, v in d.items() if k not in names and k != "extra"}
        if isinstance(d.get("extra"), dict):
            extra.update(copy.deepcopy(d["extra"]))
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> "Config":
        """Read a ``config.json`` (a file, or a directory containing one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open_regular(path, "Config.from_json") as f:
            return cls.from_json_text(f.read(), path)

    @classmethod
    def from_json_text(cls, text: str, path: str) -> "Config":
        """The config of a ``config.json``'s text (already read; ``path`` names it in
        messages)."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"[Config.from_json] {path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"[Config.from_json] {path} must hold a JSON object")
        return cls.from_dict(d)

    def to_canonical_dict(self) -> Dict[str, Any]:
        """The fields and ``extra`` in one dict (dsv3's names, before ``hf_keys.write``)."""
        d = {name: copy.deepcopy(getattr(self, name)) for name in self.field_names()}
        for k, v in self.extra.items():
            d.setdefault(k, copy.deepcopy(v))
        return d

    def to_dict(self, rope_format: str = "both") -> Dict[str, Any]:
        """config.json keys, with ``model_type`` / ``architectures`` and the rope settings as
        transformers 4.x keys (``rope_theta``, ``rope_scaling``; ``rope_format="v4"``), 5.x
        ``rope_parameters`` ("v5"), or both, consistent ("both", the default)."""
        return hf_keys.write(self.to_canonical_dict(), rope_format)

    def to_json(self, path: Union[str, os.PathLike, None] = None, indent: int = 2,
                rope_format: str = "both") -> str:
        """The JSON text; written atomically to ``path`` (a file or directory) when given."""
        text = json.dumps(self.to_dict(rope_format), indent=indent, sort_keys=True) + "\n"
        if path is not None:
            path = os.fspath(path)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        return text

    def replace(self, **changes: Any) -> "Config":
        """A copy with some fields changed (validated)."""
        d = self.to_canonical_dict()
        d.update(changes)
        return Config.from_dict(d)

    # ------------------------------------------------------------------ presets
    @classmethod
    def deepseek_v3(cls) -> "Config":
        """DeepSeek-V3's published dimensions (671B). For arithmetic; never allocate it."""
        return cls(
            max_position_embeddings=163840,
            rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                          "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                          "type": "yarn"},
            quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3",
                                 "quant_method": "fp8", "weight_block_size": [128, 128]},
            extra={"attention_bias": False, "attention_dropout": 0.0, "ep_size": 1,
                   "hidden_act": "silu", "torch_dtype": "bfloat16", "use_cache": True},
        )

    @classmethod
    def deepseek_v2_lite(cls) -> "Config":
        """DeepSeek-V2-Lite (15.7B total, 2.4B active): softmax gate, no query compression."""
        return cls(
            vocab_size=102400, hidden_size=2048, intermediate_size=10944,
            moe_intermediate_size=1408, num_hidden_layers=27, num_nextn_predict_layers=0,
            num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
            n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
            topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
            routed_scaling_factor=1.0, first_k_dense_replace=1, moe_layer_freq=1,
            max_position_embeddings=163840, bos_token_id=100000, eos_token_id=100001,
            rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                          "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                          "type": "yarn"},
            extra={"hidden_act": "silu"},
        )

    @classmethod
    def deepseek_v2(cls) -> "Config":
        """DeepSeek-V2 (236B total, 21B active): softmax gate with group_limited_greedy
        (8 groups, 3 chosen), 160 routed experts top-6, query compression."""
        return cls.deepseek_v2_lite().replace(
            hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
            num_hidden_layers=60, num_attention_heads=128, num_key_value_heads=128,
            q_lora_rank=1536, n_routed_experts=160, n_group=8, topk_group=3,
            topk_method="group_limited_greedy", routed_scaling_factor=16.0)

    @classmethod
    def deepseek_v3_1(cls) -> "Config":
        """DeepSeek-V3.1: V3's dimensions; FP8 weights with power-of-two (UE8M0) scales."""
        c = cls.deepseek_v3()
        return c.replace(quantization_config=dict(c.quantization_config, scale_fmt="ue8m0"))

    @classmethod
    def moonlight_16b_a3b(cls) -> "Config":
        """Moonshot's Moonlight-16B-A3B: the DeepseekV3 architecture with one expert group,
        64 experts top-6, no query compression, rope_theta 50000, no YaRN, no MTP."""
        return cls(
            vocab_size=163840, hidden_size=2048, intermediate_size=11264,
            moe_intermediate_size=1408, num_hidden_layers=27, num_nextn_predict_layers=0,
            num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
            n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1,
            topk_group=1, routed_scaling_factor=2.446, first_k_dense_replace=1,
            max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=50000.0,
            bos_token_id=163584, eos_token_id=163586,
            extra={"hidden_act": "silu", "ep_size": 1, "use_cache": True})

    @classmethod
    def kimi_k2(cls) -> "Config":
        """Moonshot's Kimi-K2 (1T total, 32B active; model_type kimi_k2, architecture
        DeepseekV3ForCausalLM, so read and saved as deepseek_v3): 384 experts top-8 in one
        group, 64 heads, rope_theta 50000 with YaRN x32, first layer dense, no MTP, FP8
        weights."""
        return cls.deepseek_v3().replace(
            vocab_size=163840, num_nextn_predict_layers=0, num_attention_heads=64,
            num_key_value_heads=64, n_routed_experts=384, n_group=1, topk_group=1,
            routed_scaling_factor=2.827, first_k_dense_replace=1,
            max_position_embeddings=131072, rope_theta=50000.0, bos_token_id=163584,
            eos_token_id=163585,
            rope_scaling={"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                          "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0,
                          "mscale_all_dim": 1.0},
        )

    @classmethod
    def small(cls) -> "Config":
        """The demo model (~9M parameters): byte vocabulary, 4 layers (1 dense + 3 MoE with
        16 routed experts in 4 groups, top-4), MLA, one MTP module. Trains on 2 CPU cores."""
        return cls(
            vocab_size=264, hidden_size=256, intermediate_size=768, moe_intermediate_size=192,
            num_hidden_layers=4, num_nextn_predict_layers=1, num_attention_heads=4,
            num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
            qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, n_shared_experts=1,
            num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
            first_k_dense_replace=1, max_position_embeddings=1024, bos_token_id=256,
            eos_token_id=257,
        )

    @classmethod
    def medium(cls) -> "Config":
        """A GEMM-dominated model for the low-precision benchmarks (~0.4B parameters): byte
        vocabulary, hidden 1024, 8 layers (1 dense + 7 MoE with 32 routed experts of width
        512 in 4 groups, top-4, 1 shared), 16 MLA heads (q_lora 384, kv_lora 256), one MTP
        module."""
        return cls(
            vocab_size=264, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
            num_hidden_layers=8, num_nextn_predict_layers=1, num_attention_heads=16,
            num_key_value_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
            qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32, n_shared_experts=1,
            num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
            first_k_dense_replace=1, max_position_embeddings=2048, bos_token_id=256,
            eos_token_id=257,
        )

    @classmethod
    def tiny(cls) -> "Config":
        """For tests (~100k parameters): every mechanism present at toy sizes."""
        return cls(
            vocab_size=64, hidden_size=48, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=2, num_nextn_predict_layers=1, num_attention_heads=4,
            num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
            first_k_dense_replace=1, max_position_embeddings=256, bos_token_id=0,
            eos_token_id=1,
        )

    # ------------------------------------------------------------------ derived values
    @property
    def uses_q_lora(self) -> bool:
        return bool(self.q_lora_rank)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_heads(self) -> int:
        """Key/value heads of the attention actually built (mha: all heads)."""
        if self.attention_type == "gqa":
            return self.num_key_value_heads
        return self.num_attention_heads

    @property
    def yarn(self) -> bool:
        return self.rope_scaling is not None

    @property
    def softmax_scale(self) -> float:
        """``(qk_nope + qk_rope)^-0.5``, times ``m^2`` with YaRN, m = yarn_mscale(factor,
        mscale_all_dim) (semantics §2.2). The absorbed MLA form uses the same scale."""
        from . import _core
        scale = self.qk_head_dim ** -0.5
        if self.rope_scaling is not None:
            factor = float(self.rope_scaling.get("factor", 1.0))
            m = _core.yarn_mscale(factor, float(self.rope_scaling.get("mscale_all_dim") or 0.0))
            scale *= m * m
        return scale

    def is_moe_layer(self, i: int) -> bool:
        """Layer i (0-based; MTP blocks use i >= num_hidden_layers) is MoE."""
        return (bool(self.n_routed_experts) and i >= self.first_k_dense_replace
                and i % self.moe_layer_freq == 0)

    # ------------------------------------------------------------------ counts
    def _param_counts(self) -> Dict[str, int]:
        """Parameters per kind of piece (embedding, norm, head, dense block, MoE block (all /
        activated experts), an MTP module's own weights), from the engine's parameter layout
        (csrc/model/layout.h), the one source of the model's weights."""
        from . import _core
        return _core.param_counts(self)

    def _block_params(self, layer: int, active: bool) -> int:
        c = self._param_counts()
        if not self.is_moe_layer(layer):
            return c["dense_block"]
        return c["moe_block_active" if active else "moe_block"]

    def num_moe_layers(self, start: int, stop: int) -> int:
        """How many of the layers start..stop-1 are MoE (closed form: O(1) for any depth)."""
        if not self.n_routed_experts:
            return 0
        lo = max(start, self.first_k_dense_replace)
        if lo >= stop:
            return 0
        f = self.moe_layer_freq
        first = -(-lo // f) * f  # smallest multiple of f >= lo
        return 0 if first >= stop else (stop - 1 - first) // f + 1

    def num_parameters(self, active: bool = False, mtp: bool = False, ep: int = 1) -> int:
        """Parameter count from the config alone.

        ``active=True`` counts only the routed experts a token uses (num_experts_per_tok of
        n_routed_experts per MoE layer). ``mtp=True`` adds the MTP modules' own parameters
        (enorm, hnorm, eh_proj, a full block, shared_head.norm); their embedding and output
        head are the main model's and are not counted twice. The embedding and the head are
        included in the activated count. ``ep > 1`` counts what one expert-parallel rank holds
        (the replicated parameters plus n_routed_experts / ep routed experts per MoE block,
        MTP blocks included); it must divide n_routed_experts.
        """
        c, L = self._param_counts(), self.num_hidden_layers
        moe = c["moe_block_active" if active else "moe_block"]

        def blocks(start: int, stop: int) -> int:
            n_moe = self.num_moe_layers(start, stop)
            return (stop - start - n_moe) * c["dense_block"] + n_moe * moe

        n = c["embed"] + c["norm"] + c["head"] + blocks(0, L)
        if mtp and self.num_nextn_predict_layers:
            k = self.num_nextn_predict_layers
            n += k * c["mtp_own"] + blocks(L, L + k)
        E = self.n_routed_experts or 0
        if type(ep) is not int or ep < 1 or (ep > 1 and (E == 0 or E % ep)):
            raise ValueError(f"[Config.num_parameters] ep must be a positive divisor of "
                             f"n_routed_experts ({E}), got {ep!r}")
        if ep > 1:
            if active:
                raise ValueError("[Config.num_parameters] ep applies to the stored count, "
                                 "not to active=True")
            stop = L + (self.num_nextn_predict_layers if mtp else 0)
            expert = 3 * self.hidden_size * self.moe_intermediate_size  # gate, up, down
            n -= (E - E // ep) * expert * self.num_moe_layers(0, stop)
        return n

    def kv_cache_bytes_per_token(self, dtype: str = "bfloat16",
                                 attention_type: Optional[str] = None,
                                 num_key_value_heads: Optional[int] = None,
                                 head_dim: Optional[int] = None) -> int:
        """KV-cache bytes per token over the main model's layers.

        mla: ``(kv_lora_rank + qk_rope_head_dim)`` per layer (the latent and the shared
        roped key). mha: keys ``H * (qk_nope + qk_rope)`` plus values ``H * v_head_dim``.
        gqa: the same with ``num_key_value_heads`` heads. ``attention_type``,
        ``num_key_value_heads`` and ``head_dim`` (used for both keys and values) override the
        config for what-if comparisons, e.g. GQA with 8 heads of 128 at V3 dims.
        """
        if dtype not in _DTYPE_BYTES:
            raise ValueError(f"[kv_cache_bytes_per_token] dtype must be one of "
                             f"{sorted(_DTYPE_BYTES)}, got {dtype!r}")
        kind = attention_type or self.attention_type
        if kind not in _ATTENTION_TYPES:
            raise ValueError(f"[kv_cache_bytes_per_token] attention_type must be one of "
                             f"{_ATTENTION_TYPES}, got {kind!r}")
        if kind == "mla":
            per_layer = self.kv_lora_rank + self.qk_rope_head_dim
        else:
            heads = num_key_value_heads or (self.num_attention_heads if kind == "mha"
                                            else self.num_key_value_heads)
            dk = head_dim or self.qk_head_dim
            dv = head_dim or self.v_head_dim
            per_layer = heads * (dk + dv)
        return per_layer * self.num_hidden_layers * _DTYPE_BYTES[dtype]

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def fail(name: str, msg: str) -> None:
            raise ValueError(f"[Config] {name}: {msg} (got {getattr(self, name)!r})")

        def integer(name: str, lo: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int):
                if isinstance(v, float) and v.is_integer():
                    setattr(self, name, int(v))
                    v = int(v)
                else:
                    fail(name, "must be an integer")
            if v < lo:
                fail(name, f"must be >= {lo}")
            if v >= 2 ** 31:  # also for integral floats such as 1.1e24, converted just above
                fail(name, "must be < 2^31 (dimensions are 32-bit in the BLAS interface)")

        def real(name: str, lo: float, strict: bool) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                fail(name, "must be a finite number")
            setattr(self, name, float(v))
            if v < lo or (strict and v == lo):
                fail(name, f"must be {'>' if strict else '>='} {lo}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "max_position_embeddings", "moe_layer_freq", "intermediate_size",
                     "num_nextn_predict_layers", "first_k_dense_replace", "n_shared_experts",
                     "kv_lora_rank", "q_lora_rank", "n_routed_experts", "moe_intermediate_size",
                     "num_experts_per_tok", "n_group", "topk_group"):
            v = getattr(self, name)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 2 ** 31:
                fail(name, "must be < 2^31 (dimensions are 32-bit in the BLAS interface)")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "qk_nope_head_dim", "qk_rope_head_dim",
                     "v_head_dim", "max_position_embeddings", "moe_layer_freq",
                     "intermediate_size"):
            integer(name, 1)
        for name in ("num_nextn_predict_layers", "first_k_dense_replace", "n_shared_experts",
                     "kv_lora_rank"):
            integer(name, 0)
        integer("q_lora_rank", 0, optional=True)
        if self.q_lora_rank == 0:
            self.q_lora_rank = None  # one spelling of "no query compression" (transformers')
        integer("n_routed_experts", 0, optional=True)
        for name in ("rms_norm_eps", "rope_theta", "initializer_range", "routed_scaling_factor"):
            real(name, 0.0, strict=True)
        for name in ("mtp_loss_weight", "bias_update_speed", "seq_aux_loss_alpha"):
            real(name, 0.0, strict=False)
        if self.rope_theta <= 1:
            fail("rope_theta", "must be > 1")
        for name in ("norm_topk_prob", "tie_word_embeddings", "rope_interleave"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be true or false")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "the rotary dim must be even (pairs are rotated)")
        if self.attention_type not in _ATTENTION_TYPES:
            fail("attention_type", f"must be one of {_ATTENTION_TYPES}")
        if self.attention_type == "mla" and self.kv_lora_rank < 1:
            fail("kv_lora_rank", "must be >= 1 with attention_type 'mla'")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads",
                 f"must divide num_attention_heads ({self.num_attention_heads})")
        if self.first_k_dense_replace > self.num_hidden_layers:
            fail("first_k_dense_replace",
                 f"must be <= num_hidden_layers ({self.num_hidden_layers})")
        for tok in ("bos_token_id", "eos_token_id"):
            v = getattr(self, tok)
            ids = v if isinstance(v, list) else [v]
            for t in ids:
                if t is None:
                    continue
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                    fail(tok, f"must be None or an id in [0, vocab_size={self.vocab_size})")
        self._validate_moe(fail, integer)
        self._validate_rope_scaling(fail)
        self._validate_quantization(fail)
        if not isinstance(self.extra, dict):
            raise ValueError(f"[Config] extra: must be a dict, got {self.extra!r}")
        hf_keys.check_extra(self.extra, set(self.field_names()))
        if self.attention_type == "mla" and self.num_key_value_heads != self.num_attention_heads:
            fail("num_key_value_heads", "MLA gives every head its own key and value: must equal "
                 f"num_attention_heads ({self.num_attention_heads}) with attention_type 'mla'")
        model_type = self.extra.get("model_type") or hf_keys.derived_model_type(
            self.topk_method, self.scoring_func)
        if not self.rope_interleave and model_type == "deepseek_v2":
            fail("rope_interleave", "DeepseekV2 checkpoints always hold adjacent rope pairs")

    def _validate_moe(self, fail, integer) -> None:
        if not self.n_routed_experts:
            return
        integer("moe_intermediate_size", 1)
        integer("num_experts_per_tok", 1)
        integer("n_group", 1)
        integer("topk_group", 1)
        E = self.n_routed_experts
        from . import _core
        methods = tuple(_core.topk_methods())  # the engine's list (moe_gate.cpp), not a copy
        if self.topk_method not in methods:
            fail("topk_method", f"must be one of {methods}")
        if self.scoring_func not in ("sigmoid", "softmax"):
            fail("scoring_func", "must be 'sigmoid' or 'softmax'")
        if self.num_experts_per_tok > E:
            fail("num_experts_per_tok", f"must be <= n_routed_experts ({E})")
        if self.topk_group > self.n_group:
            fail("topk_group", f"must be <= n_group ({self.n_group})")
        if E % self.n_group:
            fail("n_group", f"must divide n_routed_experts ({E})")
        # early, field-named copies of the engine's group rules (moe_config_check), so a bad
        # config fails here rather than at its first MoE call
        grouped = self.n_group > 1 and self.topk_method in ("noaux_tc", "group_limited_greedy")
        if grouped:
            per_group = E // self.n_group
            if self.num_experts_per_tok > self.topk_group * per_group:
                fail("num_experts_per_tok", f"must be <= topk_group * experts per group "
                     f"({self.topk_group} * {per_group}): only those experts can be chosen")
            if self.topk_method == "noaux_tc" and per_group < 2:
                fail("n_group", "noaux_tc scores a group by its top-2 experts, so each group "
                     f"needs >= 2 experts (n_routed_experts / n_group = {per_group})")

    def _validate_rope_scaling(self, fail) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            fail("rope_scaling", "must be null or a dict")
        kind = rs.get("type", rs.get("rope_type"))
        if kind != "yarn":
            fail("rope_scaling", "type/rope_type must be 'yarn' (the only scaling DeepSeek uses)")
        for key, lo in (("factor", 0.0), ("original_max_position_embeddings", 0.0),
                        ("beta_fast", 0.0), ("beta_slow", 0.0)):
            v = rs.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v) or v <= lo):
                fail("rope_scaling", f"{key} must be a number > {lo}")
        for key in ("mscale", "mscale_all_dim"):
            v = rs.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v) or v < 0):
                fail("rope_scaling", f"{key} must be a number >= 0")

    def _validate_quantization(self, fail) -> None:
        q = self.quantization_config
        if q is None:
            return
        if not isinstance(q, dict):
            fail("quantization_config", "must be null or a dict")
        if q.get("quant_method", "fp8") != "fp8":
            fail("quantization_config", "quant_method must be 'fp8'")
        if q.get("fmt", "e4m3") != "e4m3":
            fail("quantization_config", "fmt must be 'e4m3'")
        bs = q.get("weight_block_size", [128, 128])
        if (not isinstance(bs, (list, tuple)) or len(bs) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in bs)):
            fail("quantization_config", "weight_block_size must be two positive integers")
        if q.get("activation_scheme", "dynamic") != "dynamic":
            fail("quantization_config", "activation_scheme must be 'dynamic'")
        if q.get("scale_fmt") not in (None, "ue8m0"):
            fail("quantization_config", "scale_fmt must be null (float32 scales) or 'ue8m0' "
                 "(powers of two, DeepSeek-V3.1)")

    def __repr__(self) -> str:
        return (f"Config(layers={self.num_hidden_layers}, hidden={self.hidden_size}, "
                f"heads={self.num_attention_heads}, attention={self.attention_type}, "
                f"experts={self.n_routed_experts or 0}x top{self.num_experts_per_tok}, "
                f"mtp={self.num_nextn_predict_layers}, vocab={self.vocab_size}, "
                f"params={self.num_parameters() / 1e6:.2f}M)")
