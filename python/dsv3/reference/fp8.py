"""Float64 / integer reference of the FP8 semantics (semantics §2.6), written from the format
definitions for the fp8 tests. Nothing here calls dsv3 or mirrors its bit tricks: decoding is
the textbook (-1)^s (1.m) 2^(e-bias) formula, rounding is numpy's round-half-even on the exact
quotient by the format's quantum, and the limited accumulator works on Python integers."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

# name: (exponent bits, mantissa bits, bias, ieee specials)
FORMATS: Dict[str, Tuple[int, int, int, bool]] = {
    "e4m3": (4, 3, 7, False),
    "e5m2": (5, 2, 15, True),
    "bf16": (8, 7, 127, True),
    "e5m6": (5, 6, 15, True),
}


def fmt_max(fmt: str) -> float:
    E, M, B, ieee = FORMATS[fmt]
    if ieee:  # the all-ones exponent is inf/NaN: the top finite binade is 2^E - 2
        return (2.0 - 2.0 ** -M) * 2.0 ** ((2 ** E - 2) - B)
    return (2.0 - 2.0 ** (1 - M)) * 2.0 ** ((2 ** E - 1) - B)  # only S.1111.111 is NaN


def decode_ref(code: int, fmt: str) -> float:
    E, M, B, ieee = FORMATS[fmt]
    s = (code >> (E + M)) & 1
    e = (code >> M) & (2 ** E - 1)
    m = code & (2 ** M - 1)
    if ieee and e == 2 ** E - 1:
        v = float("inf") if m == 0 else float("nan")
    elif not ieee and e == 2 ** E - 1 and m == 2 ** M - 1:
        v = float("nan")
    elif e == 0:
        v = m * 2.0 ** (1 - B - M)
    else:
        v = (1 + m / 2 ** M) * 2.0 ** (e - B)
    return -v if s else v


def decode_table(fmt: str) -> np.ndarray:
    """float64 value of each 8-bit code 0..255."""
    return np.array([decode_ref(c, fmt) for c in range(256)], dtype=np.float64)


def cast_ref(x: np.ndarray, fmt: str, saturate: bool = True) -> np.ndarray:
    """x (float32) rounded to fmt, round-half-even, as float32."""
    E, M, B, ieee = FORMATS[fmt]
    x64 = np.asarray(x, dtype=np.float64)
    a = np.abs(x64)
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(a)
        _, ex = np.frexp(np.where(finite, a, 1.0))  # a = f 2^ex, f in [0.5, 1)
        e = np.maximum(ex - 1, 1 - B)               # binade, clamped to the subnormal one
        q = np.ldexp(1.0, e - M)                    # the quantum at that binade
        r = np.rint(np.where(finite, a, 0.0) / q) * q  # a / q is exact; rint ties to even
        big = fmt_max(fmt)
        over = (r > big) | np.isinf(a)
        r = np.where(over, big if saturate else (np.inf if ieee else np.nan), r)
        r = np.where(np.isnan(a), np.nan, r)
        return np.copysign(r, x64).astype(np.float32)


def encode_ref(x: np.ndarray, fmt: str, saturate: bool = True) -> np.ndarray:
    """uint8 codes of x in fmt (8-bit formats). NaN -> the positive/negative all-ones code."""
    E, M, _, _ = FORMATS[fmt]
    v = cast_ref(x, fmt, saturate).astype(np.float64)
    table = decode_table(fmt)
    pos = table[: 2 ** (E + M)]                     # codes 0..127: magnitudes ascending
    finite_pos = pos[~np.isnan(pos)]
    mag = np.abs(v)
    idx = np.searchsorted(finite_pos, np.where(np.isnan(mag), 0.0, mag))
    code = np.where(np.isnan(mag), 2 ** (E + M) - 1, idx)
    assert np.all(np.isnan(mag) | (finite_pos[np.minimum(idx, len(finite_pos) - 1)] == mag))
    return (code | (np.signbit(v).astype(np.int64) << (E + M))).astype(np.uint8)


def pow2_ceil(s: np.ndarray) -> np.ndarray:
    return np.ldexp(1.0, np.ceil(np.log2(s.astype(np.float64))).astype(np.int64)).astype(np.float32)


def quantize_ref(x: np.ndarray, fmt: str = "e4m3", block=(1, 128),
                 pow2: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """2-D x: zero-pad to whole blocks, scale = max(amax, 1e-4)/max per block (fp32),
    codes = encode(x / scale) (fp32 division), cropped back to x's shape."""
    R, C = x.shape
    br, bc = block
    Rb, Cb = -(-R // br), -(-C // bc)
    pad = np.zeros((Rb * br, Cb * bc), np.float32)
    pad[:R, :C] = x
    amax = np.abs(pad).reshape(Rb, br, Cb, bc).max(axis=(1, 3))
    s = np.maximum(amax, np.float32(1e-4)) / np.float32(fmt_max(fmt))
    if pow2:
        s = pow2_ceil(s)
    full = np.repeat(np.repeat(s, br, 0), bc, 1)
    codes = encode_ref(pad / full, fmt, saturate=True)
    return codes[:R, :C], s.astype(np.float32)


def expand_scales(s: np.ndarray, block, R: int, C: int) -> np.ndarray:
    br, bc = block
    return np.repeat(np.repeat(s.astype(np.float64), br, 0), bc, 1)[:R, :C]


def dequantize_ref(codes: np.ndarray, s: np.ndarray, fmt: str, block) -> np.ndarray:
    """float64 decode(codes) * scale."""
    R, C = codes.shape
    return decode_table(fmt)[codes] * expand_scales(s, block, R, C)


def gemm_ref(a, sa, ablock, b, sb, bblock, fmt=("e4m3", "e4m3"), interval: Optional[int] = 128):
    """float64 C = sum over intervals of (sum a b) * sa * sb, and S = sum_k |a sa b sb| (the
    scale of the rounding-error bound)."""
    M, K = a.shape
    da = decode_table(fmt[0])[a]
    db = decode_table(fmt[1])[b]
    fa = expand_scales(sa, ablock, M, K)
    fb = expand_scales(sb, bblock, b.shape[0], K)
    P = K if interval is None else interval
    C = np.zeros((M, b.shape[0]))
    for p0 in range(0, K, P):
        sl = slice(p0, min(K, p0 + P))
        part = da[:, sl] @ db[:, sl].T
        C += part * fa[:, p0][:, None] * fb[:, p0][None, :]
    S = np.abs(da * fa) @ np.abs(db * fb).T
    return C, S


def _trunc_bits(v: int, k: int) -> int:
    """v truncated toward zero to k significant bits."""
    n = abs(v).bit_length()
    if n <= k:
        return v
    t = (abs(v) >> (n - k)) << (n - k)
    return t if v >= 0 else -t


def gemm_limited_ref(a, sa, ablock, b, sb, bblock, bits: int, interval: Optional[int],
                     fmt=("e4m3", "e4m3")) -> np.ndarray:
    """The emulated accumulator, exactly: products as integers in units of 2^-SHIFT (every
    fp8 product is a multiple of it), s <- trunc_bits(s + p) per product in k order, then the
    fp32 promotion acc += (s * sa) * sb. Returns float32 (M, N)."""
    SHIFT = 40
    M, K = a.shape
    N = b.shape[0]
    ia = [[int(np.ldexp(v, 20)) for v in row] for row in decode_table(fmt[0])[a]]
    ib = [[int(np.ldexp(v, 20)) for v in row] for row in decode_table(fmt[1])[b]]
    fa = expand_scales(sa, ablock, M, K).astype(np.float32)
    fb = expand_scales(sb, bblock, N, K).astype(np.float32)
    P = K if interval is None else interval
    out = np.zeros((M, N), np.float32)
    for m in range(M):
        for n in range(N):
            acc = np.float32(0)
            for p0 in range(0, K, P):
                s = 0
                for k in range(p0, min(K, p0 + P)):
                    s = _trunc_bits(s + ia[m][k] * ib[n][k], bits)
                part = np.float32(np.ldexp(float(s), -SHIFT))  # exact: <= 24 bits
                acc = np.float32(acc + np.float32(np.float32(part * fa[m, p0]) * fb[n, p0]))
            out[m, n] = acc
    return out
