"""The attention core's product (csrc/core/small_gemm.h) against float64 numpy, through the
private hooks _core._small_gemm and _core._transpose_rows, and the attention kernels with the
AVX-512 product against the same kernels on the BLAS fallback (DSV3_SMALL_GEMM=0).

Tolerance: every C element is a K-term fp32 dot product (one FMA per term, in k order), so its
error is at most ~K * 2^-24 * sum|a_k b_k| (the classical bound); the tests check
|C - C64| <= 4 K 2^-24 * (|A| @ |B|) + tiny, elementwise.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import dsv3

small_gemm = dsv3._core._small_gemm
transpose_rows = dsv3._core._transpose_rows


def bound(a, b, K):
    return 4 * K * 2.0 ** -24 * (np.abs(a) @ np.abs(b)) + 1e-30


# M, N, K cover the tile edges (8-row tiles, 32-column panels, 16-float vectors), the wide
# tiles of trans_a with N a multiple of 64 (6 rows) or 96 (4 rows), and B-panel packing
# (M above 8 row tiles)
SHAPES = [(1, 1, 1), (8, 32, 16), (9, 33, 7), (64, 96, 64), (13, 17, 100), (7, 64, 1),
          (64, 288, 96), (5, 15, 0), (3, 48, 5), (70, 128, 20), (130, 40, 9)]


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_small_gemm_matches_float64(M, N, K, trans_a, accumulate):
    rng = np.random.default_rng(M * 1000 + N * 10 + K)
    a = rng.standard_normal((K, M) if trans_a else (M, K)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    c0 = rng.standard_normal((M, N)).astype(np.float32)
    alpha = 0.37
    a64 = (a.T if trans_a else a).astype(np.float64)
    want = alpha * (a64 @ b.astype(np.float64))
    if accumulate:
        want += c0
        got = small_gemm(a, b, trans_a, alpha, c0)
    else:
        got = small_gemm(a, b, trans_a, alpha)
    assert got.shape == (M, N)
    tol = abs(alpha) * bound(a64, b.astype(np.float64), K)
    if accumulate:
        tol = tol + np.abs(c0) * 2.0 ** -23
    assert np.all(np.abs(got - want) <= tol), np.max(np.abs(got - want) / tol)


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("trans_a", [False, True])
def test_naive_reference_matches_float64_and_small_gemm(M, N, K, trans_a):
    # core/blas.h's sgemm_naive, the reference kept beside the fast product: within the same
    # bound of float64, and the fast product within twice that bound of it
    rng = np.random.default_rng(M * 1000 + N * 10 + K + 1)
    a = rng.standard_normal((K, M) if trans_a else (M, K)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    c0 = rng.standard_normal((M, N)).astype(np.float32)
    a64 = (a.T if trans_a else a).astype(np.float64)
    want = 0.37 * (a64 @ b.astype(np.float64)) + c0
    tol = 0.37 * bound(a64, b.astype(np.float64), K) + np.abs(c0) * 2.0 ** -23
    naive = small_gemm(a, b, trans_a, 0.37, c0, naive=True)
    fast = small_gemm(a, b, trans_a, 0.37, c0)
    assert np.all(np.abs(naive - want) <= tol), np.max(np.abs(naive - want) / tol)
    assert np.all(np.abs(fast - naive) <= 2 * tol), np.max(np.abs(fast - naive) / tol)


def test_small_gemm_leaves_c_argument_alone_and_checks_shapes():
    a = np.ones((4, 3), np.float32)
    b = np.ones((3, 5), np.float32)
    c = np.zeros((4, 5), np.float32)
    out = small_gemm(a, b, False, 1.0, c)
    assert np.all(out == 3) and np.all(c == 0)
    with pytest.raises(ValueError, match="b must have 3 rows"):
        small_gemm(a, np.ones((4, 5), np.float32))
    with pytest.raises(ValueError, match="c must have shape"):
        small_gemm(a, b, False, 1.0, np.zeros((5, 4), np.float32))


@pytest.mark.parametrize("n,lds,K", [(1, 1, 1), (16, 96, 96), (17, 70, 64), (513, 100, 96),
                                     (5, 8, 3), (40, 40, 0)])
def test_transpose_rows(n, lds, K):
    src = np.random.default_rng(n + lds).standard_normal((n, lds)).astype(np.float32)
    np.testing.assert_array_equal(transpose_rows(src, K), src[:, :K].T)


def test_attention_gemm_reported(tmp_path):
    assert dsv3.build_info()["attention_gemm"] in ("avx512", "blas")
    out = subprocess.run([sys.executable, "-c", "import dsv3; print(dsv3.build_info()"
                          "['attention_gemm'])"], env=dict(os.environ, DSV3_SMALL_GEMM="0"),
                         check=True, capture_output=True, text=True).stdout.strip()
    assert out == "blas"


FALLBACK_SCRIPT = r"""
import numpy as np, dsv3
from dsv3 import ops
rng = np.random.default_rng(3)
out = {}
for B, Tq, Tk, H, Hkv, Dk, Dv, sp in [(2, 37, 37, 4, 2, 24, 16, 0), (1, 5, 64, 2, 2, 8, 8, 30),
                                      (1, 130, 130, 2, 1, 40, 72, 0),
                                      (1, 20, 90, 4, 2, 64, 96, 40)]:
    q = rng.standard_normal((B, Tq, H, Dk)).astype(np.float32)
    k = rng.standard_normal((B, Tk, Hkv, Dk)).astype(np.float32)
    v = rng.standard_normal((B, Tk, Hkv, Dv)).astype(np.float32)
    do = rng.standard_normal((B, Tq, H, Dv)).astype(np.float32)
    o, lse = ops.attention(q, k, v, 0.3, sp)
    dq, dk, dv = ops.attention_backward(do, q, k, v, o, lse, 0.3, sp)
    # keys no query sees get exactly zero gradients (the outputs start as poisoned memory)
    assert not dk[:, sp + Tq:].any() and not dv[:, sp + Tq:].any()
    for name, x in (("o", o), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        out[f"{Tq}_{name}"] = x
np.savez(OUT, gemm=dsv3.build_info()["attention_gemm"], **out)
"""


def run_attention(tmp_path, tag, env_extra):
    path = tmp_path / f"{tag}.npz"
    # malloc hands out poisoned bytes, so a gradient row that is never written shows
    env = dict(os.environ, MALLOC_PERTURB_="165", **env_extra)
    subprocess.run([sys.executable, "-c", f"OUT = {str(path)!r}\n" + FALLBACK_SCRIPT],
                   env=env, check=True)
    with np.load(path) as z:  # closes the archive
        return dict(z)


def test_attention_same_with_blas_fallback(tmp_path):
    """Both product paths give the attention kernels' results to fp32 rounding."""
    fast = run_attention(tmp_path, "fast", {})
    blas = run_attention(tmp_path, "blas", {"DSV3_SMALL_GEMM": "0"})
    assert str(blas.pop("gemm")) == "blas"
    fast.pop("gemm")  # "avx512" where the CPU has it (else both runs take the BLAS path)
    for key, x in blas.items():
        # values are O(1..10) sums of <= 130 products: fp32 rounding differences ~1e-5 relative
        np.testing.assert_allclose(fast[key], x, rtol=2e-5, atol=2e-5, err_msg=key)
