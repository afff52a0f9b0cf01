"""The installed package: version, build info, threading knobs, GIL release."""
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
    with pytest.raises(ValueError, match="n must be >= 1"):
        dsv3.set_num_threads(0)


def test_private_core_not_in_public_surface():
    assert "_core" not in dsv3.__all__
    assert set(ops.__all__) <= set(dir(ops))


def test_gil_released_during_compute():
    """A Python thread keeps running while a long C++ call is in flight."""
    x = np.ones((1024, 1024), dtype=np.float32)
    w = np.ones((1024, 1024), dtype=np.float32)
    ticks = []
    done = threading.Event()

    def ticker():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=ticker)
    t.start()
    try:
        start = time.perf_counter()
        for _ in range(10):
            ops.linear(x, w)
        end = time.perf_counter()
    finally:
        done.set()
        t.join()
    during = [s for s in ticks if start < s < end]
    # with the GIL held for the whole call the ticker could not run between start and end
    assert end - start < 0.05 or len(during) >= 3, (end - start, len(during))


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
