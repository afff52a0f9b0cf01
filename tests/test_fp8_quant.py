"""Fine-grained quantization (semantics §2.6): codes and scales bit-equal to the reference of
dsv3.reference.fp8, round-trip error bounds, zero-padded edges, power-of-two scales, the amax
floor, non-finite input, and the argument contract."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import noncontig, readonly
from dsv3 import fp8
from dsv3.reference.fp8 import FORMATS, decode_table, dequantize_ref, encode_ref, fmt_max, quantize_ref

CASES = [  # (shape, block)
    ((1, 1), (1, 128)), ((31, 33), (1, 128)), ((127, 129), (1, 128)), ((3, 300), (1, 128)),
    ((1, 1), (128, 128)), ((127, 129), (128, 128)), ((129, 257), (128, 128)),
    ((33, 31), (3, 5)), ((31, 33), (1, 1)), ((129, 33), (64, 32)), ((31, 129), (31, 129)),
    ((520, 513), (520, 513)),  # a block above 2^18 elements takes the two-pass path
    ((600, 700), (300, 1000)),
]


def data(rng, shape, spread=True):
    """Normal values with per-row magnitudes spread over 2^-12 .. 2^12, so blocks see very
    different amax and the small ones exercise the subnormals."""
    x = rng.standard_normal(shape)
    if spread:
        x *= np.exp2(rng.uniform(-12, 12, (shape[0], 1)))
    return x.astype(np.float32)


@pytest.mark.parametrize("shape, block", CASES)
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_matches_reference(shape, block, fmt, pow2, rng):
    x = data(rng, shape)
    codes, scales = fp8.quantize(x, fmt, block, pow2)
    want_codes, want_scales = quantize_ref(x, fmt, block, pow2)
    case = f"{shape} block={block} {fmt} pow2={pow2}"
    assert codes.dtype == np.uint8 and codes.shape == x.shape, case
    assert scales.dtype == np.float32 and scales.shape == want_scales.shape, case
    assert np.array_equal(scales.view(np.uint32), want_scales.view(np.uint32)), f"scales {case}"
    bad = np.flatnonzero(codes != want_codes)
    assert bad.size == 0, f"codes {case}: {bad.size} differ, first at {bad[:5]}"
    deq = fp8.dequantize(codes, scales, block, fmt)
    want = dequantize_ref(codes, scales, fmt, block).astype(np.float32)  # one fp32 rounding
    assert np.array_equal(deq.view(np.uint32), want.view(np.uint32)), f"dequantize {case}"


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("block", [(1, 128), (128, 128)])
def test_roundtrip_error_bound(fmt, block, rng):
    """|dequantize(quantize(x)) - x| <= half a quantum: 2^-(M+1) |x| for scaled values in the
    normal range, scale * 2^(emin-M-1) in the subnormal one, plus two fp32 roundings (x / s
    and q * s, 2^-24 relative each). The block's amax survives to fp32 rounding."""
    _, M, B, _ = FORMATS[fmt]
    x = data(rng, (257, 300))
    codes, scales = fp8.quantize(x, fmt, block)
    deq = fp8.dequantize(codes, scales, block, fmt).astype(np.float64)
    s = np.repeat(np.repeat(scales.astype(np.float64), block[0], 0), block[1], 1)[:257, :300]
    x64 = x.astype(np.float64)
    bound = (2.0 ** -(M + 1) + 2.0 ** -23) * np.abs(x64) + s * 2.0 ** (1 - B - M - 1)
    err = np.abs(deq - x64)
    assert np.all(err <= bound), f"max err/bound {np.max(err / bound):.3f}"
    # the bound is not loose: some element uses at least half of it
    assert np.max(err / bound) > 0.5
    # every block's largest element maps to +-max and back to itself (to fp32 rounding)
    br, bc = block
    for i in range(0, 257, br):
        for j in range(0, 300, bc):
            blk = np.abs(x64[i:i + br, j:j + bc])
            k = np.unravel_index(np.argmax(blk), blk.shape)
            got = abs(deq[i + k[0], j + k[1]])
            assert abs(got - blk[k]) <= 2.0 ** -22 * blk[k], f"amax of block ({i}, {j})"


def test_scaling_is_a_division(rng):
    """q = e4m3(x / scale) with an fp32 division (semantics §2.6), not x * (1/scale): values placed one
    fp32 ulp around the e4m3 midpoints times the scale tell the two apart."""
    t = decode_table("e4m3")[:127]
    t = np.sort(t[np.isfinite(t)])
    mids = (t[:-1] + t[1:]) / 2
    rows = []
    for amax in rng.uniform(1, 2, 8).astype(np.float32):
        s = amax / np.float32(448)
        x = (mids * np.float64(s)).astype(np.float32)
        x = np.concatenate([x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(0))])
        x = x[np.abs(x) < amax][:127]
        rows.append(np.concatenate([[amax], x]))
    x = np.stack(rows).astype(np.float32)
    codes, scales = fp8.quantize(x, block=(1, 128))
    div = encode_ref(x / scales[:, :1], "e4m3")
    mul = encode_ref(x * (np.float32(1) / scales[:, :1]), "e4m3")
    assert np.any(div != mul), "the data should separate division from reciprocal multiply"
    assert np.array_equal(codes, div)


