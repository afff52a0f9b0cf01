"""The OpenBLAS builds side by side: Debian's three variants (libopenblas0-openmp, -pthread,
-serial), each loaded into a dsv3 built against the system OpenBLAS through LD_LIBRARY_PATH in
a child process, and optionally a dsv3 built against PyPI's scipy-openblas32 (its own
PYTHONPATH). Per build: sgemm GFLOP/s through dsv3.ops.linear_backward (its two BLAS
products), the Config.small() training step (batch 8 x 256) and batch-1 decoding, and whether
the results are bit-identical to the first build's (sgemm outputs hashed, first loss, first
decoded tokens).

    python bench/bench_blas.py [--libdir /usr/lib/x86_64-linux-gnu[,DIR...]] [--threads 0]
        [--pypi PYTHONPATH_OF_A_PYPI_BUILD] [--reps 3] [--rounds 2] [--max-others 0.05]

Variants whose directory (LIBDIR/openblas-openmp, -pthread, -serial) is missing are skipped;
`apt-get download libopenblas0-pthread && dpkg -x ...` gives one without installing it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import machine_line, print_table  # noqa: E402
from workloads import SGEMM_SHAPES, run_child  # noqa: E402


def builds(a):
    base = dict(os.environ)
    base.pop("LD_LIBRARY_PATH", None)
    for v in ("openmp", "pthread", "serial"):
        for libdir in a.libdir.split(","):
            d = os.path.join(libdir, f"openblas-{v}")
            if os.path.exists(os.path.join(d, "libopenblas.so.0")):
                yield f"system {v}", dict(base, LD_LIBRARY_PATH=d)
                break
    if a.pypi:
        yield "pypi scipy-openblas32", dict(base, PYTHONPATH=a.pypi)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--libdir", default="/usr/lib/x86_64-linux-gnu",
                   help="comma list of directories holding openblas-{openmp,pthread,serial}/")
    p.add_argument("--pypi", default="", help="PYTHONPATH of a dsv3 built with DSV3_BLAS=pypi")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="rounds over all builds (median)")
    p.add_argument("--max-others", type=float, default=0.05,
                   help="repeat a run (up to 8 times) while other processes took more than "
                        "this share of the CPU, e.g. 0.05 on a shared machine")
    a = p.parse_args(argv)
    print(machine_line())
    todo = list(builds(a))
    res = {}
    for r in range(a.rounds):  # builds alternate within each round, order reversed every round
        for name, env in (todo if r % 2 == 0 else todo[::-1]):
            for w in ("sgemm", "train", "decode"):
                res.setdefault((name, w), []).append(
                    run_child("dsv3", w, a.threads, a.reps, env, max_others=a.max_others))
    shapes = [f"{m}x{k}x{n}" for m, k, n in SGEMM_SHAPES]
    ref = base = None
    rows = []
    for name, _ in todo:
        g = res[(name, "sgemm")]
        tr, de = res[(name, "train")], res[(name, "decode")]
        bits = (g[0]["hash"], tr[0]["loss0"], tuple(de[0]["tokens"]))
        ref = ref or bits
        step = statistics.median(x["sec"] for x in tr)
        tok = statistics.median(x["tok_s"] for x in de)
        base = base or (step, tok)  # the first build's: the ratios below are to it
        same = ["yes" if x == y else "NO" for x, y in zip(bits, ref)]
        others = max(x["others"] for x in g + tr + de)
        rows.append([name, g[0]["blas"], g[0]["threads"], f"{others:.2f}"] +
                    [f"{statistics.median(x['gflops'][s] for x in g):.0f}" for s in shapes] +
                    [f"{step * 1e3:.0f}", f"{base[0] / step:.2f}x", f"{tok:.0f}",
                     f"{tok / base[1]:.2f}x", "/".join(same)])
    print_table("OpenBLAS builds: sgemm GFLOP/s (M x K x N), training step ms, decode tokens/s "
                f"(speed ratios to the first build, {todo[0][0]})",
                ["build", "loaded", "threads", "max CPU share of others"] + shapes +
                ["train step ms", "train speed vs first", "decode tok/s", "decode vs first",
                 "identical sgemm/loss/tokens"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
