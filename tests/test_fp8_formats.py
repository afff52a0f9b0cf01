"""FP8 / low-precision formats (semantics §2.6): exhaustive codes, round-to-nearest-even at every
midpoint, saturation, specials, and agreement with PyTorch 2.13's casts. All expected values
come from dsv3.reference.fp8 (the format definitions) or from PyTorch, never from dsv3."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import get_torch, noncontig, readonly
from dsv3 import fp8
from dsv3.reference.fp8 import FORMATS, cast_ref, decode_table, encode_ref, fmt_max

BYTE_FORMATS = ("e4m3", "e5m2")


def bits32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def assert_same_floats(name: str, got: np.ndarray, want: np.ndarray) -> None:
    """Bitwise equal except that any NaN matches any NaN (payloads are not part of the spec)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    gn, wn = np.isnan(got), np.isnan(want)
    bad = (gn != wn) | (~gn & (bits32(got) != bits32(want)))
    if bad.any():
        i = np.flatnonzero(bad.ravel())[:5]
        raise AssertionError(f"{name}: {bad.sum()} of {bad.size} differ, e.g. got "
                             f"{got.ravel()[i]} want {want.ravel()[i]}")


def edge_values(fmt: str) -> np.ndarray:
    """Every representable value of the format's neighbourhood of interest, their midpoints,
    one fp32 ulp either side, the overflow boundary and the specials."""
    E, M, B, _ = FORMATS[fmt]
    big = fmt_max(fmt)
    vals = [0.0, -0.0, np.inf, -np.inf, np.nan, big, 2 * big, 1e30, 3.4e38]
    for e in range(1 - B - M - 2, min(2 ** E - B + 2, 128)):
        h = 2.0 ** -(M + 1)  # half a quantum: 1 + h, 1 + 3h and 2 - h are ties
        for m in (1.0, 1.25, 1.5, 1.75, 1 + 2 * h, 2 - 2 * h, 1 + h, 1 + 3 * h, 2 - h):
            vals.append(m * 2.0 ** e)
    with np.errstate(over="ignore"):
        x = np.array(vals, dtype=np.float32)
    x = np.concatenate([x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(0))])
    return np.concatenate([x, -x]).astype(np.float32)


