"""FP8 GEMM and the FP8 linear layer (semantics §2.6).

Tolerances. fp32 accumulation mode is checked against the float64 value of the chunked
formula with the rigorous bound of any fp32 summation order: |C - ref| <= gamma_{K+2} * S,
gamma_n = n u / (1 - n u), u = 2^-24, S = sum_k |a sa b sb| (K products, plus the rounding of
a*sa and b*sb). Limited accumulation is deterministic, so it is compared BIT-EXACTLY with an
integer implementation of s <- trunc_k(s + p) and the fp32 promotion (dsv3.reference.fp8)."""
from __future__ import annotations

import numpy as np
import pytest

import dsv3
from conftest import noncontig, readonly
from dsv3 import fp8
from dsv3.reference.fp8 import decode_table, gemm_limited_ref, gemm_ref, quantize_ref

U = 2.0 ** -24
TILE, BLOCK = (1, 128), (128, 128)


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def operand(rng, rows, K, layout, fmt="e4m3", dist="normal"):
    """(codes, scales, block) of a random [rows, K] operand with the given scale layout."""
    x = rng.standard_normal((rows, K)) if dist == "normal" else rng.uniform(0, 1, (rows, K))
    x *= np.exp2(rng.uniform(-3, 3, (rows, 1)))
    x = x.astype(np.float32)
    block = {"tile": TILE, "block": BLOCK, "tensor": (rows, K)}[layout]
    codes, scales = fp8.quantize(x, fmt, block)
    return codes, scales, block


def assert_within_fp32_bound(name, C, ref, S, K):
    err = np.abs(C.astype(np.float64) - ref)
    bound = gamma(K + 2) * S
    worst = np.max(err / np.maximum(bound, 1e-300))
    assert np.all(err <= bound), f"{name}: max err/bound {worst:.3f}"


SIZES = [(1, 1, 1), (31, 33, 127), (33, 31, 129), (127, 129, 257), (5, 200, 300), (129, 1, 31)]


@pytest.mark.parametrize("M, N, K", SIZES)
@pytest.mark.parametrize("la, lb", [("tile", "block"), ("tile", "tile"), ("tensor", "tensor"),
                                    ("block", "tile")])
def test_gemm_fp32_accumulation(M, N, K, la, lb, rng):
    a, sa, ba = operand(rng, M, K, la)
    b, sb, bb = operand(rng, N, K, lb)
    C = fp8.gemm(a, sa, b, sb)
    assert C.shape == (M, N) and C.dtype == np.float32
    ref, S = gemm_ref(a, sa, ba, b, sb, bb)
    assert_within_fp32_bound(f"{M}x{N}x{K} {la}/{lb}", C, ref, S, K)


@pytest.mark.parametrize("fmt", [("e5m2", "e4m3"), ("e4m3", "e5m2"), "e5m2"])
def test_gemm_e5m2_operands(fmt, rng):
    fa, fb = (fmt, fmt) if isinstance(fmt, str) else fmt
    a, sa, ba = operand(rng, 33, 300, "tile", fa)
    b, sb, bb = operand(rng, 130, 300, "block", fb)
    ref, S = gemm_ref(a, sa, ba, b, sb, bb, fmt=(fa, fb))
    assert_within_fp32_bound(f"{fmt}", fp8.gemm(a, sa, b, sb, fmt=fmt), ref, S, 300)
    # bit-exact limited accumulation too (e5m2 products span 2^-32 .. 2^31.6)
    got = fp8.gemm(a[:3], sa[:3], b[:17], sb[:1], 12, 64, fmt=fmt)
    want = gemm_limited_ref(a[:3], sa[:3], ba, b[:17], sb[:1], bb, 12, 64, fmt=(fa, fb))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


LIMITED = [  # (M, N, K, layouts, bits, promotion_interval)
    (9, 17, 300, ("tile", "block"), 14, 128),   # M crosses the 8-row tile, N the 16 lanes
    (3, 33, 257, ("tile", "tile"), 8, 32),
    (5, 7, 200, ("tensor", "tensor"), 14, None),
    (4, 20, 130, ("tensor", "block"), 24, 128),  # 24 bits: fp32 with round-toward-zero adds
    (1, 1, 1, ("tile", "block"), 14, 128),
    (2, 3, 64, ("tile", "block"), 1, 16),
]


@pytest.mark.parametrize("M, N, K, layouts, bits, P", LIMITED)
def test_gemm_limited_accumulation_bit_exact(M, N, K, layouts, bits, P, rng):
    a, sa, ba = operand(rng, M, K, layouts[0])
    b, sb, bb = operand(rng, N, K, layouts[1])
    got = fp8.gemm(a, sa, b, sb, accumulator_bits=bits, promotion_interval=P)
    want = gemm_limited_ref(a, sa, ba, b, sb, bb, bits, P)
    diff = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))
    assert diff.size == 0, (f"{M}x{N}x{K} {layouts} bits={bits} P={P}: {diff.size} differ, "
                            f"e.g. {got.ravel()[diff[:3]]} vs {want.ravel()[diff[:3]]}")


