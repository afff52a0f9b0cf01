"""FP8 emulation (semantics §2.6): bit-exact formats, fine-grained quantization, the FP8 GEMM with
promotion and limited accumulation, and the FP8 linear layer used for training.

Formats (``fmt``):

=======  =============  ====  ========  ==================================================
name     bits (S+E+M)   bias  max       specials
=======  =============  ====  ========  ==================================================
e4m3     1+4+3          7     448       no inf; NaN = S.1111.111; subnormals to 2^-9
e5m2     1+5+2          15    57344     IEEE inf/NaN; subnormals to 2^-16
bf16     1+8+7          127   3.39e38   the top half of an fp32 (cast only)
e5m6     1+5+6          15    65024     IEEE-like, subnormals to 2^-20 (dsv3's definition;
                                        cast only)
=======  =============  ====  ========  ==================================================

Rounding is to nearest, ties to even, done with integer bit operations (independent of the
FPU mode). An overflow (a rounded magnitude above max, or ±inf) gives ±max when
``saturate=True`` (the default), else NaN for e4m3 and ±inf for the IEEE formats (the OCP
non-saturating mode). NaN stays NaN (encoded S.1..1.1..1), -0 keeps its sign.

Note on PyTorch: torch 2.13's CPU ``.to(torch.float8_e4m3fn)`` saturates (finite overflow and
±inf give ±448, pytorch/pytorch#178817), i.e. it equals ``encode(x, "e4m3", saturate=True)``;
its ``float8_e5m2`` and ``bfloat16`` casts equal ``saturate=False``.

Arrays are numpy; float inputs must be float32 and codes uint8 (else ``TypeError``); shape,
format and option errors raise ``ValueError`` naming the argument; outputs are new arrays and
the C++ work runs without the GIL.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core

__all__ = [
    "FORMATS", "format_info", "cast", "encode", "decode", "quantize", "dequantize", "gemm",
    "linear", "linear_backward",
]

#: Every format name accepted by :func:`cast`; the first two also have 8-bit codes.
FORMATS: Tuple[str, ...] = ("e4m3", "e5m2", "bf16", "e5m6")

Block = Tuple[int, int]
Fmt = Union[str, Tuple[str, str]]


def format_info(fmt: str) -> Dict[str, object]:
    """Parameters of a format: name, exponent_bits, mantissa_bits, bias, ieee (has inf),
    byte_codes (8-bit codes available), max, min_subnormal."""
    return dict(_core.fp8_format_info(fmt))


def cast(x: np.ndarray, fmt: str = "e4m3", saturate: bool = True) -> np.ndarray:
    """Round float32 ``x`` (any shape) to ``fmt`` and return the values as float32."""
    return _core.fp8_cast(x, fmt, bool(saturate))


def encode(x: np.ndarray, fmt: str = "e4m3", saturate: bool = True) -> np.ndarray:
    """The 8-bit codes (uint8, shape of ``x``) of float32 ``x`` in ``fmt`` ("e4m3" or "e5m2")."""
    return _core.fp8_encode(x, fmt, bool(saturate))


def decode(codes: np.ndarray, fmt: str = "e4m3") -> np.ndarray:
    """The float32 values of uint8 ``codes`` (any shape) in ``fmt`` ("e4m3" or "e5m2")."""
    return _core.fp8_decode(codes, fmt)


def _block(block: Sequence[int], name: str = "block") -> Block:
    try:
        pair = tuple(block)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(isinstance(b, (int, np.integer)) and
                                 not isinstance(b, (bool, np.bool_)) for b in pair):
        # (1.5, 2) was truncated to (1, 2) silently
        raise ValueError(f"[fp8] {name} must be a pair of positive ints (rows, cols), "
                         f"got {block!r}")
    br, bc = (int(b) for b in pair)
    if br < 1 or bc < 1:
        raise ValueError(f"[fp8] {name} sizes must be >= 1, got {name}=({br}, {bc})")
    # a block larger than the tensor is the whole tensor; the engine takes int64
    return min(br, 2 ** 62), min(bc, 2 ** 62)


def _fit(block: Block, shape: Tuple[int, ...]) -> Block:
    """A block that covers a whole axis of ``shape`` is that axis (the same scales): the engine
    then never sees block sizes far beyond the tensor (2**40 crashed it with SIGFPE)."""
    br, bc = block
    if len(shape) == 2 and br > 1:
        br = max(1, min(br, shape[0]))
    if len(shape) >= 1:
        bc = max(1, min(bc, shape[-1]))
    return br, bc


def quantize(x: np.ndarray, fmt: str = "e4m3", block: Sequence[int] = (1, 128),
             pow2_scale: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Fine-grained quantization with one scale per ``block = (br, bc)``.

    ``scale = max(amax, 1e-4) / fmt_max`` per block (fp32; with ``pow2_scale`` rounded up to
    ``2**ceil(log2(scale))``, a UE8M0 exponent), ``codes = encode(x / scale, saturating)``.

    x: float32. With ``br == 1`` (activation tiles, the default 1x128) x may have any rank
    >= 1 and tiles run along the last axis: codes (*x.shape) uint8, scales
    (*x.shape[:-1], ceil(C/bc)) float32. With ``br > 1`` (weights: ``block=(128, 128)``) x
    must be 2-D (R, C): scales (ceil(R/br), ceil(C/bc)). Partial blocks at the edges behave as
    if zero-padded (their amax is over the real elements); codes keep x's shape.
    ``block=x.shape`` gives one scale per tensor, shape (1, 1).

    x must be finite: a NaN or Inf would turn its whole block's scale into NaN/Inf, so it
    raises ValueError naming x and the block.
    """
    br, bc = _fit(_block(block), np.shape(x))
    return _core.fp8_quantize(x, fmt, br, bc, bool(pow2_scale))


