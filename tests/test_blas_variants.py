"""Threading and BLAS policy: the pool's products against float64, concurrent and
forked callers, the default thread count, and the engine with each of Debian's OpenBLAS
builds (libopenblas0-openmp, -pthread, -serial) loaded through LD_LIBRARY_PATH: the build is
reported in build_info and the results are bit-identical across builds."""
import json
import multiprocessing
import os
import subprocess
import sys
import sysconfig
import threading

import numpy as np
import pytest

import dsv3
from dsv3 import ops

from conftest import randn

PYPATH = os.path.dirname(os.path.dirname(os.path.abspath(dsv3.__file__)))
MULTIARCH = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
# Where the builds' directories (openblas-openmp/, -pthread/, -serial/) are looked for: the
# system's, or e.g. a `dpkg -x` of the .deb files (DSV3_OPENBLAS_LIBDIRS=dir1,dir2).
LIBDIRS = os.environ.get("DSV3_OPENBLAS_LIBDIRS", f"/usr/lib/{MULTIARCH}").split(",")
VARIANTS = {v: next((os.path.join(d, f"openblas-{v}") for d in LIBDIRS
                     if os.path.exists(os.path.join(d, f"openblas-{v}", "libopenblas.so.0"))),
                    os.path.join(LIBDIRS[0], f"openblas-{v}"))
            for v in ("openmp", "pthread", "serial")}
REPORTED = {"openmp": "openmp", "pthread": "pthreads", "serial": "serial"}


