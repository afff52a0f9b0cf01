"""dsv3.Model: the DeepSeek-V3 model (semantics §2.1-2.5, §3), computed by the C++ engine.

The parameters live in one C++ slab under their Hugging Face names; ``state_dict`` copies them
out and ``load_state_dict`` copies them in. Checkpoints are Hugging Face-style directories
(``config.json`` + safetensors; see :mod:`dsv3.checkpoint`).

A model built by ``Model._from_resident(config, weights)`` keeps its projection matrices
RESIDENT in their storage format (fp32, bf16, or DeepSeek's FP8 E4M3 with a float32
``weight_scale_inv`` per 128x128 block), in arrays or memory maps it keeps alive, dequantized
on the fly inside the linear kernels: inference only (forward, cached decoding, MTP drafting,
generate, ``loss`` without gradients). ``state_dict`` returns dequantized fp32 copies and
``save_pretrained`` writes those; training and ``load_state_dict`` refuse such a model.

An EXPERT SHARD (``Model(cfg, seed, expert_shard=(ep, index))``, or a model given to a
Trainer whose parallel layout has ``ep > 1``) holds of each MoE block's routed experts only
``[index*E/ep, (index+1)*E/ep)``, under their global names; it computes inside its parallel
Trainer only (step, evaluate) and writes checkpoints through it (``Trainer.save``,
``Trainer.save_pretrained``: the EP ranks' experts are gathered into the full layout).
"""
from __future__ import annotations

import copy
import re
from typing import Dict, Optional, Tuple, Union

import numpy as np

from . import _core, _memory
from ._args import integer, real
from .config import Config
from .ops import CACHE_DTYPES, KVCache


