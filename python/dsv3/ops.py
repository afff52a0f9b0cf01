"""Core kernels as numpy functions: forward and backward of every layer piece.

Every function takes and returns numpy arrays. Float inputs must be float32 (anything else
raises ``TypeError``); integer inputs (ids, positions, targets) may be any integer dtype.
Non-contiguous and read-only inputs are accepted; outputs are always new arrays. Shape
errors raise ``ValueError`` and out-of-range ids ``IndexError``, naming the argument.
The C++ work runs with the GIL released. NaN/Inf in float inputs propagate as in IEEE
arithmetic (no check is made here; the model and trainer check their own inputs).

Backward functions return the gradients of a scalar loss L with respect to the inputs, given
``d_out`` = dL/d(output).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from . import _core, _memory
from ._args import integer, real
from .config import Config

__all__ = [
    "embedding", "embedding_backward", "linear", "linear_backward", "wlinear", "wlinear_rows",
    "bf16_matmul", "rmsnorm",
    "rmsnorm_backward", "swiglu", "swiglu_backward", "rope", "rope_backward", "rope_table",
    "yarn_mscale", "attention", "attention_backward", "cross_entropy",
    "cross_entropy_backward", "KVCache", "attention_layer", "attention_layer_backward",
    "attention_layer_decode",
    "moe_gate", "moe_forward", "moe_backward", "moe_balance_loss",
    "expert_load", "max_violation", "update_expert_bias", "moe_param_shapes", "init_moe_params",
]


def embedding(ids: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``weight[ids]``. ids: int (...) in [0, V); weight: float32 (V, D) -> (..., D)."""
    return _core.embedding(ids, weight)


def embedding_backward(d_out: np.ndarray, ids: np.ndarray, num_embeddings: int) -> np.ndarray:
    """dL/dweight (V, D): rows of ``d_out`` (..., D) summed into ``ids``' rows."""
    num_embeddings = integer(num_embeddings, "num_embeddings", "embedding_backward", lo=1)
    _memory.array("embedding_backward", "the gradient rows", num_embeddings, 4, d_out)
    return _core.embedding_backward(d_out, ids, num_embeddings)