def child(code: str, env_extra=None, timeout: int = 300) -> dict:
    """Runs code (which prints one JSON line) in a fresh interpreter that imports this dsv3."""
    env = dict(os.environ, PYTHONPATH=PYPATH + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# Products on each side of the split threshold (M*N*K >= 2^18), split by rows (M >= N) or by
# columns, with ragged last blocks; the step and the decode run the whole engine.
ENGINE = r"""
import hashlib, json, numpy as np, dsv3
from dsv3 import ops
dsv3.set_num_threads(2)
rng = np.random.default_rng(0)
h = hashlib.sha256()
for M, K, N in ((1, 300, 1030), (517, 129, 33), (33, 129, 517), (2048, 256, 256), (7, 5, 3)):
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    h.update(ops.linear(x, w).tobytes())
    dx, dw = ops.linear_backward(rng.standard_normal((M, N)).astype(np.float32), x, w)
    h.update(dx.tobytes()); h.update(dw.tobytes())
cfg = dsv3.Config.tiny()
t = dsv3.Trainer(dsv3.Model(cfg, seed=0), dsv3.TrainConfig(lr=1e-3, schedule="constant"))
batch = rng.integers(0, cfg.vocab_size, size=(4, 33))
losses = [t.step(batch)["loss"] for _ in range(2)]
toks = t.model.generate(np.arange(5), max_new_tokens=8).tokens
info = dsv3.build_info()
print(json.dumps({"hash": h.hexdigest(), "losses": losses, "tokens": [int(v) for v in toks],
                  "variant": info["blas_variant"], "loaded": info["blas_loaded"],
                  "calls": info["blas_threads"]}))
"""


def present_variants():
    return [v for v, d in VARIANTS.items() if os.path.exists(os.path.join(d, "libopenblas.so.0"))]


@pytest.mark.slow
def test_each_openblas_build_reported_and_identical():
    info = dsv3.build_info()
    if info["blas_source"] != "system":
        pytest.skip("built against PyPI's OpenBLAS: Debian's builds cannot be swapped in")
    found = present_variants()
    if not found:
        pytest.skip(f"none of {sorted(VARIANTS.values())} exists")
    runs = {v: child(ENGINE, {"LD_LIBRARY_PATH": VARIANTS[v]}) for v in found}
    first = runs[found[0]]
    for v, r in runs.items():
        assert r["variant"] == REPORTED[v], (v, r["variant"])
        assert r["loaded"].startswith(VARIANTS[v] + "/"), (v, r["loaded"])
        assert r["hash"] == first["hash"], f"products differ: {v} vs {found[0]}"
        assert r["losses"] == first["losses"], f"training losses differ: {v} vs {found[0]}"
        assert r["tokens"] == first["tokens"], f"decoded tokens differ: {v} vs {found[0]}"
    if "serial" in runs:  # a private copy of the library per thread, or (forced) serialised
        assert "each thread calls a private copy (" in runs["serial"]["calls"], \
            runs["serial"]["calls"]
        forced = child(ENGINE, {"LD_LIBRARY_PATH": VARIANTS["serial"], "DSV3_BLAS_COPIES": "0"})
        assert forced["calls"].startswith("serialised"), forced["calls"]
        for key in ("hash", "losses", "tokens"):
            assert forced[key] == first[key], f"serialised serial build differs in {key}"


@pytest.mark.parametrize("M,K,N", [(1, 300, 1030), (517, 129, 33), (33, 129, 517),
                                   (1030, 256, 1), (64, 64, 64)])
def test_split_products_match_float64(rng, M, K, N):
    x, w, dy = randn(rng, M, K), randn(rng, N, K), randn(rng, M, N)
    check_product("linear", ops.linear(x, w), x, w.T)
    dx, dw = ops.linear_backward(dy, x, w)
    check_product("dx", dx, dy, w)
    check_product("dw", dw, dy.T, x)


def check_product(name, got, a, b):
    """got ~ a @ b within fp32's dot-product error bound k * 2^-23 * (|a| @ |b|): a block
    written to the wrong place or left out is off by O(1)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    err = np.abs(got - a @ b)
    bound = a.shape[1] * 2.0 ** -23 * (np.abs(a) @ np.abs(b)) + 1e-30
    assert got.shape == err.shape and np.all(err <= bound), \
        f"{name}: worst err/bound {float((err / bound).max()):.3g}"


def test_same_bits_for_one_thread_count_and_concurrent_callers(rng):
    """A product split across the pool gives the same bits when run again, and when two Python
    threads call at once (one gets the pool, the other runs the same chunks inline)."""
    x, w = randn(rng, 700, 300), randn(rng, 900, 300)
    want = ops.linear(x, w)
    assert np.array_equal(ops.linear(x, w), want)
    got, errors = [], []

    def worker():
        try:
            for _ in range(5):
                got.append(ops.linear(x, w))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    ts = [threading.Thread(target=worker) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    assert len(got) == 15 and all(np.array_equal(g, want) for g in got)


def _forked_linear(q):
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((600, 200)).astype(np.float32), rng.standard_normal((500, 200)).astype(np.float32)
    q.put(float(np.abs(ops.linear(x, w) - x.astype(np.float64) @ w.T.astype(np.float64)).max()))


def test_pool_works_in_a_forked_child():
    ops.linear(np.ones((600, 200), np.float32), np.ones((500, 200), np.float32))  # pool up
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_forked_linear, args=(q,))
    p.start()
    p.join(120)
    assert p.exitcode == 0
    assert q.get(timeout=5) < 1e-3


THREADS = "import json, dsv3; i = dsv3.build_info(); dsv3.set_num_threads(2); " \
          "spin2 = dsv3.build_info()['spin_budget_us']; dsv3.set_num_threads(1); " \
          "print(json.dumps({'n': i['num_threads'], 'src': i['threads_default'], 'spin2': spin2, " \
          "'spin1': dsv3.build_info()['spin_budget_us'], 'spin': i['spin_us']}))"


def test_default_threads_follow_affinity_and_omp_num_threads():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    full = len(os.sched_getaffinity(0))
    r = child(THREADS, {"OMP_NUM_THREADS": ""} if "OMP_NUM_THREADS" in os.environ else None)
    if "OMP_NUM_THREADS" not in env:
        assert r["n"] <= full and f"affinity {full} CPUs" in r["src"], r
    r = child(THREADS, {"OMP_NUM_THREADS": "3"})
    assert r["n"] == 3 and "OMP_NUM_THREADS=3" in r["src"], r
    one = "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); " + THREADS
    r = child(one, {"OMP_NUM_THREADS": ""})
    assert r["n"] == 1 and "affinity 1 CPUs" in r["src"], r


def test_set_num_threads_overrides_and_resizes_pool(rng):
    x, w = randn(rng, 400, 300), randn(rng, 500, 300)
    n0 = dsv3.get_num_threads()
    try:
        outs = []
        for n in (1, 3, 2):
            dsv3.set_num_threads(n)
            assert dsv3.get_num_threads() == n
            outs.append(ops.linear(x, w))
        for o in outs:
            check_product("linear", o, x, w.T)
    finally:
        dsv3.set_num_threads(n0)


def test_build_info_blas_keys():
    info = dsv3.build_info()
    assert info["blas_variant"] in ("openmp", "pthreads", "serial")
    assert info["blas_source"] in ("system", "pypi")
    assert os.path.exists(info["blas_loaded"]), info["blas_loaded"]
    assert info["threading"] == "dsv3 pool" and info["spin_us"] >= 0
    assert "->" in info["threads_default"]


def _quota_cgroup(cpus: float):
    """A fresh cgroup limited to `cpus` CPUs (v1 cpu controller or v2 cpu.max), or None."""
    for root, name, text in (("/sys/fs/cgroup/cpu", "cpu.cfs_quota_us", str(int(cpus * 1e5))),
                             ("/sys/fs/cgroup", "cpu.max", f"{int(cpus * 1e5)} 100000")):
        d = f"{root}/dsv3-test-{os.getpid()}"
        if not os.path.exists(f"{root}/cgroup.procs"):  # not a cgroup hierarchy
            continue
        try:
            os.mkdir(d)
        except OSError:
            continue
        try:
            with open(f"{d}/{name}", "w") as f:
                f.write(text)
            return d
        except OSError:
            os.rmdir(d)
    return None


@pytest.mark.parametrize("cpus,want", [(0.5, 1), (1.5, 2)])
def test_default_threads_follow_cgroup_quota(cpus, want):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    d = _quota_cgroup(cpus)
    if d is None:
        pytest.skip("cannot create a cgroup with a CPU quota here")
    try:
        env = dict(os.environ, OMP_NUM_THREADS="",
                   PYTHONPATH=PYPATH + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run(["sh", "-c", f'echo $$ > {d}/cgroup.procs && exec "$0" -c "$1"',
                              sys.executable, THREADS], env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        r = json.loads(out.stdout.strip().splitlines()[-1])
        assert r["n"] == want and f"cgroup quota {cpus:g} CPUs" in r["src"], r
        # two threads under a quota below 2 CPUs never spin (they would burn the quota)
        assert r["spin2"] == 0 and r["spin1"] == (r["spin"] if cpus >= 1 else 0), r
    finally:
        os.rmdir(d)


THREAD_LIMIT = r"""
import json, resource, numpy as np, dsv3
x = np.random.rand(4096, 512).astype(np.float32); w = np.ones(512, np.float32)
dsv3.ops.rmsnorm(x, w)
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (120 << 20), resource.RLIM_INFINITY))
before = dsv3.get_num_threads()
try:  # set_num_threads starts the pool itself: 63 workers x 8 MiB stacks do not fit in 120 MiB
    dsv3.set_num_threads(64); dsv3.ops.rmsnorm(x, w); err = ""