class Model:
    """``Model(cfg, seed=0)``: weights N(0, initializer_range), norms 1, biases 0.
    ``expert_shard=(ep, index)``: only routed experts ``[index*E/ep, (index+1)*E/ep)`` of each
    MoE block (an expert-parallel rank's model; each weight drawn as in the full model)."""

    def __init__(self, config: Config, seed: int = 0,
                 expert_shard: Optional[Tuple[int, int]] = None, *, _random_init: bool = True):
        # _random_init=False (checkpoint loading, which then writes every weight): all weights 0
        if not isinstance(config, Config):
            raise TypeError(f"[Model] config must be a dsv3.Config, got {type(config).__name__}")
        seed = integer(seed, "seed", "Model", hi=2 ** 64 - 1)  # the engine's seed is uint64
        ep, index = _shard_arg(expert_shard, config)
        self._config = config.replace()  # a private copy: later edits of cfg do not desync
        _memory.model(self._config, ep)
        self._m = _core.Model(self._config, seed, ep, index, bool(_random_init))
        self._set_info()

    def _set_info(self):
        self._info = {name: (tuple(shape), trainable, decay)
                      for name, shape, trainable, decay in self._m.param_info()}

    @classmethod
    def _from_resident(cls, config: Config, weights: Dict[str, object],
                       _codes_checked: bool = False) -> "Model":
        """A model over ``weights`` = ``{hf_name: value}`` naming every weight of ``config``
        once, each value either a float32 array (copied) or a tuple ``(fmt, data, scale_inv)``
        held RESIDENT without a copy (the model keeps the arrays alive; do not modify them):
        ``("fp32", float32 [O, K], None)``, ``("bf16", uint16 bit patterns [O, K], None)`` or
        ``("fp8", uint8 E4M3 codes [O, K], float32 scale_inv [ceil(O/128), ceil(K/128)])``
        (w = e4m3(code) * scale_inv of its 128x128 block). Tuples are allowed for the
        projection matrices (attention q/kv_a/o or q/k/v/o, dense, routed and shared experts'
        gate/up/down_proj, eh_proj, embed_tokens, lm_head) and kv_b_proj, which is
        dequantized to fp32 at construction (the absorbed MLA decode slices it per head).
        Missing or unknown names raise KeyError; wrong dtypes TypeError; wrong shapes,
        non-contiguous arrays, a non-finite scale_inv or a norm given as a tuple ValueError.
        Inference only: training entry points refuse the model. FP8 codes are checked once,
        here, for NaN codes (0x7f / 0xff: the rows holding one compute NaN); a NaN code
        written into a resident array afterwards would go unseen (``_codes_checked=True``:
        the caller, dsv3.resident's loader, has already rejected them; the scan is skipped)."""
        if not isinstance(config, Config):
            raise TypeError(f"[Model.from_resident] config must be a dsv3.Config, got "
                            f"{type(config).__name__}")
        self = cls.__new__(cls)
        self._config = config.replace()
        self._m = _core.Model.from_resident(self._config, weights, bool(_codes_checked))
        self._set_info()
        return self

    @property
    def expert_shard(self) -> Optional[Tuple[int, int]]:
        """(ep, index) of an expert shard (see the module docstring), else None."""
        ep, index = self._m.expert_shard
        return (int(ep), int(index)) if ep > 1 else None

    def num_local_parameters(self) -> int:
        """Parameters this process holds: ``num_parameters()`` unless an expert shard (the
        replicated ones plus its E/ep routed experts per MoE block)."""
        return int(self._m.num_parameters)

    def _other_shard(self, name: str) -> bool:
        """Whether ``name`` is a routed expert of another EP rank (an expert shard only)."""
        shard = self.expert_shard
        if shard is None:
            return False
        m = _EXPERT.search(name)
        if m is None:
            return False
        ep, index = shard
        return int(m.group(1)) // (self._config.n_routed_experts // ep) != index

    def _refuse_shard(self, op: str) -> None:
        shard = self.expert_shard
        if shard is not None:
            raise ValueError(f"[{op}] this model is an expert shard (routed experts of EP rank "
                             f"{shard[1]} of ep={shard[0]} only); gather the full model through "
                             f"its Trainer (Trainer.save_pretrained / Trainer.full_state_dict)")

    # ------------------------------------------------------------------ storage formats
    @property
    def is_resident(self) -> bool:
        """Built by :meth:`_from_resident` (inference only)."""
        return self._m.is_resident()

    def weight_format(self, name: str) -> str:
        """Storage format of weight ``name``: "fp32", "bf16" or "fp8" (KeyError if unknown)."""
        return self._m.weight_format(name)

    def weight_formats(self) -> Dict[str, str]:
        """``{name: format}`` for every matrix (kv_b_proj, router gates: always "fp32")."""
        return self._m.weight_formats()

    def resident_bytes(self) -> int:
        """Bytes of the weights as held: resident ones in their format (fp8 incl. its
        scales), plus the fp32 slab of the others."""
        return self._m.resident_bytes()

    def _refuse_training(self, op: str) -> None:
        if self._m.is_resident():
            fmts = sorted(set(self._m.weight_formats().values()))
            raise ValueError(f"[{op}] this model holds resident inference weights "
                             f"({'/'.join(fmts)}), which cannot be trained or overwritten; "
                             f"load it with Model.from_pretrained(dir) (fp32 weights) to train")

    # ------------------------------------------------------------------ structure
    @property
    def config(self) -> Config:
        """A copy of the model's config: the weights were built for it, so editing it cannot
        change this model (build a new Model from the edited copy); ``save_pretrained``
        always writes the config the weights belong to."""
        return copy.deepcopy(self._config)

    def num_parameters(self, active: bool = False, mtp: bool = True) -> int:
        """Parameters of this model; equals ``config.num_parameters(active, mtp)``."""
        return self._config.num_parameters(active=active, mtp=mtp)

    def parameter_shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {k: v[0] for k, v in self._info.items()}

    def trainable_names(self):
        return [k for k, v in self._info.items() if v[1]]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, np.ndarray]:
        """``{hf_name: float32 array}`` (copies), including the gates'
        ``e_score_correction_bias`` and the MTP layers at ``num_hidden_layers + k``. A
        resident model's bf16 / fp8 weights come out dequantized to fp32."""
        return self._m.state_dict()

    def load_state_dict(self, state: Dict[str, np.ndarray], strict: bool = True):
        """Copy ``state`` into the model. Wrong shapes and dtypes always raise. With
        ``strict=True`` missing or unexpected keys raise ``KeyError`` listing them (nothing is
        loaded); with ``strict=False`` the present keys load and ``(missing, unexpected)`` is
        returned."""
        self._refuse_training("load_state_dict")
        if not isinstance(state, dict):
            raise TypeError(f"[load_state_dict] state must be a dict, got {type(state).__name__}")
        # an expert shard takes its own experts of a full state (the others' are not unexpected)
        if self.expert_shard is not None:
            state = {k: v for k, v in state.items() if not self._other_shard(k)}
        missing = sorted(set(self._info) - set(state))
        unexpected = sorted(set(state) - set(self._info))
        if strict and (missing or unexpected):
            raise KeyError(f"[load_state_dict] missing keys {missing[:10]}"
                           f"{' ...' if len(missing) > 10 else ''} ({len(missing)}), unexpected "
                           f"keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} "
                           f"({len(unexpected)})")
        for name in state:  # check everything before writing anything
            if name not in self._info:
                continue
            a = state[name]
            if not isinstance(a, np.ndarray) or a.dtype != np.float32:
                raise TypeError(f"[load_state_dict] '{name}' must be a float32 ndarray, got "
                                f"{getattr(a, 'dtype', type(a).__name__)}")
            if a.shape != self._info[name][0]:
                raise ValueError(f"[load_state_dict] '{name}' must have shape "
                                 f"{self._info[name][0]}, got {a.shape}")
        self._m.set_params({k: v for k, v in state.items() if k in self._info})
        return missing, unexpected

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory, dtype: str = "float32",
                        max_shard_bytes: int = 4 << 30, rope_format: str = "both") -> None:
        """Write ``config.json`` + ``model.safetensors`` (sharded with
        ``model.safetensors.index.json`` above ``max_shard_bytes``) in ``dtype`` "float32",
        "bfloat16" or "fp8" (DeepSeek-V3's layout: E4M3 linear weights with a
        ``weight_scale_inv`` per 128x128 block; power-of-two scales when the config's
        quantization_config has ``scale_fmt: "ue8m0"``). The config carries ``model_type``,
        ``architectures`` and the rope settings as transformers 4.x keys, 5.x
        ``rope_parameters``, or both (``rope_format`` "v4", "v5", "both"), so
        ``transformers.AutoModelForCausalLM.from_pretrained`` opens it. Atomic: see
        :mod:`dsv3.checkpoint`. A resident model writes its dequantized ``state_dict``."""
        from . import checkpoint
        self._refuse_shard("save_pretrained")
        checkpoint.save(self, directory, dtype, max_shard_bytes, rope_format)

    @classmethod
    def from_pretrained(cls, directory, strict: bool = False, weights: Optional[str] = None,
                        mmap: bool = True) -> "Model":
        """Load a checkpoint written by :meth:`save_pretrained`, by transformers
        (``DeepseekV3ForCausalLM`` / ``DeepseekV2ForCausalLM``, 4.x or 5.x config keys) or in
        DeepSeek-V3's format (float32 / bfloat16 / E4M3 + weight_scale_inv, single file or
        sharded). A config that declares MTP layers the files do not hold loads the main model
        with MTP disabled and a ``UserWarning``; ``strict=True`` raises ``KeyError`` instead.
        Every other missing or unexpected tensor raises either way.

        ``weights=None`` (the default) expands every weight to float32 in the model's slab, as
        before: the model can be trained and saved in any dtype. ``weights`` "fp8", "bf16",
        "fp32" or "auto" (the checkpoint's own format) builds an inference model whose
        projection matrices stay resident in that format (:mod:`dsv3.resident`): with
        ``mmap=True`` a tensor stored in that format is a read-only view of the mapped file
        (zero-copy, no anonymous memory), others are converted while loading."""
        from . import checkpoint
        if weights is None:
            return checkpoint.load(directory, cls, strict=strict)
        from . import resident
        if weights not in ("auto",) + resident.FORMATS:
            raise ValueError(f"[from_pretrained] weights must be None (float32, trainable), "
                             f"'auto' or one of {resident.FORMATS}, got {weights!r}")
        cfg, tensors, _ = resident.resident_tensors(
            directory, None if weights == "auto" else weights, mmap=bool(mmap), strict=strict)
        return cls._from_resident(cfg, tensors, _codes_checked=True)  # it rejects NaN codes

    # ------------------------------------------------------------------ compute
    def new_cache(self, batch: int = 1, max_len: int = 1024,
                  dtype: str = "float32") -> KVCache:
        """A decoding cache for this model: MLA keeps only the normalised latent and the roped
        k_pe per token per layer (``cache.bytes_per_token`` = (kv_lora_rank + qk_rope_head_dim)
        x num_hidden_layers x 4 bytes per sequence, 2 with ``dtype="bfloat16"``: the values are
        then stored rounded to bf16, as DeepSeek-V3's inference does, and attention reads those)."""
        op = "Model.new_cache"
        batch, max_len = integer(batch, "batch", op, lo=1), integer(max_len, "max_len", op, lo=1)
        bf16 = _cache_dtype(dtype, op)
        _memory.cache(op, self._config, batch, max_len, dtype=dtype)
        return self._m.new_cache(batch, max_len, bf16)

    def forward(self, tokens: np.ndarray, cache: Optional[KVCache] = None,
                start_pos: int = 0) -> np.ndarray:
        """Logits float32 (B, T, V) for int tokens (B, T) (or (T, V) for (T,)).

        Without a cache: one causal pass over the tokens (training-form attention). With a
        cache: incremental decoding in the absorbed MLA form; the tokens sit at positions
        ``start_pos ..`` and attend to everything cached before them."""
        start_pos = integer(start_pos, "start_pos", "Model.forward")
        if cache is None:
            if start_pos:
                raise ValueError("[Model.forward] start_pos needs a cache")
            _memory.activations("Model.forward", self._config, tokens)
            return self._m.forward(tokens)
        return self._m.forward_cached(tokens, cache, start_pos, False)

    def forward_with_hidden(self, tokens: np.ndarray, cache: KVCache,
                            start_pos: int) -> Tuple[np.ndarray, np.ndarray]:
        """Cached forward returning ``(logits, hidden)``, hidden = the final hidden state after
        ``model.norm`` (what the MTP module drafts from)."""
        start_pos = integer(start_pos, "start_pos", "Model.forward_with_hidden")
        return self._m.forward_cached(tokens, cache, start_pos, True)

    def new_mtp_cache(self, batch: int = 1, max_len: int = 1024,
                      dtype: str = "float32") -> KVCache:
        """A cache for the MTP modules' attention: layer k-1 holds module k's latent rows
        (``dtype`` as :meth:`new_cache`)."""
        op = "Model.new_mtp_cache"
        batch, max_len = integer(batch, "batch", op, lo=1), integer(max_len, "max_len", op, lo=1)
        bf16 = _cache_dtype(dtype, op)
        _memory.cache(op, self._config, batch, max_len, mtp=True, dtype=dtype)
        return self._m.new_mtp_cache(batch, max_len, bf16)

    def mtp_forward(self, hidden: np.ndarray, tokens: np.ndarray, cache: KVCache,
                    start_pos: int, k: int = 1) -> Tuple[np.ndarray, np.ndarray]:
        """MTP module k over cached rows ``start_pos ..`` (semantics §2.5): row i is fed
        ``(hidden_i, tokens_i)`` = (h^{k-1}_i float32 (B, S, D), t_{i+k} int (B, S)). Returns
        ``(logits (B, S, V), h^k (B, S, D))``; the logits of row i predict t_{i+k+1}."""
        op = "Model.mtp_forward"
        return self._m.mtp_forward_cached(hidden, tokens, cache, integer(start_pos, "start_pos", op),
                                          integer(k, "k", op, lo=1))

    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 speculative: Optional[str] = None, eos_token_id: Optional[int] = None,
                 num_draft_tokens: int = 1, callback=None, cache_dtype: str = "float32"):
        """Generate after ``prompt`` (a 1-D int sequence, or a list of them of any lengths).

        Returns ``out`` with ``out.tokens`` the new tokens only (int64; a list for a list of
        prompts), ending with ``eos_token_id`` when produced, and ``out.stats``: proposed,
        accepted, acceptance_rate, tokens_per_second, prompt_tokens_per_second,
        main_forwards, mtp_forwards, ... temperature 0 = greedy (argmax); otherwise sampling
        from softmax(logits / temperature) restricted by ``top_k`` (0 = off) and ``top_p``.
        ``speculative="mtp"`` drafts ``num_draft_tokens`` tokens per step with the MTP module
        and verifies them in one forward (greedy: identical output to plain greedy; sampling:
        the same distribution). A list of prompts is decoded prompt by prompt, each with the
        same ``seed``, so each result equals running that prompt alone; stats are summed
        (``out.per_prompt`` keeps each). ``callback(prompt_index, tokens)`` sees tokens as
        they come. Generation also stops at ``max_position_embeddings``. ``cache_dtype``:
        "float32" or "bfloat16" (see :meth:`new_cache`)."""
        from .generate import generate
        return generate(self, prompt, callback=callback, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                        speculative=speculative, eos_token_id=eos_token_id,
                        num_draft_tokens=num_draft_tokens, cache_dtype=cache_dtype)

    def stream(self, prompt, **kw):
        """Iterator over the new tokens of one prompt as they are produced; keywords as
        :meth:`generate`."""
        from .generate import stream
        return stream(self, prompt, **kw)

    def loss(self, tokens: np.ndarray, alpha: Optional[float] = None,
             mtp_weight: Optional[float] = None) -> Dict[str, float]:
        """``{loss, main, mtp, balance, expert_load}`` for int tokens (B, N) (N-1 targets per
        sequence). ``alpha`` (default ``config.seq_aux_loss_alpha``) weighs the sequence-wise
        balance loss; ``mtp_weight`` (default ``config.mtp_loss_weight``) is lambda."""
        _memory.activations("Model.loss", self._config, tokens, "loss")
        d, _ = self._m.loss(tokens, *self._weights(alpha, mtp_weight), False)
        return d

    def loss_and_grad(self, tokens: np.ndarray, alpha: Optional[float] = None,
                      mtp_weight: Optional[float] = None):
        """``(losses, grads)``: grads ``{hf_name: float32 array}`` for every trainable
        parameter (all but the gates' correction biases, which the balancer moves)."""
        self._refuse_training("Model.loss_and_grad")
        _memory.activations("Model.loss_and_grad", self._config, tokens, "grad")
        return self._m.loss(tokens, *self._weights(alpha, mtp_weight), True)

    def _weights(self, alpha, mtp_weight):
        a = self._config.seq_aux_loss_alpha if alpha is None else real(alpha, "alpha", "Model.loss",
                                                                         lo=0.0)
        w = self._config.mtp_loss_weight if mtp_weight is None else real(
            mtp_weight, "mtp_weight", "Model.loss", lo=0.0)
        return a, w

    def __repr__(self) -> str:
        return f"dsv3.Model({self._config!r})"


_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


def _shard_arg(shard, config: Config) -> Tuple[int, int]:
    """(ep, index) of Model's expert_shard argument ((1, 0) for None), checked."""
    if shard is None:
        return 1, 0
    if not isinstance(shard, (tuple, list)) or len(shard) != 2:
        raise TypeError(f"[Model] expert_shard must be a tuple (ep, index), got {shard!r}")
    ep = integer(shard[0], "expert_shard[0] (ep)", "Model", lo=1)
    index = integer(shard[1], "expert_shard[1] (index)", "Model", lo=0)
    E = config.n_routed_experts or 0
    if ep > 1 and (E == 0 or E % ep):
        raise ValueError(f"[Model] expert_shard: ep={ep} must divide n_routed_experts ({E})")
    if index >= ep:
        raise ValueError(f"[Model] expert_shard: index {index} must be < ep={ep}")
    return ep, index


def _cache_dtype(dtype, op: str) -> bool:
    """True for a bf16 cache; ValueError naming ``dtype`` otherwise."""
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"[{op}] dtype must be one of {CACHE_DTYPES}, got {dtype!r}")
    return dtype == "bfloat16"