def random_values(rng: np.random.Generator, n: int) -> np.ndarray:
    """Log-uniform magnitudes over the whole fp32 range (normal and subnormal) with random
    signs; a quarter are normal samples at scales 2^-20 .. 2^17."""
    mag = np.exp2(rng.uniform(-149, 128, n))
    x = (mag * rng.choice([-1.0, 1.0], n))
    x[: n // 4] = rng.standard_normal(n // 4) * np.exp2(rng.integers(-20, 18, n // 4))
    with np.errstate(over="ignore"):
        return x.astype(np.float32)


# ---- exhaustive ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", BYTE_FORMATS)
def test_decode_every_code(fmt):
    codes = np.arange(256, dtype=np.uint8)
    want = decode_table(fmt).astype(np.float32)
    got = fp8.decode(codes, fmt)
    assert_same_floats(f"decode {fmt}", got, want)
    assert np.signbit(got[128]) and not np.signbit(got[0]), f"{fmt}: ±0 signs"
    n_nan = int(np.isnan(got).sum())
    assert n_nan == (2 if fmt == "e4m3" else 6), f"{fmt}: {n_nan} NaN codes"
    assert got[0x7E if fmt == "e4m3" else 0x7B] == fmt_max(fmt)
    tiny = 2.0 ** -9 if fmt == "e4m3" else 2.0 ** -16
    assert got[1] == fp8.format_info(fmt)["min_subnormal"] == tiny


@pytest.mark.parametrize("fmt", BYTE_FORMATS)
@pytest.mark.parametrize("saturate", [True, False])
def test_encode_decode_roundtrip_every_code(fmt, saturate):
    codes = np.arange(256, dtype=np.uint8)
    vals = fp8.decode(codes, fmt)
    keep = ~np.isnan(vals)
    if saturate:  # inf saturates to max by design; checked in test_saturation
        keep &= ~np.isinf(vals)
    back = fp8.encode(vals[keep], fmt, saturate)
    bad = np.flatnonzero(back != codes[keep])
    assert bad.size == 0, f"{fmt}: codes {codes[keep][bad]} came back as {back[bad]}"


@pytest.mark.parametrize("fmt", BYTE_FORMATS)
def test_midpoints_round_to_even(fmt):
    table = decode_table(fmt)
    finite = np.sort(table[:128][np.isfinite(table[:128])])  # 0 .. max, ascending
    lo, hi = finite[:-1], finite[1:]
    mid = ((lo + hi) / 2).astype(np.float32)
    assert np.array_equal(mid.astype(np.float64), (lo + hi) / 2), "midpoints exact in fp32"
    code_lo = np.arange(len(lo))  # positive codes are consecutive integers in value order
    even = np.where(code_lo % 2 == 0, code_lo, code_lo + 1)
    for sign, signbit in ((1, 0), (-1, 128)):
        for sat in (True, False):
            got = fp8.encode((sign * mid).astype(np.float32), fmt, sat).astype(np.int64)
            assert np.array_equal(got, even + signbit), f"{fmt} sign {sign}: ties not to even"
        up = np.nextafter(mid, np.float32(np.inf)) * sign
        down = np.nextafter(mid, np.float32(0)) * sign
        assert np.array_equal(fp8.encode(up.astype(np.float32), fmt), code_lo + 1 + signbit)
        assert np.array_equal(fp8.encode(down.astype(np.float32), fmt), code_lo + signbit)


@pytest.mark.parametrize("fmt", BYTE_FORMATS)
def test_saturation_and_overflow(fmt):
    big = np.float32(fmt_max(fmt))
    # the tie above max: e4m3 464 -> 448 (0x7E is even); e5m2 61440 -> 0x7C (even, = inf)
    top_tie = np.float32(464.0 if fmt == "e4m3" else 61440.0)
    over = np.array([np.nextafter(top_tie, np.float32(np.inf)), 2 * big, 1e30, np.inf],
                    dtype=np.float32)
    max_code = 0x7E if fmt == "e4m3" else 0x7B
    for s, sb in ((1, 0), (-1, 0x80)):
        assert np.all(fp8.encode(s * over, fmt, True) == max_code | sb)
        assert np.all(fp8.cast(s * over, fmt, True) == s * big)
        got = fp8.cast(s * over, fmt, False)
        if fmt == "e4m3":
            assert np.all(np.isnan(got)), "e4m3 non-saturating overflow must be NaN"
        else:
            assert np.all(got == s * np.inf), "e5m2 non-saturating overflow must be inf"
            assert np.all(fp8.encode(s * over, fmt, False) == 0x7C | sb)
    tie = fp8.encode(np.array([top_tie, -top_tie]), fmt, False)
    assert list(tie) == ([0x7E, 0xFE] if fmt == "e4m3" else [0x7C, 0xFC])
    assert list(fp8.encode(np.array([top_tie]), fmt, True)) == [max_code]


@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_and_signed_zero(fmt):
    x = np.array([np.nan, -np.nan, 0.0, -0.0], dtype=np.float32)
    for sat in (True, False):
        got = fp8.cast(x, fmt, sat)
        assert np.isnan(got[:2]).all() and (got[2:] == 0).all()
        assert not np.signbit(got[2]) and np.signbit(got[3]), f"{fmt}: -0 lost"
    if fmt in BYTE_FORMATS:
        assert np.isnan(fp8.decode(fp8.encode(x[:2], fmt), fmt)).all()
        assert list(fp8.encode(x[2:], fmt)) == [0x00, 0x80]


# ---- against the reference and PyTorch ----------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("saturate", [True, False])
def test_cast_matches_definition(fmt, saturate, rng):
    x = np.concatenate([edge_values(fmt), random_values(rng, 200_000)])
    assert_same_floats(f"cast {fmt} sat={saturate}", fp8.cast(x, fmt, saturate),
                       cast_ref(x, fmt, saturate))
    if fmt in BYTE_FORMATS:
        got = fp8.encode(x, fmt, saturate)
        want = encode_ref(x, fmt, saturate)
        ok = ~np.isnan(x)  # NaN codes: any NaN code with the input's sign is allowed
        assert np.array_equal(got[ok], want[ok]), f"encode {fmt} sat={saturate}"
        assert np.isnan(fp8.decode(got[~ok], fmt)).all()


@pytest.mark.parametrize("fmt, torch_name, saturate", [
    # torch 2.13's CPU e4m3fn cast saturates (pytorch/pytorch#178817): = our saturate=True
    ("e4m3", "float8_e4m3fn", True),
    ("e5m2", "float8_e5m2", False),
    ("bf16", "bfloat16", False),
])
def test_matches_pytorch(fmt, torch_name, saturate, rng):
    torch = get_torch()
    x = np.concatenate([edge_values(fmt), random_values(rng, 1_000_000)])
    t = torch.from_numpy(x).to(getattr(torch, torch_name))
    want = t.float().numpy()
    assert_same_floats(f"cast {fmt} vs torch.{torch_name}", fp8.cast(x, fmt, saturate), want)
    if fmt in BYTE_FORMATS:
        ok = ~np.isnan(x)
        got = fp8.encode(x, fmt, saturate)
        assert np.array_equal(got[ok], t.view(torch.uint8).numpy()[ok]), f"codes vs torch {fmt}"
        codes = np.arange(256, dtype=np.uint8)
        tvals = torch.from_numpy(codes).view(getattr(torch, torch_name)).float().numpy()
        assert_same_floats(f"decode vs torch {fmt}", fp8.decode(codes, fmt), tvals)


# ---- array contract -----------------------------------------------------------------------
def test_shapes_noncontiguous_readonly(rng):
    x = (rng.standard_normal((3, 4, 50)) * 100).astype(np.float32)
    want = fp8.encode(x, "e4m3")
    assert want.shape == x.shape and want.dtype == np.uint8
    assert np.array_equal(fp8.encode(noncontig(x), "e4m3"), want)
    assert np.array_equal(fp8.encode(readonly(x), "e4m3"), want)
    assert np.array_equal(fp8.decode(noncontig(want), "e4m3"), fp8.decode(want, "e4m3"))
    assert_same_floats("cast noncontig", fp8.cast(noncontig(x), "bf16"), fp8.cast(x, "bf16"))
    assert fp8.cast(np.array(3.3, np.float32), "e4m3").shape == ()
    assert fp8.encode(np.zeros((0, 5), np.float32)).shape == (0, 5)


def test_bad_inputs():
    x = np.ones(4, np.float32)
    with pytest.raises(TypeError, match=r"\bx\b.*float32"):
        fp8.cast(np.ones(4), "e4m3")
    with pytest.raises(TypeError, match=r"\bx\b.*float32"):
        fp8.encode([1.0, 2.0], "e4m3")
    with pytest.raises(TypeError, match=r"codes.*uint8"):
        fp8.decode(np.ones(4, np.int32), "e4m3")
    with pytest.raises(TypeError, match=r"codes.*uint8"):
        fp8.decode(x, "e4m3")
    for fn in (lambda: fp8.cast(x, "e3m4"), lambda: fp8.encode(x, "fp8"),
               lambda: fp8.decode(np.zeros(2, np.uint8), "E4M3x")):
        with pytest.raises(ValueError, match=r"fmt must be one of"):
            fn()
    for fmt in ("bf16", "e5m6"):
        with pytest.raises(ValueError, match=r"cast-only"):
            fp8.encode(x, fmt)
        with pytest.raises(ValueError, match=r"cast-only"):
            fp8.decode(np.zeros(2, np.uint8), fmt)