def linear(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``x @ weight.T``. x: (..., K); weight: (O, K) -> (..., O). No bias (DeepSeek-V3 has none)."""
    return _core.linear(x, weight)


def linear_backward(dy: np.ndarray, x: np.ndarray, weight: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(dx, dweight) = (dy @ weight, dy^T @ x) over all leading dims."""
    return _core.linear_backward(dy, x, weight)


def wlinear(x: np.ndarray, fmt: str, data: np.ndarray,
            scale_inv: Optional[np.ndarray] = None) -> np.ndarray:
    """``x @ W.T`` over a weight kept in its storage format (the inference linear of resident
    weights, csrc/kernels/wlinear.h). fmt "fp32": data float32 (O, K); "bf16": data uint16
    bf16 bit patterns (O, K); "fp8": data uint8 E4M3 codes (O, K) with float32 scale_inv
    (ceil(O/128), ceil(K/128)), W = e4m3(code) * scale_inv[o // 128, k // 128], each 128-wide
    K block's sum multiplied by its scale. x: float32 (..., K) -> (..., O). Within the fp32
    reassociation bound of the dequantized-weight linear; the kernel tier is
    ``dsv3.build_info()["wlinear_tier"]``."""
    return _core.wlinear(x, fmt, data, scale_inv)


def wlinear_rows(ids: np.ndarray, fmt: str, data: np.ndarray,
                 scale_inv: Optional[np.ndarray] = None) -> np.ndarray:
    """Rows ``W[ids]`` as float32 (..., K) of a weight given as for :func:`wlinear` (fp8:
    e4m3(code) * scale_inv rounded once; NaN codes give NaN). ids out of [0, O) raise
    IndexError."""
    return _core.wlinear_rows(ids, fmt, data, scale_inv)


def bf16_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` with both operands rounded to bf16 (round-to-nearest-even), exact products and
    fp32 accumulation. a: float32 (M, K); b: float32 (K, N) -> float32 (M, N). Any strides
    (a transposed view is read in place). Runs on the low-precision tier of
    ``dsv3.build_info()["lowp"]``: on "avx512-bf16" bf16 values below 2^-126 in magnitude
    (and products below it) count as zero; on "fp32" they are kept (sgemm)."""
    return _core.bf16_matmul(a, b)


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """``weight * x / sqrt(mean(x**2, -1) + eps)`` in fp32. x: (..., D); weight: (D,)."""
    return _core.rmsnorm(x, weight, real(eps, "eps", "rmsnorm", lo=0.0))


def rmsnorm_backward(dy: np.ndarray, x: np.ndarray, weight: np.ndarray,
                     eps: float = 1e-6) -> Tuple[np.ndarray, np.ndarray]:
    """(dx, dweight) of :func:`rmsnorm`."""
    return _core.rmsnorm_backward(dy, x, weight, real(eps, "eps", "rmsnorm_backward", lo=0.0))


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """``silu(gate) * up`` elementwise (the SwiGLU MLP is ``down(swiglu(gate(x), up(x)))``)."""
    return _core.swiglu(gate, up)


def swiglu_backward(dh: np.ndarray, gate: np.ndarray, up: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(dgate, dup) of :func:`swiglu`."""
    return _core.swiglu_backward(dh, gate, up)


def rope_table(dim: int, theta: float = 10000.0, rope_scaling: Optional[dict] = None) -> dict:
    """The rotary frequencies (semantics §2.2): ``inv_freq`` (dim/2,) float64 after YaRN,
    ``attn_factor`` (cos/sin multiplier) and the YaRN correction range ``low``, ``high``."""
    dim = integer(dim, "dim", "rope_table", lo=1)
    _memory.array("rope_table", "the frequencies of dim", dim, 8)
    return _core.rope_table(dim, real(theta, "theta", "rope_table"), rope_scaling)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """``0.1 * mscale * ln(scale) + 1`` for scale > 1, else 1."""
    return _core.yarn_mscale(real(scale, "scale", "yarn_mscale"), real(mscale, "mscale", "yarn_mscale"))


def rope(x: np.ndarray, positions: np.ndarray, theta: float = 10000.0,
         rope_scaling: Optional[dict] = None) -> np.ndarray:
    """Rotate adjacent pairs ``(x[..., 2i], x[..., 2i+1])`` by ``positions * inv_freq[i]``.

    x: (T, H, Dr) or (B, T, H, Dr) float32; positions: (T,) or (B, T) ints >= 0.
    ``rope_scaling``: None or a YaRN dict as in DeepSeek-V3's config.json.
    """
    return _core.rope(x, positions, real(theta, "theta", "rope"), rope_scaling)


def rope_backward(dy: np.ndarray, positions: np.ndarray, theta: float = 10000.0,
                  rope_scaling: Optional[dict] = None) -> np.ndarray:
    """dL/dx of :func:`rope` (rotation by the opposite angle, times the same attn_factor)."""
    return _core.rope_backward(dy, positions, real(theta, "theta", "rope_backward"), rope_scaling)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
              start_pos: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Causal softmax attention per head: returns ``(out, lse)``.

    q: (B, Tq, H, Dk); k: (B, Tk, Hkv, Dk); v: (B, Tk, Hkv, Dv) (or without the B axis);
    H must be a multiple of Hkv (GQA shares each kv head among H/Hkv query heads).
    Query i is at absolute position ``start_pos + i`` and attends to keys ``j <= start_pos + i``
    (so Tk >= start_pos + Tq). out: (B, Tq, H, Dv); lse: (B, H, Tq), the log-sum-exp of each
    row's scaled, masked scores (needed by :func:`attention_backward`).
    """
    scale, start_pos = real(scale, "scale", "attention"), integer(start_pos, "start_pos", "attention")
    return _core.attention(q, k, v, scale, start_pos)


def attention_backward(d_out: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                       out: np.ndarray, lse: np.ndarray, scale: float,
                       start_pos: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dq, dk, dv) of :func:`attention`, given its ``out`` and ``lse``."""
    op = "attention_backward"
    scale, start_pos = real(scale, "scale", op), integer(start_pos, "start_pos", op)
    return _core.attention_backward(d_out, q, k, v, out, lse, scale, start_pos)


def cross_entropy(logits: np.ndarray, targets: np.ndarray,
                  ignore_index: int = -100) -> Tuple[float, np.ndarray, int]:
    """Mean softmax cross-entropy over the targets that are not ``ignore_index``.

    logits: (..., V) float32; targets: (...) ints in [0, V) or ``ignore_index``.
    Returns ``(loss, lse, count)``: the mean loss (NaN when every target is ignored, as in
    PyTorch), the per-row log-sum-exp (...), and the number of counted targets.
    """
    ignore_index = integer(ignore_index, "ignore_index", "cross_entropy", lo=None)
    return _core.cross_entropy(logits, targets, ignore_index)


def cross_entropy_backward(logits: np.ndarray, targets: np.ndarray, lse: np.ndarray,
                           ignore_index: int = -100, d_loss: float = 1.0) -> np.ndarray:
    """dL/dlogits of ``d_loss * cross_entropy(...)``: ``(softmax - onehot) * d_loss / count``
    on counted rows, 0 on ignored rows."""
    op = "cross_entropy_backward"
    ignore_index = integer(ignore_index, "ignore_index", op, lo=None)
    return _core.cross_entropy_backward(logits, targets, lse, ignore_index,
                                        real(d_loss, "d_loss", op))


# ---------------------------------------------------------------- attention layers (MLA, MHA, GQA)
KVCache = _core.KVCache
CACHE_DTYPES = ("float32", "bfloat16")  # KVCache(dtype=...), Model.new_cache, generate
KVCache.__doc__ = """Decoding cache for ``layers`` attention layers, ``batch`` sequences of up to
``max_len`` tokens: ``KVCache(cfg, batch=1, max_len=1024, layers=None, dtype="float32")``;
``dtype="bfloat16"`` stores the rows rounded to bf16 in half the bytes (the attention reads
those values; ``layer_data`` returns them as float32).

MLA configs get a latent cache (``kind == "latent"``): per token per layer only the normalised
latent ``c`` (kv_lora_rank) and the roped ``k_pe`` (qk_rope_head_dim). MHA/GQA configs get a
``"kv"`` cache of roped keys and values of every kv head. ``bytes_per_token`` is per sequence
(all layers, 4 bytes per float); ``nbytes`` is the whole allocation; ``length[l]`` counts the
tokens written in layer l; ``layer_data(l)`` copies layer l out as (batch, max_len, width)."""


def checked_config(cfg, op: str):
    """The config an op hands the engine: for a :class:`dsv3.Config`, a validated copy (so a
    config whose fields were set to floats such as 64.5, or mutated after construction into
    an invalid combination, raises Config's own ValueError naming the field, and later edits
    cannot reach a running call); any other object passes through, and the engine names a
    missing or mistyped field."""
    if isinstance(cfg, Config):
        try:
            return cfg.replace()
        except ValueError as e:
            raise ValueError(f"[{op}] cfg is not a valid Config: {e}") from None
    return cfg


def attention_layer(x: np.ndarray, params: dict, cfg, start_pos: int = 0) -> np.ndarray:
    """One attention layer in training (naive) form for ``cfg.attention_type``.

    x: (B, T, D) or (T, D) float32 at positions ``start_pos + t`` (causal within the T tokens).
    params: Hugging Face names relative to ``self_attn.``: MLA ``q_a_proj.weight``,
    ``q_a_layernorm.weight``, ``q_b_proj.weight`` (or ``q_proj.weight`` when q_lora_rank is 0),
    ``kv_a_proj_with_mqa.weight``, ``kv_a_layernorm.weight``, ``kv_b_proj.weight``,
    ``o_proj.weight``; MHA/GQA ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (``.weight``),
    all float32 [out, in], and no other key (a missing or unexpected key raises ValueError).
    Returns the layer output, shaped like x.
    """
    op = "attention_layer"
    start_pos = integer(start_pos, "start_pos", op)
    return _core.attention_layer(x, params, checked_config(cfg, op), start_pos)


def attention_layer_backward(d_out: np.ndarray, x: np.ndarray, params: dict, cfg,
                             start_pos: int = 0) -> Tuple[np.ndarray, dict]:
    """``(dx, grads)`` of :func:`attention_layer`; ``grads`` has the layer's Hugging Face names
    (those of layout.h's mla_param_specs / mha_param_specs, which params must hold exactly)."""
    op = "attention_layer_backward"
    start_pos = integer(start_pos, "start_pos", op)
    return _core.attention_layer_backward(d_out, x, params, checked_config(cfg, op), start_pos)


def attention_layer_decode(x: np.ndarray, params: dict, cfg, cache: "KVCache", layer: int,
                           start_pos: int, absorbed: bool = True) -> np.ndarray:
    """Cached decoding of layer ``layer`` for the tokens x (B, S, D) at positions
    ``start_pos .. start_pos+S-1``: their cache rows are written, then every query attends to
    the cached tokens ``0 .. start_pos+s`` (chunked prefill and multi-token verification use
    the same call). MLA runs the absorbed form (``absorbed=False``: the naive form over the
    same latent cache, decompressing k/v every call). ``start_pos`` may not exceed the tokens
    already cached in that layer (smaller values overwrite: rollback); on error the cache is
    unchanged."""
    op = "attention_layer_decode"
    layer, start_pos = integer(layer, "layer", op), integer(start_pos, "start_pos", op)
    return _core.attention_layer_decode(x, params, checked_config(cfg, op), cache, layer,
                                        start_pos, bool(absorbed))

# ---------------------------------------------------------------------------------- MoE
# ``cfg`` below is a :class:`dsv3.Config` (or any object with its MoE fields: n_routed_experts,
# num_experts_per_tok, n_group, topk_group, topk_method, scoring_func, norm_topk_prob,
# routed_scaling_factor, moe_intermediate_size, n_shared_experts). The hidden size D is taken
# from ``x``. Invalid combinations (num_experts_per_tok > n_routed_experts, n_group not
# dividing n_routed_experts, ...) raise ValueError naming the field, as do NaN/inf in x.
# The layer functions keep their saved activations and scratch per calling thread between
# calls (about (2 F + D + 1) K + E + 2 S floats per token, S the shared width), so repeated
# calls do not page-fault tens of MB in each time.


def moe_gate(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray],
             cfg: Config) -> Tuple[np.ndarray, np.ndarray]:
    """DeepSeekMoE routing (semantics §2.3), in fp32.

    x: float32 (..., D); weight: float32 (E, D) (``gate.weight``); bias: float32 (E,)
    (``gate.e_score_correction_bias``) for topk_method "noaux_tc", None for "greedy" and
    "group_limited_greedy". Returns ``(topk_idx int64 (..., K), topk_weight float32 (..., K))``,
    experts sorted by decreasing biased score, ties toward the lower index; the weights are the
    unbiased scores of the chosen experts (normalised if norm_topk_prob, times
    routed_scaling_factor).
    """
    return _core.moe_gate(x, weight, bias, checked_config(cfg, "moe_gate"))


def moe_param_shapes(cfg: Config, hidden_size: Optional[int] = None) -> Dict[str, Tuple[int, ...]]:
    """The parameters of one MoE layer: Hugging Face names relative to the layer
    (``model.layers.{i}.mlp.``) -> shapes, in layout order. ``hidden_size`` defaults to
    ``cfg.hidden_size``."""
    cfg = checked_config(cfg, "moe_param_shapes")
    D = cfg.hidden_size if hidden_size is None else integer(hidden_size, "hidden_size",
                                                            "moe_param_shapes", lo=1)
    return {name: tuple(shape) for name, shape, _ in _core.moe_param_specs(cfg, D)}


def init_moe_params(cfg: Config, seed: int = 0, std: Optional[float] = None,
                    hidden_size: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Random float32 parameters for :func:`moe_forward`: N(0, std) weights (std defaults to
    ``cfg.initializer_range``), a zero correction bias."""
    op = "init_moe_params"
    cfg = checked_config(cfg, op)
    rng = np.random.default_rng(integer(seed, "seed", op, hi=2 ** 64 - 1))
    std = cfg.initializer_range if std is None else real(std, "std", op, lo=0.0)
    D = cfg.hidden_size if hidden_size is None else integer(hidden_size, "hidden_size", op, lo=1)
    out: Dict[str, np.ndarray] = {}
    specs = _core.moe_param_specs(cfg, D)
    _memory.parameters("init_moe_params", [shape for _, shape, _ in specs])
    for name, shape, init in specs:  # init as in the model's layout
        if init == "normal":
            out[name] = (rng.standard_normal(shape) * std).astype(np.float32)
        else:
            out[name] = np.full(shape, 1.0 if init == "ones" else 0.0, np.float32)
    return out


def moe_forward(x: np.ndarray, params: Dict[str, np.ndarray], cfg: Config,
                balance_alpha: float = 0.0) -> Tuple[np.ndarray, Dict[str, Any]]:
    """The DeepSeekMoE layer: ``y = Shared(x) + sum_k w_k Expert_{idx_k}(x)`` (semantics §2.3).

    x: float32 (T, D) (one sequence) or (B, T, D) (B sequences). params: float32 arrays keyed
    by Hugging Face names relative to the layer, exactly those of :func:`moe_param_shapes`
    (missing or unexpected keys, wrong shapes -> ValueError). Returns ``(y, aux)`` with y the
    shape of x and aux:

    - ``topk_idx`` int64 (..., K), ``topk_weight`` float32 (..., K): the routing;
    - ``scores`` float32 (..., E): the unbiased gate scores s;
    - ``expert_load`` int64 (E,): tokens routed to each expert; ``max_violation`` float:
      max(load) / mean(load) - 1;
    - ``balance_loss`` float: the sequence-wise balance loss (semantics §2.4) with
      ``alpha = balance_alpha``, averaged over the B sequences (0.0 when balance_alpha is 0).
    """
    op = "moe_forward"
    return _core.moe_forward(x, params, checked_config(cfg, op),
                             real(balance_alpha, "balance_alpha", op, lo=0.0))


def moe_backward(dy: np.ndarray, x: np.ndarray, params: Dict[str, np.ndarray], cfg: Config,
                 balance_alpha: float = 0.0) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """Gradients of ``L = sum(dy * y) + balance_loss`` for ``y, aux = moe_forward(x, params,
    cfg, balance_alpha)`` (the forward is re-run to rebuild what the backward needs).

    Returns ``(dx, grads)``: dx float32 like x; grads float32 keyed like params, except
    ``gate.e_score_correction_bias``, which has no gradient (see :func:`update_expert_bias`).
    The routing is piecewise constant: the gate weight's gradient flows through the unbiased
    scores of the chosen experts, their normalisation and routed_scaling_factor (and through
    all scores for the balance loss).
    """
    op = "moe_backward"
    return _core.moe_backward(dy, x, params, checked_config(cfg, op),
                              real(balance_alpha, "balance_alpha", op, lo=0.0))


def moe_balance_loss(scores: np.ndarray, topk_idx: np.ndarray,
                     alpha: float) -> Tuple[float, np.ndarray]:
    """Sequence-wise balance loss (semantics §2.4) and its gradient.

    scores: float32 (T, E) or (B, T, E), the unbiased gate scores s; topk_idx: ints (..., K).
    Per sequence ``L = alpha * sum_i f_i P_i`` with ``f_i = E / (K T) * #{t : i in topk_t}``,
    ``P_i = mean_t s_{i,t} / sum_j s_{j,t}``; the result is the mean over sequences. Returns
    ``(L, dL/dscores float32 like scores)``.
    """
    return _core.moe_balance_loss(scores, topk_idx, real(alpha, "alpha", "moe_balance_loss", lo=0.0))


def expert_load(topk_idx: np.ndarray, n_routed_experts: int) -> np.ndarray:
    """Tokens routed to each expert: int64 (E,) counts of the ids in ``topk_idx`` (any shape)."""
    E = integer(n_routed_experts, "n_routed_experts", "expert_load", lo=1)
    _memory.array("expert_load", "the counts of n_routed_experts", E, 8)
    return _core.expert_load(topk_idx, E)


def max_violation(load: np.ndarray) -> float:
    """MaxVio = max_i load_i / mean(load) - 1 (0 for an all-zero load). load: ints (E,)."""
    return _core.max_violation(load)


def update_expert_bias(bias: np.ndarray, load: np.ndarray, gamma: float) -> np.ndarray:
    """Aux-loss-free balancing step: a new float32 (E,) array
    ``bias + gamma * sign(mean(load) - load)`` (the input is not modified). load: ints (E,),
    e.g. the expert_load of a whole training step; gamma is cfg.bias_update_speed."""
    return _core.update_expert_bias(bias, load, real(gamma, "gamma", "update_expert_bias", lo=0.0))