def rel_err(rng, K, P, bits=14, M=16, N=16):
    a, sa, ba = operand(rng, M, K, "tensor", dist="uniform")
    b, sb, bb = operand(rng, N, K, "tensor", dist="uniform")
    ref, _ = gemm_ref(a, sa, ba, b, sb, bb)
    C = fp8.gemm(a, sa, b, sb, accumulator_bits=bits, promotion_interval=P)
    return float(np.max(np.abs(C - ref) / np.abs(ref)))


def test_limited_accumulation_error_grows_with_K_and_promotion_bounds_it(rng):
    """All-positive products: truncation toward zero loses ~2^-14 of the running sum per add,
    so without promotion the relative error grows ~linearly with K; restarting every 128
    products keeps it at the level of one 128-product sum."""
    none = {K: rel_err(rng, K, None) for K in (256, 1024, 4096)}
    prom = {K: rel_err(rng, K, 128) for K in (256, 1024, 4096)}
    assert none[1024] > 2.5 * none[256] and none[4096] > 2.5 * none[1024], none
    assert 0.01 < none[4096] < 0.2, none
    assert max(prom.values()) < 2 * min(prom.values()), prom
    assert prom[4096] < none[4096] / 20, (prom, none)
    assert rel_err(rng, 4096, None, bits=24) < 1e-4  # an fp32-width accumulator is fine


def test_gemm_deterministic_across_threads(rng):
    a, sa, _ = operand(rng, 40, 700, "tile")
    b, sb, _ = operand(rng, 50, 700, "block")
    n0 = dsv3.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            dsv3.set_num_threads(nt)
            outs.append(fp8.gemm(a, sa, b, sb, accumulator_bits=14))
        assert np.array_equal(outs[0], outs[1])
    finally:
        dsv3.set_num_threads(n0)


def test_gemm_noncontiguous_readonly(rng):
    a, sa, _ = operand(rng, 31, 260, "tile")
    b, sb, _ = operand(rng, 33, 260, "block")
    want = fp8.gemm(a, sa, b, sb, accumulator_bits=14)
    got = fp8.gemm(noncontig(a), readonly(sa), readonly(b), noncontig(sb), accumulator_bits=14)
    assert np.array_equal(got, want)


def test_gemm_bad_arguments(rng):
    a, sa, _ = operand(rng, 4, 300, "tile")
    b, sb, _ = operand(rng, 6, 300, "block")
    cases = [
        (TypeError, r"a_codes must be a uint8", dict(a=a.astype(np.float32))),
        (TypeError, r"b_codes must be a uint8", dict(b=b.view(np.int8))),
        (TypeError, r"a_scales must be a float32", dict(sa=sa.astype(np.float64))),
        (ValueError, r"b_codes must have K = a_codes.shape\[1\] = 300", dict(b=b[:, :299])),
        (ValueError, r"a_codes must be 2-D", dict(a=a[0])),
        (ValueError, r"a_scales must have shape \(4, 3\)", dict(sa=sa[:, :2])),
        (ValueError, r"b_scales must have shape \(6, 3\).*\(1, 3\)", dict(sb=sb.T.copy())),
        (ValueError, r"fmt must be one of", dict(fmt="e4m3x")),
        (ValueError, r"format must be \"e4m3\" or \"e5m2\"", dict(fmt="bf16")),
        (ValueError, r"accumulator_bits must be in \[1, 24\]", dict(accumulator_bits=0)),
        (ValueError, r"accumulator_bits must be in \[1, 24\]", dict(accumulator_bits=25)),
        (ValueError, r"promotion_interval must be a positive", dict(promotion_interval=0)),
        (ValueError, r"promotion_interval=None does not fit the scales of a",
         dict(promotion_interval=None, accumulator_bits=14)),
        (ValueError, r"promotion_interval=256 does not fit", dict(promotion_interval=256)),
        (ValueError, r"promotion_interval=96 does not fit", dict(promotion_interval=96)),
    ]
    for exc, pattern, kw in cases:
        args = dict(a=a, sa=sa, b=b, sb=sb)
        args.update({k: kw.pop(k) for k in list(kw) if k in args})
        with pytest.raises(exc, match=pattern):
            fp8.gemm(args["a"], args["sa"], args["b"], args["sb"], **kw)
    # per-tensor scales allow any interval, including None
    at, st = fp8.quantize(decode_table("e4m3")[a].astype(np.float32), block=(4, 300))
    bt, s2 = fp8.quantize(decode_table("e4m3")[b].astype(np.float32), block=(6, 300))
    assert fp8.gemm(at, st, bt, s2, 14, None).shape == (4, 6)
    assert fp8.gemm(at, st, bt, s2, 14, 96).shape == (4, 6)


