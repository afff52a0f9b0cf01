"""The installed package: version, build info, threading knobs, GIL release."""
import gc
import threading
import time

import numpy as np
import pytest

import dsv3
from dsv3 import ops


def test_version_and_build_info():
    assert isinstance(dsv3.__version__, str) and dsv3.__version__.count(".") == 2
    info = dsv3.build_info()
    for key in ("compiler", "blas", "openmp", "num_threads", "simd", "version"):
        assert key in info, key
    assert "OpenBLAS" in info["blas"]
    assert info["optimized"] is True or info["sanitizers"] != "none"


def test_threads_knob():
    n = dsv3.get_num_threads()
    try:
        dsv3.set_num_threads(1)
        assert dsv3.get_num_threads() == 1
        assert dsv3.build_info()["num_threads"] == 1
    finally:
        dsv3.set_num_threads(n)
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, "):
        dsv3.set_num_threads(0)


def test_private_core_not_in_public_surface():
    assert "_core" not in dsv3.__all__
    assert set(ops.__all__) <= set(dir(ops))


MIN_CALL_S = 0.2    # each measured call is sized to take at least this long
MAX_GIL_GAP_S = 0.1  # the longest the ticker may wait for the GIL during such a call


def gil_gaps(fn):
    """Run fn() while a Python thread ticks every ~1 ms; return (duration of fn, the longest
    interval without a tick between fn's start and end, ticks during the call). A call that
    holds the GIL for its whole duration leaves one gap as long as itself."""
    ticks, done, running = [], threading.Event(), threading.Event()

    def ticker():
        running.set()
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=ticker)
    # A full collection of the test process's heap holds the GIL for as long as 0.2 s late in
    # the suite (seen in CI); that pause is the interpreter's, not the call's: keep it out.
    gc.collect()
    gc.disable()
    t.start()
    running.wait()
    try:
        start = time.perf_counter()
        fn()
        end = time.perf_counter()
    finally:
        done.set()
        t.join()
        gc.enable()
    marks = [start] + [s for s in ticks if start < s < end] + [end]
    return end - start, max(b - a for a, b in zip(marks, marks[1:])), len(marks) - 2


def sized(make, name, max_doublings=7):
    """make(n) -> a zero-argument call whose work grows with n; doubles n until one call takes
    MIN_CALL_S (measured here, with no ticker), or skips when even a large n is too fast."""
    n = 1
    for _ in range(max_doublings + 1):  # n up to 2^max_doublings
        fn = make(n)
        took = []
        for _ in range(2):  # the faster of two: a load spike must not pick a size too small
            t0 = time.perf_counter()
            fn()
            took.append(time.perf_counter() - t0)
            if took[-1] < MIN_CALL_S:
                break
        if min(took) >= MIN_CALL_S:
            return fn
        n *= 2
    pytest.skip(f"{name}: this machine runs the largest size in under {MIN_CALL_S} s; the "
                "GIL release cannot be observed")


def assert_releases_gil(name, fn):
    dur, gap, n = gil_gaps(fn)
    assert dur >= MIN_CALL_S / 4 and n >= 3 and gap < min(MAX_GIL_GAP_S, dur / 2), (
        f"{name}: call took {dur:.3f} s, {n} ticks during it, the ticker waited up to "
        f"{gap:.3f} s for the GIL")


def test_gil_check_rejects_a_call_that_holds_the_gil():
    """The check can fail: list.sort of ints runs in C holding the GIL throughout."""
    fn = sized(lambda n: (lambda xs=list(range(n * 200_000, 0, -1)): sorted(xs)), "sorted")
    dur, gap, n = gil_gaps(fn)
    assert gap >= min(MAX_GIL_GAP_S, dur / 2), (dur, gap, n)


def _model(layers=2):
    return dsv3.Model(dsv3.Config.small().replace(num_hidden_layers=layers), seed=0)


def _tokens(cfg, b, t, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(b, t))


