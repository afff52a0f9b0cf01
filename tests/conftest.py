"""Shared test machinery: the tolerance table, seeded RNG, configs, assert_close and the
central finite-difference gradient checker. References are float64 (numpy written here from
docs/semantics.md's formulas, or PyTorch autograd), never derived from the C++."""
from __future__ import annotations

import os
from typing import Callable, Dict, Sequence, Tuple

import numpy as np
import pytest

import dsv3

# (rtol, atol) per comparison kind, each with its reason.
TOL: Dict[str, Tuple[float, float]] = {
    # fp32 kernels vs a float64 reference: a few ulp per op, sums of up to ~4k terms
    # (rounding grows ~sqrt(n) * 6e-8) -> 1e-5 relative plus a small absolute floor.
    "fp32": (1e-5, 1e-6),
    # fp32 reductions over long rows (softmax/cross-entropy over V, attention over Tk):
    # the floor scales with the magnitudes involved.
    "fp32_reduce": (2e-5, 1e-5),
    # backward of fp32 kernels vs float64 autograd: one more GEMM or reduction in the chain.
    "fp32_grad": (2e-5, 2e-6),
    # finite differences of an fp32 function with step 1e-2 (relative): truncation O(h^2)
    # plus fp32 cancellation ~ 1e-7 * |L| / h.
    "fd": (2e-2, 1e-3),
}

SIZES_ODD = (1, 31, 33, 129)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def tiny_config() -> dsv3.Config:
    return dsv3.Config.tiny()


@pytest.fixture
def v3_config_path() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(here, "data", "deepseek_v3_config.json")


def randn(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def assert_close(name: str, got, want, kind: str = "fp32", rtol: float = None,
                 atol: float = None) -> None:
    """Elementwise |got - want| <= atol + rtol * |want|, with a message giving the case name,
    the max abs / max rel / mean abs errors and where the worst element is."""
    r, a = TOL[kind]
    rtol = r if rtol is None else rtol
    atol = a if atol is None else atol
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != expected {want.shape}"
    assert np.array_equal(np.isnan(got), np.isnan(want)), f"{name}: NaN pattern differs"
    ok = ~np.isnan(want)
    err = np.abs(got - want)[ok]
    if err.size == 0:
        return
    bound = atol + rtol * np.abs(want[ok])
    if np.all(err <= bound):
        return
    worst = int(np.argmax(err - bound))
    rel = err / np.maximum(np.abs(want[ok]), 1e-30)
    raise AssertionError(
        f"{name}: max abs err {err.max():.3e}, max rel err {rel.max():.3e}, mean abs err "
        f"{err.mean():.3e} (rtol {rtol}, atol {atol}); worst element got "
        f"{got[ok][worst]:.8g} want {want[ok][worst]:.8g}")


def fd_check(name: str, loss: Callable[..., float], inputs: Sequence[np.ndarray],
             grads: Sequence[np.ndarray], rng: np.random.Generator, directions: int = 3,
             rel_step: float = 1e-2) -> None:
    """Central finite differences along random directions: for each input x_i with analytic
    gradient g_i and a random unit-scale direction v, (L(x+hv) - L(x-hv)) / 2h must match
    <g_i, v>. ``loss`` takes the inputs (float32 arrays) and returns a Python float computed
    in float64 from the op's float32 output."""
    for i, (x, g) in enumerate(zip(inputs, grads)):
        assert g.shape == x.shape, f"{name}: grad {i} shape {g.shape} != input {x.shape}"
        scale = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) or 1.0
        h = rel_step * scale
        for d in range(directions):
            v = rng.standard_normal(x.shape).astype(np.float32)
            args_p = list(inputs)
            args_m = list(inputs)
            args_p[i] = (x + h * v).astype(np.float32)
            args_m[i] = (x - h * v).astype(np.float32)
            num = (loss(*args_p) - loss(*args_m)) / (2 * h)
            ana = float(np.sum(g.astype(np.float64) * v))
            rtol, atol = TOL["fd"]
            denom = max(abs(num), abs(ana), float(np.sqrt(np.sum(np.square(g, dtype=np.float64)))))
            assert abs(num - ana) <= atol * max(denom, 1.0) + rtol * denom, (
                f"{name}: input {i} direction {d}: finite difference {num:.6g} vs analytic "
                f"{ana:.6g} (|diff| {abs(num - ana):.3e})")


def noncontig(x: np.ndarray) -> np.ndarray:
    """The same values as x in a non-contiguous view (every other element of a bigger array)."""
    big = np.empty(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
    big[..., ::2] = x
    view = big[..., ::2]
    assert not view.flags.c_contiguous
    return view


def readonly(x: np.ndarray) -> np.ndarray:
    y = x.copy()
    y.flags.writeable = False
    return y


def get_torch():
    """PyTorch (CPU) as the float64 autograd oracle. CI installs it; a missing torch fails
    loudly unless DSV3_REQUIRE_TORCH=0 (then the tests that need it are skipped)."""
    try:
        import torch as _t
    except ImportError:
        if os.environ.get("DSV3_REQUIRE_TORCH") == "0":
            pytest.skip("PyTorch not installed (DSV3_REQUIRE_TORCH=0)")
        raise
    return _t


def child_env(**extra: str) -> Dict[str, str]:
    """The environment of a test's child interpreter: the dsv3 this test imported (an installed
    one in CI, python/ in a dev tree) first on PYTHONPATH, plus ``extra``."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(dsv3.__file__)))
    path = [pkg] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), **extra)