def test_padded_edges_behave_as_zeros(rng):
    x = data(rng, (130, 200), spread=False)
    pad = np.zeros((256, 256), np.float32)
    pad[:130, :200] = x
    for fmt in ("e4m3", "e5m2"):
        c, s = fp8.quantize(x, fmt, (128, 128))
        cp, sp = fp8.quantize(pad, fmt, (128, 128))
        assert s.shape == (2, 2)
        assert np.array_equal(s, sp) and np.array_equal(c, cp[:130, :200])
        assert np.all(cp[130:] == 0) and np.all(cp[:, 200:] == 0)
        edge = np.float32(np.abs(x[128:, 128:]).max()) / np.float32(fmt_max(fmt))
        assert s[1, 1] == edge, "the corner block's scale uses its real elements only"


def test_pow2_scales(rng):
    x = data(rng, (129, 300))
    for block in ((1, 128), (128, 128), (7, 9)):
        _, plain = fp8.quantize(x, "e4m3", block)
        _, p2 = fp8.quantize(x, "e4m3", block, pow2_scale=True)
        mant, _ = np.frexp(p2)
        assert np.all(mant == 0.5), f"{block}: not powers of two: {p2[mant != 0.5][:4]}"
        assert np.all(p2 >= plain) and np.all(p2 < 2 * plain), f"{block}: not 2^ceil(log2 s)"
    exact = np.full((1, 128), 448.0 * 2.0 ** -3, np.float32)  # amax/448 = 2^-3 exactly
    assert fp8.quantize(exact, pow2_scale=True)[1][0, 0] == 2.0 ** -3


def test_amax_floor_and_zeros():
    x = np.zeros((2, 256), np.float32)
    x[1, 128:] = 1e-6  # below the 1e-4 floor
    codes, scales = fp8.quantize(x)
    floor = np.float32(1e-4) / np.float32(448)
    assert np.all(scales == floor)
    assert np.all(codes[0] == 0) and np.all(codes[1, :128] == 0)
    assert np.array_equal(codes[1, 128:], encode_ref(x[1, 128:] / floor, "e4m3"))


def test_activation_tiles_any_rank(rng):
    x = data(rng, (6, 200)).reshape(2, 3, 200)
    codes, scales = fp8.quantize(x)
    assert codes.shape == (2, 3, 200) and scales.shape == (2, 3, 2)
    c2, s2 = fp8.quantize(x.reshape(6, 200))
    assert np.array_equal(codes.reshape(6, 200), c2) and np.array_equal(scales.reshape(6, 2), s2)
    v = fp8.quantize(x[0, 0])  # 1-D
    assert v[1].shape == (2,) and np.array_equal(v[0], c2[0])
    assert np.array_equal(fp8.dequantize(codes, scales), fp8.dequantize(c2, s2).reshape(x.shape))


def test_per_tensor_block(rng):
    x = data(rng, (33, 65), spread=False)
    codes, scales = fp8.quantize(x, block=x.shape)
    assert scales.shape == (1, 1)
    assert scales[0, 0] == np.float32(np.abs(x).max()) / np.float32(448)


def test_noncontiguous_and_readonly(rng):
    x = data(rng, (31, 260))
    want = fp8.quantize(x)
    for v in (noncontig(x), readonly(x)):
        got = fp8.quantize(v)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    d = fp8.dequantize(noncontig(want[0]), readonly(want[1]))
    assert np.array_equal(d, fp8.dequantize(*want))


@pytest.mark.parametrize("block", [(1, 128), (128, 128), (4, 4), (600, 500)])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_input_is_rejected(block, bad, rng):
    x = data(rng, (600, 500) if block == (600, 500) else (130, 300), spread=False)
    x[129, 260] = bad
    with pytest.raises(ValueError, match=r"x must be finite.*block") as e:
        fp8.quantize(x, block=block)
    assert f"({129 // block[0]}, {260 // block[1]})" in str(e.value)


def test_bad_arguments():
    x = np.ones((4, 256), np.float32)
    with pytest.raises(TypeError, match=r"\bx\b.*float32"):
        fp8.quantize(x.astype(np.float64))
    for block in ((0, 128), (1, 0), (-1, 128)):
        with pytest.raises(ValueError, match=r"block"):
            fp8.quantize(x, block=block)
        with pytest.raises(ValueError, match=r"block"):
            fp8.dequantize(np.zeros((4, 256), np.uint8), np.ones((4, 2), np.float32), block)
    with pytest.raises(ValueError, match=r"block"):
        fp8.quantize(x, block=(128,))
    with pytest.raises(ValueError, match=r"\bx\b must be 2-D"):
        fp8.quantize(np.ones((2, 4, 256), np.float32), block=(128, 128))
    with pytest.raises(ValueError, match=r"fmt must be one of"):
        fp8.quantize(x, fmt="e4m4")
    with pytest.raises(ValueError, match=r"cast-only"):
        fp8.quantize(x, fmt="bf16")
    codes, scales = fp8.quantize(x)
    with pytest.raises(TypeError, match=r"codes.*uint8"):
        fp8.dequantize(codes.astype(np.int8), scales)
    with pytest.raises(TypeError, match=r"scales.*float32"):
        fp8.dequantize(codes, scales.astype(np.float64))
    with pytest.raises(ValueError, match=r"scales must have shape \(4, 2\)"):
        fp8.dequantize(codes, scales[:, :1])
    with pytest.raises(ValueError, match=r"scales must have shape \(1, 2\)"):
        fp8.dequantize(codes, scales, (128, 128))
    with pytest.raises(ValueError, match=r"fmt must be one of"):
        fp8.dequantize(codes, scales, fmt="int8")
