"""The low-precision GEMMs (core/lowp_gemm.h) on each tier: dsv3.ops.bf16_matmul and the exact
mode of dsv3.fp8.gemm against float64 references written from semantics §2.6
(dsv3.reference.lowp, dsv3.reference.fp8), within the fp32 reassociation bound
|C - C_exact| <= gamma(n) * S, S = sum_k |a b sa sb|, gamma(n) = n u / (1 - n u), u = 2^-24,
n = K (bf16) or K + 2 (fp8: two scale multiplications). The active tier runs here; the fp32
tier is forced with DSV3_ISA=avx2 (and, where the CPU allows, the AMX kernel with emulated tile
instructions, DSV3_AMX_EMULATE=1, and avx512-bf16 on an AMX CPU, DSV3_ISA=avx512) in a
subprocess that reruns this file, test_fp8_gemm.py, test_lowp_train.py and test_train.py's
precision tests (the training steps in bf16 and fp8), and the tiers are compared with each
other."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import dsv3
from conftest import noncontig
from dsv3 import fp8, ops
from dsv3.reference.fp8 import gemm_ref
from dsv3.reference.lowp import bf16_gemm_ref, gamma

TIER = dsv3.build_info()["lowp"]["tier"]
SIZES = (1, 16, 31, 33, 127, 128, 129, 300)
HERE = os.path.dirname(os.path.abspath(__file__))


def within_bound(name, C, ref, S, n):
    err = np.abs(C.astype(np.float64) - ref)
    bound = gamma(n) * S
    worst = np.max(err / np.maximum(bound, 1e-300)) if err.size else 0.0
    assert np.all(err <= bound), f"{name}: max err/bound {worst:.3f} (tier {TIER})"


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ---- tier reporting ----------------------------------------------------------------------------

def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_has_avx512_bf16() -> bool:
    flags = cpu_flags()
    return " avx512_bf16" in flags and " avx512f" in flags


def cpu_has_amx_bf16() -> bool:  # Linux names the flag amx_bf16 (and amx_tile)
    flags = cpu_flags()
    return " amx_bf16" in flags and " amx_tile" in flags and cpu_has_avx512_bf16()


EMULATED = os.environ.get("DSV3_AMX_EMULATE") == "1"


def test_build_info_names_the_tier():
    info = dsv3.build_info()["lowp"]
    assert info["tier"] in ("fp32", "avx512-bf16", "amx-bf16")
    assert info["reason"].startswith(info["tier"] if info["tier"] != "fp32" else "fp32 fallback")
    forced = os.environ.get("DSV3_ISA", "")
    if forced in ("avx2", "fp32"):
        assert info["tier"] == "fp32" and "DSV3_ISA" in info["reason"]
    elif forced.startswith("avx512") and cpu_has_avx512_bf16():
        assert info["tier"] == "avx512-bf16" and "DSV3_ISA" in info["reason"]
    elif sys.platform.startswith("linux") and not forced:
        assert (info["tier"] != "fp32") == cpu_has_avx512_bf16(), info
        # AMX: the tier is taken when the CPU has it, or when emulated; the reason says which.
        # On an AMX CPU only the OS may keep it off (tile state not enabled, permission
        # refused: a VM or an old kernel), never a failed self-check (a wrong kernel).
        want_amx = cpu_has_avx512_bf16() and (EMULATED or cpu_has_amx_bf16())
        if want_amx and info["tier"] != "amx-bf16":
            assert not EMULATED and "AMX-BF16 not used" in info["reason"], info
            assert "self-check failed" not in info["reason"], info
            assert any(w in info["reason"] for w in ("XCR0", "kernel refused", "did not grant"))
        else:
            assert (info["tier"] == "amx-bf16") == want_amx, info
        assert ("emulated" in info["reason"]) == (info["tier"] == "amx-bf16" and EMULATED), info


# ---- bf16 GEMM -----------------------------------------------------------------------------

def sweep(base, extra):
    """base, extra, and base with each dimension in turn set to every size of SIZES."""
    cases = {base, *extra}
    for d in range(3):
        for s in SIZES:
            c = list(base)
            c[d] = s
            cases.add(tuple(c))
    return sorted(cases)


# K = 513 / 1025 / 1537: several 512-wide K passes (each ends in a C load-add-store), odd K
@pytest.mark.parametrize("M, K, N", sweep((33, 129, 31), [(1, 1, 1), (300, 300, 300),
                                                                   (129, 300, 127), (33, 513, 65),
                                                                   (97, 1025, 65), (7, 1537, 3)]))
def test_bf16_matmul_vs_float64(M, K, N, rng):
    a = randn(rng, M, K) * np.exp2(rng.uniform(-4, 4, (M, 1))).astype(np.float32)
    b = randn(rng, K, N)
    C = ops.bf16_matmul(a, b)
    assert C.shape == (M, N) and C.dtype == np.float32
    ref, S = bf16_gemm_ref(a, b)
    within_bound(f"bf16 {M}x{K}x{N}", C, ref, S, K)


def test_bf16_matmul_layouts_are_bit_identical(rng):
    a, b = randn(rng, 65, 130), randn(rng, 130, 47)
    C = ops.bf16_matmul(a, b)
    for name, aa, bb in [("fortran a", np.asfortranarray(a), b),
                         ("transposed b", a, np.ascontiguousarray(b.T).T),
                         ("non-contiguous", noncontig(a), noncontig(b)),
                         ("both transposed", np.ascontiguousarray(a.T).T, np.asfortranarray(b))]:
        assert np.array_equal(ops.bf16_matmul(aa, bb).view(np.uint32), C.view(np.uint32)), name


def test_bf16_matmul_zeros_and_empty(rng):
    assert np.array_equal(ops.bf16_matmul(np.zeros((31, 129), np.float32), randn(rng, 129, 33)),
                          np.zeros((31, 33), np.float32))
    assert np.array_equal(ops.bf16_matmul(np.zeros((4, 0), np.float32),
                                          np.zeros((0, 5), np.float32)), np.zeros((4, 5)))
    assert ops.bf16_matmul(np.zeros((0, 7), np.float32), randn(rng, 7, 3)).shape == (0, 3)


def test_bf16_matmul_deterministic_across_threads(rng):
    a, b = randn(rng, 300, 257), randn(rng, 257, 129)
    n = dsv3.get_num_threads()
    try:
        dsv3.set_num_threads(1)
        one = ops.bf16_matmul(a, b)
        again = ops.bf16_matmul(a, b)
        dsv3.set_num_threads(max(2, n))
        two = ops.bf16_matmul(a, b)
        two_again = ops.bf16_matmul(a, b)
        dsv3.set_num_threads(3)  # 300 rows: 4 row blocks on 1 or 2 threads, 6 on 3
        three = ops.bf16_matmul(a, b)
    finally:
        dsv3.set_num_threads(n)
    # same thread count: same bits on every tier
    assert np.array_equal(one.view(np.uint32), again.view(np.uint32))
    assert np.array_equal(two.view(np.uint32), two_again.view(np.uint32))
    # across thread counts: on the bf16 tiers each C element is one thread's fixed-order sum
    # (the fp32 fallback hands each thread's block to sgemm, whose bits can depend on the block's
    # shape: seen on a Zen 5 with OpenBLAS's Haswell kernels)
    if TIER != "fp32":
        assert np.array_equal(one.view(np.uint32), two.view(np.uint32))
        assert np.array_equal(one.view(np.uint32), three.view(np.uint32))


@pytest.mark.parametrize("M", [17, 37])  # below and above the AMX kernel's 32 rows
def test_bf16_matmul_nan_and_inf_propagate(M, rng):
    a, b = randn(rng, M, 40), randn(rng, 40, 35)
    a[3, 7] = np.nan
    a[5, 2] = np.inf
    b[2, :] = 0.0            # inf * 0 = NaN in row 5
    b[9, 4] = np.nan         # column 4 NaN everywhere
    C = ops.bf16_matmul(a, b)
    want = np.zeros(C.shape, bool)
    want[3, :] = want[5, :] = want[:, 4] = True
    assert np.array_equal(np.isnan(C), want)


def test_bf16_rounding_is_rne(rng):
    # 1 + 2^-8 is a tie between 1 and 1 + 2^-7: RNE gives 1; 1 + 3*2^-8 rounds up to 1 + 2^-6
    a = np.array([[1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20]], np.float32)
    C = ops.bf16_matmul(a, np.eye(3, dtype=np.float32))
    assert C.tolist() == [[1.0, 1 + 2 ** -6, 1 + 2 ** -7]]


@pytest.mark.parametrize("M", [1, 32])  # the vdpbf16ps kernel; the AMX kernel (>= 32 rows)
def test_bf16_denormals_per_tier(M):
    """avx512-bf16 (vdpbf16ps) and amx-bf16 (tdpbf16ps): denormal operands count as zero and
    denormal products flush to zero (Intel SDM); the fp32 tier (sgemm on the rounded operands)
    keeps them."""
    a = np.array([[2.0 ** -130, 2.0 ** -70, 1.0]] * M, np.float32)  # bf16-exact values
    b = np.array([[1.0, 0.0, 0.0], [0.0, 2.0 ** -70, 0.0], [0.0, 0.0, 2.0 ** -132]], np.float32)
    C = ops.bf16_matmul(a, b).astype(np.float64)
    for row in C:
        if TIER == "fp32":
            assert row.tolist() == [2.0 ** -130, 2.0 ** -140, 2.0 ** -132]
        else:
            assert row.tolist() == [0.0, 0.0, 0.0]
    if TIER != "fp32":
        ref, _ = bf16_gemm_ref(a, b, daz=True)
        assert np.array_equal(C, ref.astype(np.float32))


def test_bf16_matmul_bad_input(rng):
    with pytest.raises(TypeError, match="a must be a float32"):
        ops.bf16_matmul(np.zeros((2, 2)), np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="b must have 3 rows"):
        ops.bf16_matmul(np.zeros((2, 3), np.float32), np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="must be 2-D"):
        ops.bf16_matmul(np.zeros((2, 3, 1), np.float32), np.zeros((2, 2), np.float32))


# ---- block-scaled FP8 GEMM (exact accumulation) ------------------------------------------------

def operand(rng, rows, K, block, fmt="e4m3", pow2=False, spread=3.0):
    x = rng.standard_normal((rows, K)) * np.exp2(rng.uniform(-spread, spread, (rows, 1)))
    codes, scales = fp8.quantize(x.astype(np.float32), fmt, block, pow2_scale=pow2)
    return codes, scales


def fp8_case(rng, M, N, K, fmt=("e4m3", "e4m3"), pow2=False):
    a, sa = operand(rng, M, K, (1, 128), fmt[0], pow2)
    b, sb = operand(rng, N, K, (128, 128), fmt[1], pow2)
    return a, sa, b, sb


# base: K crosses two 128-chunks, N two 128-row blocks
@pytest.mark.parametrize("M, N, K", sweep((33, 129, 300), [(1, 1, 1), (300, 300, 300),
                                                           (128, 128, 128)]))
def test_fp8_gemm_vs_float64(M, N, K, rng):
    a, sa, b, sb = fp8_case(rng, M, N, K)
    ref, S = gemm_ref(a, sa, (1, 128), b, sb, (128, 128))
    within_bound(f"fp8 {M}x{N}x{K}", fp8.gemm(a, sa, b, sb), ref, S, K + 2)


@pytest.mark.parametrize("fmt", [("e5m2", "e5m2"), ("e5m2", "e4m3"), ("e4m3", "e5m2")])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("M", [31, 40])
def test_fp8_gemm_formats_and_pow2_scales(fmt, pow2, M, rng):
    a, sa, b, sb = fp8_case(rng, M, 129, 257, fmt, pow2)
    ref, S = gemm_ref(a, sa, (1, 128), b, sb, (128, 128), fmt=fmt)
    within_bound(f"{fmt} pow2={pow2}", fp8.gemm(a, sa, b, sb, fmt=fmt), ref, S, 259)


@pytest.mark.parametrize("log2_scale", [-100, -60, 0, 60, 100])
@pytest.mark.parametrize("M", [17, 33])
def test_fp8_gemm_huge_and_tiny_scales(log2_scale, M, rng):
    """Scales far from 1 on both operands (their product stays in fp32 range; the partial
    sums never leave it): the promotion multiplies them in, in fp32."""
    a, sa, b, sb = fp8_case(rng, M, 130, 384)
    sa = (sa * np.float32(2.0 ** log2_scale)).astype(np.float32)
    sb = (sb * np.float32(2.0 ** (-log2_scale // 2))).astype(np.float32)
    ref, S = gemm_ref(a, sa, (1, 128), b, sb, (128, 128))
    within_bound(f"scale 2^{log2_scale}", fp8.gemm(a, sa, b, sb), ref, S, 386)


@pytest.mark.parametrize("M", [20, 36])
def test_fp8_gemm_zeros_and_nan(M, rng):
    a, sa, b, sb = fp8_case(rng, M, 40, 200)
    a[:] = 0
    assert np.array_equal(fp8.gemm(a, sa, b, sb), np.zeros((M, 40), np.float32))
    a, sa, b, sb = fp8_case(rng, M, 40, 200)
    a[4, 150] = 0x7F   # e4m3 NaN (S.1111.111)
    b[7, 3] = 0xFF
    C = fp8.gemm(a, sa, b, sb)
    want = np.zeros(C.shape, bool)
    want[4, :] = want[:, 7] = True
    assert np.array_equal(np.isnan(C), want)


def test_fp8_gemm_accumulate_into_existing(rng):
    """fp8_linear_backward accumulates (dx +=): the transposed-operand GEMMs of training."""
    x = randn(rng, 130, 200)
    w = randn(rng, 70, 200, scale=0.1)
    dy = randn(rng, 130, 70)
    dx, dw = fp8.linear_backward(dy, x, w)
    qdy, sdy = fp8.quantize(dy, "e4m3", (1, 128))
    qwt, swt = fp8.quantize(np.ascontiguousarray(w.T), "e4m3", (128, 128))
    ref, S = gemm_ref(qdy, sdy, (1, 128), qwt, swt, (128, 128))
    within_bound("dx", dx, ref, S, 72)
    qdyt, sdyt = fp8.quantize(np.ascontiguousarray(dy.T), "e4m3", (1, 128))
    qxt, sxt = fp8.quantize(np.ascontiguousarray(x.T), "e4m3", (1, 128))
    ref, S = gemm_ref(qdyt, sdyt, (1, 128), qxt, sxt, (1, 128))
    within_bound("dw", dw, ref, S, 132)


@pytest.mark.parametrize("M", [9, 40])
def test_fp8_gemm_odd_interval_and_tensor_scales(M, rng):
    a, sa, b, sb = fp8_case(rng, M, 17, 100)
    for interval in (33, 64):  # the AMX kernel promotes on whole 32-k steps only (64; 33 not)
        ref, S = gemm_ref(a, sa, (1, 128), b, sb, (128, 128), interval=interval)
        within_bound(f"interval {interval}", fp8.gemm(a, sa, b, sb, promotion_interval=interval),
                     ref, S, 102)
    x = randn(rng, M, 301)
    y = randn(rng, 17, 301)
    qa, ta = fp8.quantize(x, "e4m3", x.shape)
    qb, tb = fp8.quantize(y, "e4m3", y.shape)
    ref, S = gemm_ref(qa, ta, x.shape, qb, tb, y.shape, interval=None)
    within_bound("tensor scales", fp8.gemm(qa, ta, qb, tb, promotion_interval=None), ref, S, 303)


def test_fp8_gemm_deterministic(rng):
    a, sa, b, sb = fp8_case(rng, 129, 300, 257)
    one = fp8.gemm(a, sa, b, sb)
    assert np.array_equal(one.view(np.uint32), fp8.gemm(a, sa, b, sb).view(np.uint32))


# ---- the other tier ----------------------------------------------------------------------------

TIER_SCRIPT = """
import json, sys, numpy as np, dsv3
from dsv3 import fp8, ops
rng = np.random.default_rng(7)
a = rng.standard_normal((129, 300)).astype(np.float32)
b = rng.standard_normal((300, 65)).astype(np.float32)
qa, sa = fp8.quantize(a, "e4m3", (1, 128))
qb, sb = fp8.quantize(np.ascontiguousarray(b.T), "e4m3", (128, 128))
np.save(sys.argv[1], np.stack([ops.bf16_matmul(a, b), fp8.gemm(qa, sa, qb, sb)]))
print(json.dumps(dsv3.build_info()["lowp"]))
"""


def run_tier(tmp_path, env_over):
    out = tmp_path / ("_".join(f"{k}={v}" for k, v in env_over.items()) + ".npy")
    env = {k: v for k, v in os.environ.items() if k not in ("DSV3_ISA", "DSV3_AMX_EMULATE")}
    env.update(env_over)
    r = subprocess.run([sys.executable, "-c", TIER_SCRIPT, str(out)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), np.load(out)


# The lower tiers a test run can force on this CPU: (tier, environment)
FORCED = [("fp32", {"DSV3_ISA": "avx2"})]
if cpu_has_avx512_bf16():  # the AMX kernel with emulated tile instructions
    FORCED.append(("amx-bf16", {"DSV3_AMX_EMULATE": "1"}))
if cpu_has_amx_bf16():
    FORCED.append(("avx512-bf16", {"DSV3_ISA": "avx512"}))


def test_tiers_agree_within_the_bound(tmp_path):
    native_info, native = run_tier(tmp_path, {})
    rng = np.random.default_rng(7)
    a = rng.standard_normal((129, 300)).astype(np.float32)
    b = rng.standard_normal((300, 65)).astype(np.float32)
    _, S = bf16_gemm_ref(a, b)
    qa, sa = fp8.quantize(a, "e4m3", (1, 128))
    qb, sb = fp8.quantize(np.ascontiguousarray(b.T), "e4m3", (128, 128))
    _, S8 = gemm_ref(qa, sa, (1, 128), qb, sb, (128, 128))
    for tier, env in FORCED:
        info, other = run_tier(tmp_path, env)
        assert info["tier"] == tier, (env, info)
        assert np.all(np.abs(native[0] - other[0].astype(np.float64)) <= 2 * gamma(300) * S), env
        assert np.all(np.abs(native[1] - other[1].astype(np.float64)) <= 2 * gamma(302) * S8), env


@pytest.mark.skipif(os.environ.get("DSV3_ISA") is not None or EMULATED, reason="already forced")
@pytest.mark.parametrize("tier, env", FORCED, ids=[t for t, _ in FORCED])
def test_forced_tier_runs_the_low_precision_tests(tier, env):
    """The suite's low-precision tests again on each lower tier this CPU can run (the fp32
    fallback; the AMX kernel emulated; avx512-bf16 on an AMX CPU)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        os.path.join(HERE, "test_lowp_gemm.py"),
                        os.path.join(HERE, "test_fp8_gemm.py"),
                        os.path.join(HERE, "test_lowp_train.py"),
                        os.path.join(HERE, "test_train.py"), "-k",
                        "not tiers_agree and not track_the_fp32_tier and (not test_train.py or "
                        "precision or low_precision)"],
                       env=dict(os.environ, **env), capture_output=True, text=True, timeout=900,
                       cwd=HERE)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_gemm_decodes_every_code_exactly(fmt):
    """Each of the 256 codes times the code of 1.0 (K = 1, unit scales): the GEMM's decode
    table (codes -> bf16) against the format's float64 definition, NaN codes included."""
    from dsv3.reference.fp8 import decode_table
    want = decode_table(fmt)
    one = int(np.flatnonzero(want == 1.0)[0])
    a = np.arange(256, dtype=np.uint8).reshape(256, 1)
    b = np.full((1, 1), one, np.uint8)
    ones_a, ones_b = np.ones((256, 1), np.float32), np.ones((1, 1), np.float32)
    got = fp8.gemm(a, ones_a, b, ones_b, fmt=fmt)[:, 0].astype(np.float64)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan], want[~nan])
    # and as the B operand (the weight side's table)
    got_b = fp8.gemm(b, ones_b, a, ones_a, fmt=fmt)[0].astype(np.float64)
    assert np.array_equal(np.isnan(got_b), nan) and np.array_equal(got_b[~nan], want[~nan])
