"""Resident-weight linears (kernels/wlinear.h) through dsv3._core.wlinear / wlinear_rows, against
float64 references written from the formats: E4M3 (bias 7, 3 mantissa bits, subnormals
m/8 * 2^-6, NaN at 0x7f / 0xff, no infinities), bf16 (the top 16 bits of an fp32), fp8 weights
w = e4m3(code) * scale_inv[o // 128, k // 128]. The bound is the fp32 reassociation bound
|y - y_exact| <= gamma(K + 2) * sum_k |x w| + (K + 2) * (1 + max|x|) * 2^-149
(gamma(n) = n u / (1 - n u), u = 2^-24; the second term covers products in the subnormal
range under tiny scales). Decode (R <= 16, bf16 R <= 64: GEMV in register blocks of <= 4
rows) and prefill (larger R: dequantized panels multiplied in register tiles on the vector
tiers, with sgemm on the scalar one) are both covered; each tier is forced with DSV3_ISA in a
subprocess and compared."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import dsv3
from dsv3 import _core

SIZES = (1, 16, 31, 33, 127, 128, 129, 300)
ROWS = (1, 2, 3, 4, 5, 7, 16, 17, 64, 65)
U = 2.0 ** -24


def gamma(n):
    return n * U / (1 - n * U)


def e4m3_table() -> np.ndarray:
    """Value of every E4M3 code, from the format's definition (float64)."""
    t = np.empty(256)
    for c in range(256):
        s, e, m = c >> 7, (c >> 3) & 15, c & 7
        if e == 15 and m == 7:
            v = np.nan
        elif e == 0:
            v = m / 8 * 2.0 ** -6
        else:
            v = (1 + m / 8) * 2.0 ** (e - 7)
        t[c] = -v if s else v
    return t


E4M3 = e4m3_table()