def dequantize(codes: np.ndarray, scales: np.ndarray, block: Sequence[int] = (1, 128),
               fmt: str = "e4m3") -> np.ndarray:
    """``decode(codes) * scale`` of each element's block (float32, shape of ``codes``).

    codes: uint8 from :func:`quantize`; scales: float32 of the shape quantize returns for
    that block (a DeepSeek-V3 checkpoint's ``weight_scale_inv`` with ``block=(128, 128)``).
    """
    br, bc = _fit(_block(block), np.shape(codes))
    return _core.fp8_dequantize(codes, scales, br, bc, fmt)


def gemm(a_codes: np.ndarray, a_scales: np.ndarray, b_codes: np.ndarray, b_scales: np.ndarray,
         accumulator_bits: Optional[int] = None, promotion_interval: Optional[int] = 128,
         fmt: Fmt = "e4m3") -> np.ndarray:
    """``C = A @ B^T`` (float32 (M, N)) for fp8 operands with fine-grained scales.

    a_codes: uint8 (M, K); b_codes: uint8 (N, K). Each operand's scale layout is read from
    its scales' shape (float32):

    * ``(rows, ceil(K/128))``: 1x128 tiles (activations, gradients; ``quantize(x)``),
    * ``(ceil(rows/128), ceil(K/128))``: 128x128 blocks (weights; ``block=(128, 128)``),
    * ``(1, 1)``: one scale per tensor (``block=x.shape``).

    Per interval of ``promotion_interval`` products along K, the partial sums are accumulated
    and then promoted: ``C += partial * sa * sb`` in fp32, with the scales of the chunk the
    interval lies in. ``accumulator_bits=None``: the partial sums are fp32 (computed by sgemm
    on the dequantized operands; equal to the chunked form up to fp32 rounding).
    ``accumulator_bits=k`` (1..24): after every add the running sum is truncated toward zero
    to k significant bits (about 14 on H800 tensor cores). ``promotion_interval=None``:
    the whole K in one limited sum — needs per-tensor scales (the report's no-promotion
    experiment). Otherwise the interval must divide 128 when a tiled/blocked operand has more
    than one chunk along K.

    fmt: "e4m3" / "e5m2" for both operands, or a pair ``(a_fmt, b_fmt)`` (e.g.
    ``("e5m2", "e4m3")`` for e5m2 gradients times e4m3 weights).
    """
    a_fmt, b_fmt = (fmt, fmt) if isinstance(fmt, str) else tuple(fmt)
    return _core.fp8_gemm(a_codes, a_scales, b_codes, b_scales,
                          None if accumulator_bits is None else int(accumulator_bits),
                          None if promotion_interval is None else int(promotion_interval),
                          a_fmt, b_fmt)


def linear(x: np.ndarray, weight: np.ndarray, pow2_scale: bool = False,
           accumulator_bits: Optional[int] = None,
           promotion_interval: Optional[int] = 128) -> np.ndarray:
    """FP8 forward of a linear layer: ``y = Q(x) @ Q(weight)^T`` (float32 (..., O)).

    x: float32 (..., K), quantized to e4m3 in 1x128 tiles along K; weight: float32 (O, K),
    quantized to e4m3 in 128x128 blocks. The GEMM options are those of :func:`gemm`.
    """
    return _core.fp8_linear(x, weight, bool(pow2_scale),
                            None if accumulator_bits is None else int(accumulator_bits),
                            None if promotion_interval is None else int(promotion_interval))


def linear_backward(dy: np.ndarray, x: np.ndarray, weight: np.ndarray,
                    grad_fmt: str = "e4m3", pow2_scale: bool = False,
                    accumulator_bits: Optional[int] = None,
                    promotion_interval: Optional[int] = 128) -> Tuple[np.ndarray, np.ndarray]:
    """FP8 backward of :func:`linear`: ``(dx, dweight)``, float32 of the shapes of x, weight.

    Each GEMM quantizes its operands along its own inner dimension:
    ``dx = Q(dy) @ Q(weight^T)^T`` (dy in 1x128 tiles along O, weight in 128x128 blocks) and
    ``dweight = Q(dy^T) @ Q(x^T)^T`` (both in 1x128 tiles along the tokens, all leading dims
    of x flattened). dy: float32 (..., O), quantized to ``grad_fmt`` ("e4m3", or "e5m2").
    """
    return _core.fp8_linear_backward(
        dy, x, weight, grad_fmt, bool(pow2_scale),
        None if accumulator_bits is None else int(accumulator_bits),
        None if promotion_interval is None else int(promotion_interval))