except RuntimeError as e:
    err = str(e)
assert dsv3.get_num_threads() == before, (dsv3.get_num_threads(), before)  # the failed count not kept
dsv3.set_num_threads(2)
ok = bool(np.array_equal(dsv3.ops.rmsnorm(x, w), dsv3.ops.rmsnorm(x, w)))
print(json.dumps({"err": err, "ok": ok}))
"""


def test_worker_threads_that_cannot_start_raise():
    # was std::terminate (rc -6): std::thread's exception escaped the pool's constructor
    r = child(THREAD_LIMIT, timeout=120)
    assert "could not start 63 worker threads" in r["err"] and "set_num_threads" in r["err"]
    assert r["ok"]


FORK_DURING_SERIAL_CALL = r"""
import json, os, threading, numpy as np, dsv3
from dsv3 import ops
assert dsv3.build_info()["blas_variant"] == "serial"
a = np.random.rand(512, 512).astype(np.float32)
stop = False
def busy():
    while not stop:
        ops.linear(a, a)  # serialised calls, one after another
t = threading.Thread(target=busy); t.start()
codes = []
for _ in range(20):
    pid = os.fork()
    if pid == 0:  # the child calls BLAS: a mutex copied locked would hang it here
        ops.linear(a[:64], a); os._exit(0)
    codes.append(os.waitpid(pid, 0)[1])
stop = True; t.join()
print(json.dumps({"codes": codes}))
"""


def test_fork_during_a_serialised_call():
    if dsv3.build_info()["blas_source"] != "system" or "serial" not in present_variants():
        pytest.skip("needs Debian's serial OpenBLAS build")
    r = child(FORK_DURING_SERIAL_CALL, {"LD_LIBRARY_PATH": VARIANTS["serial"]}, timeout=120)
    assert r["codes"] == [0] * 20


OMP_ICV = r"""
import ctypes, json, numpy as np, dsv3
from dsv3 import ops
gomp = ctypes.CDLL("libgomp.so.1")
gomp.omp_set_num_threads(3)
ops.linear(np.ones((4, 8), np.float32), np.ones((5, 8), np.float32))  # on this thread
print(json.dumps({"variant": dsv3.build_info()["blas_variant"], "icv": gomp.omp_get_max_threads()}))
"""


def test_openmp_setting_of_the_caller_survives_a_call():
    # the OpenMP build is called with one thread; the caller's own setting is restored after
    if dsv3.build_info()["blas_source"] != "system" or "openmp" not in present_variants():
        pytest.skip("needs Debian's OpenMP OpenBLAS build")
    r = child(OMP_ICV, {"LD_LIBRARY_PATH": VARIANTS["openmp"]})
    assert r == {"variant": "openmp", "icv": 3}


OMP_ICV_AT_IMPORT = r"""
import ctypes, json, dsv3
gomp = ctypes.CDLL("libgomp.so.1")
print(json.dumps({"variant": dsv3.build_info()["blas_variant"], "icv": gomp.omp_get_max_threads()}))
"""


def test_import_keeps_the_callers_openmp_setting():
    # the import-time openblas_set_num_threads(1) sets the OpenMP build's ICV on the importing
    # thread too: OMP_NUM_THREADS=3 must still read 3 after `import dsv3`
    if dsv3.build_info()["blas_source"] != "system" or "openmp" not in present_variants():
        pytest.skip("needs Debian's OpenMP OpenBLAS build")
    r = child(OMP_ICV_AT_IMPORT, {"LD_LIBRARY_PATH": VARIANTS["openmp"], "OMP_NUM_THREADS": "3"})
    assert r == {"variant": "openmp", "icv": 3}
