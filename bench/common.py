"""Shared benchmark helpers: timing, machine peaks (sgemm, memory bandwidth), table printing."""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, List, Sequence

import numpy as np


def timeit(fn: Callable[[], object], min_time: float = 0.3, min_reps: int = 3,
           warmup: int = 1) -> float:
    """Median seconds per call after ``warmup`` warm-up calls."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def timeit_paired(a: Callable[[], object], b: Callable[[], object], reps: int = 9,
                  warmup: int = 3) -> tuple:
    """Median seconds per call of a and of b, timed alternately (a, b, b, a, a, b, ...: each
    goes first equally often) after ``warmup`` calls of each, so drift in the machine's speed
    (a shared VM) hits both alike."""
    for _ in range(warmup):
        a()
        b()
    ta: List[float] = []
    tb: List[float] = []
    for i in range(reps):
        order = ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))
        for fn, out in order:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def set_threads(n: int) -> None:
    import dsv3
    dsv3.set_num_threads(n)
    try:
        import torch
        torch.set_num_threads(n)
    except ImportError:
        pass


def sgemm_peak(n: int = 2048) -> float:
    """GFLOP/s of the OpenBLAS sgemm dsv3 links, through dsv3.ops.linear_backward on n x n x n
    (its dx and dw are two sgemm products; the forward, ops.linear, runs wlinear's register
    tiles on the vector tiers since 6d77e2c)."""
    from dsv3 import ops
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    t = timeit(lambda: ops.linear_backward(a, a, a), min_time=1.0)
    return 4 * n ** 3 / t / 1e9


def memory_bandwidth(mb: int = 512, threads: int = 1) -> float:
    """GB/s of a large numpy copy (read + write counted); ``threads`` > 1 copies that many
    slices at once from Python threads (np.copyto releases the GIL), as a decode step's
    threads stream their weights."""
    src = np.ones(mb * (1 << 20) // 4, dtype=np.float32)
    dst = np.empty_like(src)
    if threads <= 1:
        t = timeit(lambda: np.copyto(dst, src), min_time=1.0)
        return 2 * src.nbytes / t / 1e9
    from concurrent.futures import ThreadPoolExecutor
    cuts = np.linspace(0, src.size, threads + 1).astype(int)
    parts = [(dst[a:b], src[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    with ThreadPoolExecutor(threads) as ex:
        t = timeit(lambda: list(ex.map(lambda p: np.copyto(*p), parts)), min_time=1.0)
    return 2 * src.nbytes / t / 1e9


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in header]] + [[c if isinstance(c, str) else f"{c:.3g}" if
                                           isinstance(c, float) else str(c) for c in r]
                                          for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n## {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")


def machine_line() -> str:
    import platform
    import dsv3
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}; "
            f"{dsv3.build_info()['blas']}")