# ---- FP8 linear -----------------------------------------------------------------------------
def linear_refs(x, w, dy, grad_fmt="e4m3"):
    """float64 y, dx, dW of the dequantized computation, each GEMM's operands quantized along
    its own inner dimension, with the S of each for the error bound."""
    qx, sx = quantize_ref(x, "e4m3", TILE)
    qw, sw = quantize_ref(w, "e4m3", BLOCK)
    y = gemm_ref(qx, sx, TILE, qw, sw, BLOCK)
    qdy, sdy = quantize_ref(dy, grad_fmt, TILE)
    qwt, swt = quantize_ref(np.ascontiguousarray(w.T), "e4m3", BLOCK)
    dx = gemm_ref(qdy, sdy, TILE, qwt, swt, BLOCK, fmt=(grad_fmt, "e4m3"))
    qdyt, sdyt = quantize_ref(np.ascontiguousarray(dy.T), grad_fmt, TILE)
    qxt, sxt = quantize_ref(np.ascontiguousarray(x.T), "e4m3", TILE)
    dw = gemm_ref(qdyt, sdyt, TILE, qxt, sxt, TILE, fmt=(grad_fmt, "e4m3"))
    return y, dx, dw


@pytest.mark.parametrize("R, K, O", [(1, 1, 1), (33, 129, 127), (257, 130, 31), (31, 300, 129)])
@pytest.mark.parametrize("grad_fmt", ["e4m3", "e5m2"])
def test_fp8_linear_forward_backward(R, K, O, grad_fmt, rng):
    x = rng.standard_normal((R, K)).astype(np.float32)
    w = (rng.standard_normal((O, K)) * 0.05).astype(np.float32)
    dy = (rng.standard_normal((R, O)) * np.exp2(rng.uniform(-8, 0, (R, 1)))).astype(np.float32)
    (y_ref, Sy), (dx_ref, Sdx), (dw_ref, Sdw) = linear_refs(x, w, dy, grad_fmt)
    y = fp8.linear(x, w)
    dx, dw = fp8.linear_backward(dy, x, w, grad_fmt=grad_fmt)
    case = f"R={R} K={K} O={O} {grad_fmt}"
    assert_within_fp32_bound(f"y {case}", y, y_ref, Sy, K)
    assert_within_fp32_bound(f"dx {case}", dx, dx_ref, Sdx, O)
    assert_within_fp32_bound(f"dW {case}", dw, dw_ref, Sdw, R)
    # and the whole thing is an approximation of the fp32 layer (loose: fp8 has 3-4 bits)
    for got, want in ((y, x.astype(np.float64) @ w.T), (dw, dy.T.astype(np.float64) @ x)):
        rel = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
        assert rel < (0.1 if grad_fmt == "e4m3" else 0.2), f"{case}: rel {rel:.3f} vs fp32"


def test_fp8_linear_leading_dims_and_limited_mode(rng):
    x = rng.standard_normal((2, 5, 140)).astype(np.float32)
    w = rng.standard_normal((70, 140)).astype(np.float32)
    dy = rng.standard_normal((2, 5, 70)).astype(np.float32)
    y = fp8.linear(x, w)
    assert y.shape == (2, 5, 70)
    assert np.array_equal(y.reshape(10, 70), fp8.linear(x.reshape(10, 140), w))
    dx, dw = fp8.linear_backward(dy, x, w)
    dx2, dw2 = fp8.linear_backward(dy.reshape(10, 70), x.reshape(10, 140), w)
    assert dx.shape == x.shape and np.array_equal(dx.reshape(10, 140), dx2)
    assert np.array_equal(dw, dw2)
    # the accumulator options reach the GEMM: 14-bit sums differ from fp32 ones, within the
    # truncation bound (each add loses < 2^-13 |s_i| <= 2^-13 S, 128 adds per promotion)
    y14 = fp8.linear(x, w, accumulator_bits=14)
    (_, Sy), _, _ = linear_refs(x.reshape(10, 140), w, dy.reshape(10, 70))
    err = np.abs(y14 - y).reshape(10, 70)
    assert np.any(err > 0) and np.all(err <= (128 * 2.0 ** -13 + gamma(142)) * Sy)
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 5, 70\)"):
        fp8.linear_backward(dy[:, :4], x, w)
    with pytest.raises(ValueError, match=r"x must have last dimension in_features"):
        fp8.linear(x[..., :139], w)
    with pytest.raises(TypeError, match=r"weight must be a float32"):
        fp8.linear(x, w.astype(np.float64))
    with pytest.raises(ValueError, match=r"grad_fmt must be"):
        fp8.linear_backward(dy, x, w, grad_fmt="bf16")


def test_fp8_linear_backward_non_finite_x_raises_in_the_weight_gradient():
    # x is quantized for dW only (as x^T, tiles of 128 tokens): a NaN there must raise, naming
    # the tile of x^T that holds it (row = x's column 7, columns = tokens 128..255)
    x = np.ones((300, 140), np.float32)
    x[200, 7] = np.nan
    w = np.ones((70, 140), np.float32)
    dy = np.ones((300, 70), np.float32)
    with pytest.raises(ValueError, match=r"must be finite: scale block \(7, 1\) \(rows 7\.\.7, "
                                         r"columns 128\.\.255\)"):
        fp8.linear_backward(dy, x, w)