def _gil_cases():
    """Each long-running entry point, as make(n) -> call (sized by sized())."""
    from dsv3 import fp8

    def square(n):  # (256 n, 1024) and (1024, 1024): one call, work linear in n
        rng = np.random.default_rng(0)
        return (rng.standard_normal((256 * n, 1024)).astype(np.float32),
                rng.standard_normal((1024, 1024)).astype(np.float32))

    def linear(n):
        x, w = square(n)
        return lambda: ops.linear(x, w)

    def bf16(n):
        a, b = square(n)
        return lambda: ops.bf16_matmul(a, b)

    def fp8_gemm(n):
        a, b = square(n)
        (ac, as_), (bc, bs) = fp8.quantize(a), fp8.quantize(b, block=(128, 128))
        return lambda: fp8.gemm(ac, as_, bc, bs)

    def fp8_gemm_limited(n):
        a, b = square(n)
        (ac, as_), (bc, bs) = fp8.quantize(a), fp8.quantize(b, block=(128, 128))
        return lambda: fp8.gemm(ac, as_, bc, bs, accumulator_bits=14)

    def forward(n):
        m = _model()
        tok = _tokens(m.config, n, 128)
        return lambda: m.forward(tok)

    def loss(n):
        m = _model()
        tok = _tokens(m.config, n, 129)
        return lambda: m.loss(tok)

    def loss_and_grad(n):
        m = _model()
        tok = _tokens(m.config, n, 129)
        return lambda: m.loss_and_grad(tok)

    def trainer_step(n):
        tr = dsv3.Trainer(_model(), dsv3.TrainConfig(lr=1e-4, schedule="constant"))
        tok = _tokens(tr.model.config, n, 129)
        return lambda: tr.step(tok)

    def generate(n):  # the prefill of a long prompt is one call
        m = _model(layers=2 * n)
        prompt = _tokens(m.config, 1, 500)[0]
        return lambda: m.generate(prompt, max_new_tokens=2)

    return {"ops.linear": linear, "ops.bf16_matmul": bf16, "fp8.gemm": fp8_gemm,
            "fp8.gemm(accumulator_bits=14)": fp8_gemm_limited, "Model.forward": forward,
            "Model.loss": loss, "Model.loss_and_grad": loss_and_grad,
            "Trainer.step": trainer_step, "Model.generate": generate}


@pytest.mark.parametrize("name", list(_gil_cases()))
def test_gil_released_during_compute(name):
    """A Python thread keeps running while a long C++ call is in flight."""
    # the GEMMs (256 n x 1024 x 1024) up to n = 512: a Zen 5 ran n = 128 in under MIN_CALL_S
    gemm = name in ("ops.linear", "ops.bf16_matmul", "fp8.gemm")
    assert_releases_gil(name, sized(_gil_cases()[name], name, 9 if gemm else 7))


def test_gil_released_during_from_pretrained(tmp_path):
    m = dsv3.Model(dsv3.Config.small().replace(num_hidden_layers=8), seed=0)
    m.save_pretrained(str(tmp_path / "ck"))
    fn = sized(lambda n: (lambda: [dsv3.Model.from_pretrained(str(tmp_path / "ck")) for _ in range(n)]),
               "from_pretrained")
    assert_releases_gil("Model.from_pretrained", fn)


def _malloc_tuned(env):
    import os
    import subprocess
    import sys
    e = {k: v for k, v in os.environ.items()
         if k not in ("DSV3_MALLOC_TUNING", "GLIBC_TUNABLES") and not k.startswith("MALLOC_")}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", "import dsv3; print(dsv3.build_info()['malloc_tuned'])"],
                         env=e, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not __import__("platform").libc_ver()[0] == "glibc", reason="glibc only")
def test_malloc_policy_applied_at_import_unless_opted_out():
    # core/memory.h: fixed mmap threshold + 1 GiB trim threshold, skipped on request or when
    # the user already set malloc policy through the environment
    if dsv3.build_info()["sanitizers"] != "none":
        pytest.skip("the sanitizer allocator replaces malloc")
    assert _malloc_tuned({}) == "True"
    assert _malloc_tuned({"DSV3_MALLOC_TUNING": "0"}) == "False"
    assert _malloc_tuned({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"}) == "False"
    assert _malloc_tuned({"MALLOC_ARENA_MAX": "2"}) == "False"