def bf16_value(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns -> float64 from sign / 8-bit exponent / 7-bit mantissa."""
    b = bits.astype(np.int64)
    s, e, m = b >> 15, (b >> 7) & 0xFF, b & 0x7F
    v = np.where(e == 0, m / 128 * 2.0 ** -126, (1 + m / 128) * np.exp2(e.astype(np.float64) - 127))
    v = np.where(e == 255, np.where(m == 0, np.inf, np.nan), v)
    return np.where(s == 1, -v, v)


def make_weight(rng, fmt, O, K, scale_exp=(-8, 8)):
    """(data, scale_inv, dense float64 weight)"""
    if fmt == "fp32":
        w = rng.standard_normal((O, K)).astype(np.float32)
        return w, None, w.astype(np.float64)
    if fmt == "bf16":
        f = rng.standard_normal((O, K)).astype(np.float32)
        bits = (f.view(np.uint32) >> 16).astype(np.uint16)
        return bits, None, bf16_value(bits)
    codes = rng.integers(0, 256, size=(O, K)).astype(np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN codes here (tested separately)
    sinv = np.exp2(rng.uniform(*scale_exp, size=(-(-O // 128), -(-K // 128)))).astype(np.float32)
    dense = E4M3[codes] * np.repeat(np.repeat(sinv.astype(np.float64), 128, 0), 128, 1)[:O, :K]
    return codes, sinv, dense


def check(y, x, dense, what):
    x64 = x.astype(np.float64).reshape(-1, x.shape[-1])
    ref = x64 @ dense.T
    K = x.shape[-1]
    S = np.abs(x64) @ np.abs(dense).T
    bound = gamma(K + 2) * S + (K + 2) * (1 + np.abs(x64).max(initial=0)) * 2.0 ** -149
    y = y.reshape(ref.shape).astype(np.float64)
    err = np.abs(y - ref)
    assert y.shape == ref.shape
    assert np.all(err <= bound), f"{what}: max err/bound {np.max(err / bound):.3g}"
    return err


# ---- against float64 ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8"])
def test_sizes_against_float64(fmt):
    rng = np.random.default_rng(1)
    for R in ROWS:
        for O in SIZES:
            for K in SIZES:
                if R >= 64 and (O, K) not in ((1, 1), (129, 300), (33, 127), (300, 129)):
                    continue
                data, sinv, dense = make_weight(rng, fmt, O, K)
                x = rng.standard_normal((R, K)).astype(np.float32)
                y = _core.wlinear(x, fmt, data, sinv)
                assert y.dtype == np.float32 and y.shape == (R, O)
                check(y, x, dense, f"{fmt} R={R} O={O} K={K}")


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8"])
@pytest.mark.parametrize("R", [1, 4, 5, 20])
def test_long_k_and_leading_dims(fmt, R):
    rng = np.random.default_rng(2)
    data, sinv, dense = make_weight(rng, fmt, 261, 1411)
    x = rng.standard_normal((R, 1, 1411)).astype(np.float32)
    y = _core.wlinear(x, fmt, data, sinv)
    assert y.shape == (R, 1, 261)
    check(y, x, dense, f"{fmt} R={R}")


@pytest.mark.parametrize("R", [1, 3, 17])
@pytest.mark.parametrize("exp", [(-60, -40), (30, 40), (119, 126)])
def test_fp8_huge_and_tiny_scales(R, exp):
    rng = np.random.default_rng(3)
    data, sinv, dense = make_weight(rng, "fp8", 140, 300, scale_exp=exp)
    x = rng.standard_normal((R, 300)).astype(np.float32)
    if exp[0] > 100:  # scales near the top of fp32 (sinv * 2^8 overflows): tiny activations
        if R > 16:
            pytest.skip("prefill dequantizes: e4m3 * sinv must be finite in fp32 (not here)")
        x *= np.float32(2.0 ** -110)
    y = _core.wlinear(x, "fp8", data, sinv)
    assert np.all(np.isfinite(y))
    check(y, x, dense, f"scales 2^{exp} R={R}")


@pytest.mark.parametrize("R", [1, 4, 9, 17])
@pytest.mark.parametrize("xexp", [-100, -30, 5, 7, 20, 100, 125])
def test_fp8_activation_ranges(R, xexp):
    """The fp8 GEMV scales x by 2^a chosen from max|x| (a = 120 down to 0): every range of x."""
    if xexp > 112 and _core.wlinear_tier() == "scalar":
        pytest.skip("sum x * e4m3(code) over a block exceeds fp32 before sinv (the scalar tier "
                    "sums unscaled codes; the vector tiers scale them by 2^-120)")
    rng = np.random.default_rng(12)
    data, sinv, dense = make_weight(rng, "fp8", 70, 300, scale_exp=(-30, -20) if xexp > 100
                                    else (-8, 8))
    x = (rng.standard_normal((R, 300)) * 2.0 ** xexp).astype(np.float32)
    x[0, :50] *= np.float32(2.0 ** -40)  # small entries beside the large ones
    y = _core.wlinear(x, "fp8", data, sinv)
    assert np.all(np.isfinite(y))
    check(y, x, dense, f"x ~ 2^{xexp} R={R}")


@pytest.mark.parametrize("R", [1, 3, 17])
def test_fp8_infinite_x(R):
    rng = np.random.default_rng(13)
    data, sinv, dense = make_weight(rng, "fp8", 50, 200)
    x = rng.standard_normal((R, 200)).astype(np.float32)
    x[0, 7] = np.inf
    y = _core.wlinear(x, "fp8", data, sinv)
    with np.errstate(invalid="ignore"):
        ref = x.astype(np.float64) @ dense.T
    assert np.array_equal(np.isnan(y[0]), np.isnan(ref[0]))
    assert np.array_equal(y[0][~np.isnan(ref[0])], ref[0][~np.isnan(ref[0])])  # +-inf
    check(y[1:], x[1:], dense, "finite rows beside an infinite one")


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8"])
@pytest.mark.parametrize("R", [1, 2, 6, 20])
def test_zeros(fmt, R):
    O, K = 33, 129
    x = np.random.default_rng(4).standard_normal((R, K)).astype(np.float32)
    dtype = {"fp32": np.float32, "bf16": np.uint16, "fp8": np.uint8}[fmt]
    data = np.zeros((O, K), dtype)
    if fmt != "fp32":
        data[::2] = 0x8000 if fmt == "bf16" else 0x80  # negative zeros
    sinv = np.ones((1, 2), np.float32) if fmt == "fp8" else None
    assert np.all(_core.wlinear(x, fmt, data, sinv) == 0)
    assert np.all(_core.wlinear(np.zeros_like(x), fmt, data, sinv) == 0)


@pytest.mark.parametrize("R", [1, 2, 3, 4, 6, 17])
@pytest.mark.parametrize("code", [0x7F, 0xFF])
def test_fp8_nan_codes_propagate(R, code):
    rng = np.random.default_rng(5)
    O, K = 40, 300
    data, sinv, dense = make_weight(rng, "fp8", O, K)
    data[7, 299] = code   # ragged end of the last K block
    data[20, 5] = code    # first block
    data[39, 130] = code  # last row, middle block
    x = rng.standard_normal((R, K)).astype(np.float32)
    y = _core.wlinear(x, "fp8", data, sinv)
    bad = np.zeros(O, bool)
    bad[[7, 20, 39]] = True
    assert np.all(np.isnan(y[:, bad]))
    assert np.all(np.isfinite(y[:, ~bad]))
    dense[bad] = 0
    check(y[:, ~bad], x, dense[~bad], "rows without NaN")


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8"])
def test_nonfinite_x_propagates(fmt):
    rng = np.random.default_rng(6)
    data, sinv, _ = make_weight(rng, fmt, 20, 40)
    for R in (1, 5, 20):
        x = rng.standard_normal((R, 40)).astype(np.float32)
        x[0, 3] = np.nan
        y = _core.wlinear(x, fmt, data, sinv)
        assert np.all(np.isnan(y[0])) and np.all(np.isfinite(y[1:]))


# ---- rows ---------------------------------------------------------------------------------------

def test_rows_every_e4m3_code_exact():
    codes = np.arange(256, dtype=np.uint8).reshape(1, 256).repeat(3, 0)
    sinv = np.array([[1.0, 1.0]], np.float32)
    out = _core.wlinear_rows(np.array([0, 2]), "fp8", codes, sinv)
    ref = E4M3[np.arange(256)]
    for r in range(2):
        assert np.array_equal(np.isnan(out[r]), np.isnan(ref))
        assert np.array_equal(out[r][~np.isnan(ref)], ref[~np.isnan(ref)].astype(np.float32))


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8"])
@pytest.mark.parametrize("K", [1, 31, 129, 300])
def test_rows_match_dequantized_weight(fmt, K):
    rng = np.random.default_rng(7)
    data, sinv, dense = make_weight(rng, fmt, 300, K)
    ids = np.array([[0, 299], [128, 5]])
    out = _core.wlinear_rows(ids, fmt, data, sinv)
    assert out.shape == (2, 2, K) and out.dtype == np.float32
    # the product code * scale rounded to fp32 once (exact for fp32 and bf16)
    assert np.array_equal(out, dense[ids].astype(np.float32))


# ---- rows as the right factor (MLA's absorbed query) ------------------------------------------

@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8"])
def test_rows_product_against_float64(fmt):
    # y = x @ W[r0 : r0 + n]: n not a multiple of the 8 rows dequantized at a time, K with
    # ragged columns past the 64-wide register blocks, r0 inside a scale block
    rng = np.random.default_rng(12)
    for O, K, r0, n in ((300, 512, 128, 128), (300, 129, 5, 17), (40, 70, 0, 40), (9, 1, 3, 1)):
        data, sinv, dense = make_weight(rng, fmt, O, K)
        for R in (1, 3, 16):
            x = rng.standard_normal((R, n)).astype(np.float32)
            y = _core.wlinear_rows_product(x, r0, fmt, data, sinv)
            assert y.dtype == np.float32 and y.shape == (R, K)
            x64, w64 = x.astype(np.float64), dense[r0:r0 + n]
            ref = x64 @ w64
            bound = gamma(n + 2) * (np.abs(x64) @ np.abs(w64)) + (n + 2) * 2.0 ** -149
            err = np.abs(y - ref)
            assert np.all(err <= bound), (fmt, O, K, r0, n, R, np.max(err / bound))


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_rows_product_equals_its_float32_copy_bitwise(fmt):
    # the decode of a mapped kv_b_proj equals that of the fp32 model (tests/test_resident.py):
    # the product on the stored rows and on their dequantized fp32 copy have the same bits,
    # NaN codes included; and a row's bits do not depend on the call's other rows
    rng = np.random.default_rng(13)
    data, sinv, _ = make_weight(rng, fmt, 260, 200)
    if fmt == "fp8":
        data[7, 3] = 0x7F  # a NaN weight: its column is NaN in every row
    copy = _core.wlinear_rows(np.arange(260), fmt, data, sinv)
    x = rng.standard_normal((5, 100)).astype(np.float32)
    got = _core.wlinear_rows_product(x, 3, fmt, data, sinv)
    want = _core.wlinear_rows_product(x, 3, "fp32", copy)
    assert got.tobytes() == want.tobytes()
    one = np.concatenate([_core.wlinear_rows_product(x[r:r + 1], 3, fmt, data, sinv)
                          for r in range(5)])
    assert one.tobytes() == got.tobytes()
    if fmt == "fp8":
        assert np.all(np.isnan(got[:, 3])) and np.all(np.isfinite(np.delete(got, 3, axis=1)))


def test_rows_product_strided_rows():
    # MLA's use: x rows are a head's slice of a wider row (ldx > n), y rows a head's slice of a
    # wider row (ldy > K); the columns past K stay untouched
    rng = np.random.default_rng(15)
    data, sinv, dense = make_weight(rng, "bf16", 64, 40)
    x = rng.standard_normal((3, 30)).astype(np.float32)
    y = _core.wlinear_rows_product(x, 4, "bf16", data, n=20, ldy=57)
    assert y.shape == (3, 57) and not y[:, 40:].any()
    want = _core.wlinear_rows_product(np.ascontiguousarray(x[:, :20]), 4, "bf16", data)
    assert y[:, :40].tobytes() == want.tobytes()
    ref = x[:, :20].astype(np.float64) @ dense[4:24]
    assert np.allclose(y[:, :40], ref, rtol=1e-5, atol=1e-5)


def test_rows_product_bad_rows():
    w = np.zeros((10, 4), np.float32)
    with pytest.raises(IndexError, match="r0"):
        _core.wlinear_rows_product(np.zeros((1, 3), np.float32), 8, "fp32", w)
    with pytest.raises(IndexError, match="r0"):
        _core.wlinear_rows_product(np.zeros((1, 3), np.float32), -1, "fp32", w)
    with pytest.raises(IndexError, match="r0"):  # r0 + n would overflow int64
        _core.wlinear_rows_product(np.zeros((1, 3), np.float32), 2 ** 63 - 2, "fp32", w)
    with pytest.raises(ValueError, match="2-D"):
        _core.wlinear_rows_product(np.zeros(3, np.float32), 0, "fp32", w)
    with pytest.raises(ValueError, match="ldy"):
        _core.wlinear_rows_product(np.zeros((1, 3), np.float32), 0, "fp32", w, ldy=3)
    with pytest.raises(ValueError, match="n must"):
        _core.wlinear_rows_product(np.zeros((1, 3), np.float32), 0, "fp32", w, n=4)
    y = _core.wlinear_rows_product(np.zeros((2, 0), np.float32), 10, "fp32", w)
    assert y.shape == (2, 4) and not y.any()  # an empty sum


# ---- determinism --------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8"])
def test_bit_identical_across_threads_and_runs(fmt):
    rng = np.random.default_rng(8)
    data, sinv, _ = make_weight(rng, fmt, 1000, 333)
    xs = [rng.standard_normal((R, 333)).astype(np.float32) for R in (1, 2, 3, 4, 9, 16, 17, 300)]
    n0 = dsv3.get_num_threads()
    try:
        dsv3.set_num_threads(1)
        one = [_core.wlinear(x, fmt, data, sinv) for x in xs]
        dsv3.set_num_threads(2)
        two = [_core.wlinear(x, fmt, data, sinv) for x in xs]
        again = [_core.wlinear(x, fmt, data, sinv) for x in xs]
    finally:
        dsv3.set_num_threads(n0)
    for a, b, c in zip(one, two, again):
        assert a.tobytes() == b.tobytes() == c.tobytes()


@pytest.mark.skipif(dsv3.build_info()["wlinear_tier"] == "scalar",
                    reason="register-tile prefill: vector tiers only (scalar runs sgemm)")
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8"])
def test_prefill_row_bits_do_not_depend_on_the_other_rows(fmt):
    # the vector tiers' prefill sums each y element in one FMA chain over k, whatever R, the row's
    # register tile, the K chunks and the panel split (wlinear_tier_prefill.inc): a row's bits are
    # those of the same row in any other prefill-sized batch and at any thread count
    rng = np.random.default_rng(9)
    data, sinv, dense = make_weight(rng, fmt, 577, 700)
    x = rng.standard_normal((301, 700)).astype(np.float32)
    n0 = dsv3.get_num_threads()
    try:
        dsv3.set_num_threads(2)
        full = _core.wlinear(x, fmt, data, sinv)
        dsv3.set_num_threads(1)
        part = _core.wlinear(x[230:295], fmt, data, sinv)  # 65 rows: a prefill, other tiles
    finally:
        dsv3.set_num_threads(n0)
    check(full, x, dense, f"{fmt} R=301")
    assert full[230:295].tobytes() == part.tobytes()
    for O, K in ((1, 1), (17, 15), (63, 256), (65, 257), (256, 512), (257, 513)):
        data, sinv, dense = make_weight(rng, fmt, O, K)
        x = rng.standard_normal((257, K)).astype(np.float32)
        ys = []
        for threads in (1, 2, 3):
            dsv3.set_num_threads(threads)
            try:
                ys += [_core.wlinear(x, fmt, data, sinv), _core.wlinear(x[40:105], fmt, data, sinv)]
            finally:
                dsv3.set_num_threads(n0)
        check(ys[0], x, dense, f"{fmt} R=257 O={O} K={K}")
        for y in ys[2::2]:
            assert y.tobytes() == ys[0].tobytes(), (O, K)
        for y in ys[1::2]:
            assert y.tobytes() == ys[0][40:105].tobytes(), (O, K)


@pytest.mark.skipif(dsv3.build_info()["wlinear_tier"] == "scalar",
                    reason="register-tile prefill: vector tiers only (scalar runs sgemm)")
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_prefill_equals_prefill_of_the_float32_copy_bitwise(fmt):
    # the pack holds dequant's bits and the tiles are format-blind, so a bf16 / fp8 weight and
    # its fp32 copy (wlinear_rows) give the same bits; NaN weights sit at a micro-panel edge
    # (rows 63, 64) and in the last K chunk
    rng = np.random.default_rng(10)
    data, sinv, _ = make_weight(rng, fmt, 200, 300)
    if fmt == "fp8":
        data[63, 5] = 0x7F
        data[64, 290] = 0xFF
    else:
        data[63, 5] = 0x7FC0   # NaN
        data[64, 290] = 0xFF80  # -inf
    copy = _core.wlinear_rows(np.arange(200), fmt, data, sinv)
    x = rng.standard_normal((70, 300)).astype(np.float32)
    got, ref = _core.wlinear(x, fmt, data, sinv), _core.wlinear(x, "fp32", copy, None)
    assert got.tobytes() == ref.tobytes()
    assert np.isnan(got[:, 63]).all() and not np.isfinite(got[:, 64]).any()
    assert np.isfinite(np.delete(got, [63, 64], axis=1)).all()


# ---- bad input ----------------------------------------------------------------------------------

def test_bad_input_names_the_argument():
    x = np.zeros((2, 16), np.float32)
    w = np.zeros((4, 16), np.float32)
    codes = np.zeros((4, 16), np.uint8)
    s = np.ones((1, 1), np.float32)
    with pytest.raises(ValueError, match="fmt"):
        _core.wlinear(x, "int4", w)
    with pytest.raises(TypeError, match="data must be a uint8"):
        _core.wlinear(x, "fp8", w, s)
    with pytest.raises(TypeError, match="data must be a float32"):
        _core.wlinear(x, "fp32", codes)
    with pytest.raises(ValueError, match="scale_inv is required"):
        _core.wlinear(x, "fp8", codes)
    shape_msg = r"scale_inv must have shape \(ceil\(O/128\), ceil\(K/128\)\) = \(1, 1\)"
    with pytest.raises(ValueError, match=shape_msg):
        _core.wlinear(x, "fp8", codes, np.ones((1, 2), np.float32))
    with pytest.raises(TypeError, match="scale_inv"):
        _core.wlinear(x, "fp8", codes, np.ones((1, 1), np.float64))
    with pytest.raises(ValueError, match="scale_inv must be None"):
        _core.wlinear(x, "bf16", codes.astype(np.uint16), s)
    with pytest.raises(ValueError, match="last dimension K = 16"):
        _core.wlinear(np.zeros((2, 15), np.float32), "fp32", w)
    with pytest.raises(TypeError, match="x must be a float32"):
        _core.wlinear(x.astype(np.float64), "fp32", w)
    with pytest.raises(ValueError, match="data must be 2-D"):
        _core.wlinear(x, "fp32", w.reshape(-1))
    with pytest.raises(ValueError, match="data must be 2-D"):
        _core.wlinear(np.zeros((2, 0), np.float32), "fp32", np.zeros((4, 0), np.float32))
    with pytest.raises(IndexError, match=r"ids must be in \[0, O = 4\)"):
        _core.wlinear_rows(np.array([4]), "fp32", w)
    with pytest.raises(IndexError, match="ids"):
        _core.wlinear_rows(np.array([-1]), "fp8", codes, s)
    with pytest.raises(TypeError, match="ids"):
        _core.wlinear_rows(np.array([0.0]), "fp32", w)


def test_public_wrappers():
    rng = np.random.default_rng(10)
    data, sinv, dense = make_weight(rng, "fp8", 130, 200)
    x = rng.standard_normal((3, 200)).astype(np.float32)
    assert dsv3.ops.wlinear(x, "fp8", data, sinv).tobytes() == \
        _core.wlinear(x, "fp8", data, sinv).tobytes()
    rows = dsv3.ops.wlinear_rows(np.array([1, 129]), "fp8", data, sinv)
    assert np.array_equal(rows, dense[[1, 129]].astype(np.float32))


def test_noncontiguous_and_empty_inputs():
    rng = np.random.default_rng(9)
    w = rng.standard_normal((20, 64)).astype(np.float32)
    x = rng.standard_normal((64, 6)).astype(np.float32).T  # not C-contiguous
    check(_core.wlinear(x, "fp32", w[:, :].copy()), x, w.astype(np.float64), "transposed x")
    wt = rng.standard_normal((64, 20)).astype(np.float32).T
    check(_core.wlinear(np.ascontiguousarray(x), "fp32", wt), x, wt.astype(np.float64), "wT")
    assert _core.wlinear(np.zeros((0, 64), np.float32), "fp32", w).shape == (0, 20)


# ---- tiers --------------------------------------------------------------------------------------

def test_build_info_names_the_tier():
    info = dsv3.build_info()
    assert info["wlinear_tier"] == _core.wlinear_tier() in ("avx512-gfni", "avx512", "avx2",
                                                            "scalar")
    forced = os.environ.get("DSV3_ISA", "")
    if forced in ("scalar", "fp32", "baseline"):
        assert info["wlinear_tier"] == "scalar"


TIER_CASES = [(R, O, K) for R in (1, 2, 3, 4, 7, 16, 17) for (O, K) in
              ((1, 1), (31, 33), (129, 300), (300, 127), (16, 128), (25, 64), (9, 65),
               (7, 192))] + [(65, 129, 300), (65, 300, 257), (70, 65, 513)]  # bf16 prefill too


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8"])
def test_a_decoded_row_does_not_depend_on_the_calls_other_rows(fmt):
    # Speculative verification (R rows at once) must give plain decoding's bits (R = 1) for
    # each row: the GEMV's summation order of a row is independent of R and of its register
    # block. (Every row holds the same max |x|, so the fp8 prescale is the same too.)
    rng = np.random.default_rng(5)
    for O, K in ((37, 300), (24, 64), (130, 129)):
        data, sinv, _ = make_weight(rng, fmt, O, K)
        n = 64 if fmt == "bf16" else 16  # bf16 weights take the GEMV up to 64 rows
        x = rng.standard_normal((n, K)).astype(np.float32)
        x[:, 0] = 8.0
        one = np.concatenate([_core.wlinear(x[r:r + 1], fmt, data, sinv) for r in range(n)])
        for R in (2, 3, 4, 5, 16, 17, 63, 64):
            if R > n:
                continue
            got = _core.wlinear(x[:R], fmt, data, sinv)
            assert got.tobytes() == one[:R].tobytes(), (fmt, O, K, R)

TIER_SCRIPT = """
import json, sys, numpy as np
sys.path.insert(0, sys.argv[2])
import test_wlinear as t
from dsv3 import _core
rng = np.random.default_rng(11)
out = {}
for fmt in ("fp32", "bf16", "fp8"):
    for i, (R, O, K) in enumerate(t.TIER_CASES):
        data, sinv, dense = t.make_weight(rng, fmt, O, K)
        x = rng.standard_normal((R, K)).astype(np.float32)
        y = _core.wlinear(x, fmt, data, sinv)
        t.check(y, x, dense, f"{fmt} {R} {O} {K} tier {_core.wlinear_tier()}")
        out[f"{fmt}{i}"] = y
    data, sinv, _ = t.make_weight(rng, fmt, 300, 300)
    out[f"{fmt}rows"] = _core.wlinear_rows(np.arange(300), fmt, data, sinv)
np.savez(sys.argv[1], **out)
print(json.dumps(_core.wlinear_tier()))
"""


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def run_tier(tmp_path, isa):
    out = tmp_path / f"{isa}.npz"
    env = dict(os.environ, DSV3_ISA=isa)
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", TIER_SCRIPT, str(out), here], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(out) as z:  # closes the archive
        return json.loads(r.stdout.strip().splitlines()[-1]), dict(z)


TIERS = ("avx512-gfni", "avx512", "avx2", "scalar")


def test_tiers_agree_within_the_bound(tmp_path):
    flags = cpu_flags()
    runs = {}
    for isa in TIERS:
        tier, res = run_tier(tmp_path, isa)
        has512 = " avx512bw" in flags and " avx512vl" in flags
        if isa == "avx512-gfni" and has512 and " gfni" in flags:
            assert tier == "avx512-gfni"
        if isa == "avx512" and has512:
            assert tier == "avx512"
        if isa == "avx2" and " avx2" in flags and " fma" in flags:
            assert tier == "avx2"
        if isa == "scalar":
            assert tier == "scalar"
        runs[isa] = res
    rng = np.random.default_rng(11)
    for fmt in ("fp32", "bf16", "fp8"):
        for i, (R, O, K) in enumerate(TIER_CASES):
            _, _, dense = make_weight(rng, fmt, O, K)
            x = rng.standard_normal((R, K)).astype(np.float32)
            S = np.abs(x.astype(np.float64)) @ np.abs(dense).T
            a, *others = (runs[t][f"{fmt}{i}"].astype(np.float64) for t in TIERS)
            bound = 2 * gamma(K + 2) * S + 1e-40
            assert all(np.all(np.abs(a - b) <= bound) for b in others), (fmt, R, O, K)
        make_weight(rng, fmt, 300, 300)
        rows = [runs[t][f"{fmt}rows"].tobytes() for t in TIERS]
        assert all(r == rows[0] for r in rows)  # exact everywhere


@pytest.mark.skipif(os.environ.get("DSV3_ISA") is not None, reason="already forced")
@pytest.mark.parametrize("isa", ["avx512-gfni", "avx2", "scalar"])
def test_forced_tier_runs_this_file(isa):
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, DSV3_ISA=isa)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        os.path.join(here, "test_wlinear.py"), "-k", "not tiers_agree"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=here)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
