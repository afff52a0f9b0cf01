"""Float64 reference of the low-precision GEMMs (semantics §2.6, §4), written from the formats'
definitions: bf16 rounding is the generic round-half-even cast of dsv3.reference.fp8 (bias
127, 7 mantissa bits), products and sums are exact in float64. The FP8 GEMM reference is
dsv3.reference.fp8.gemm_ref."""
from __future__ import annotations

from typing import Tuple

import numpy as np

from dsv3.reference.fp8 import cast_ref

U = 2.0 ** -24  # fp32 unit roundoff
TINY = 2.0 ** -126  # smallest normal fp32 / bf16


def gamma(n: int) -> float:
    """The fp32 bound of an n-term sum (Higham): |fl - exact| <= gamma(n) sum |terms|."""
    return n * U / (1 - n * U)


def bf16_ref(x: np.ndarray) -> np.ndarray:
    """x (float32) rounded to bf16, to nearest even, as float64 (overflow -> inf)."""
    return cast_ref(np.asarray(x, np.float32), "bf16", saturate=False).astype(np.float64)


def bf16_gemm_ref(a: np.ndarray, b: np.ndarray, daz: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """C = bf16(a) @ bf16(b) in float64 and S = |bf16(a)| @ |bf16(b)| (the error bound's scale).
    daz: operands and products below 2^-126 in magnitude count as zero (the avx512-bf16
    tier's vdpbf16ps; small inputs only: the products are formed one by one)."""
    fa, fb = bf16_ref(a), bf16_ref(b)
    with np.errstate(invalid="ignore", over="ignore"):
        if not daz:
            return fa @ fb, np.abs(fa) @ np.abs(fb)
        fa = np.where(np.abs(fa) < TINY, 0.0, fa)
        fb = np.where(np.abs(fb) < TINY, 0.0, fb)
        p = fa[:, :, None] * fb[None, :, :]
        p = np.where(np.abs(p) < TINY, 0.0, p)
        return p.sum(axis=1), np.abs(p).sum(axis=1)
