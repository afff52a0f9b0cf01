"""Resident loading of a checkpoint (dsv3.resident): load time, anonymous memory, decode speed
per weight format.

    python bench/bench_load.py CKPT [--weights auto,fp8,bf16,fp32] [--tokens N] [--threads N]
    python bench/bench_load.py --make [--model moonlight_16b_a3b] [--layers 2]   (a synthetic
                                       checkpoint from make_checkpoint.py, in a temporary dir)

For each format: seconds to build the model (Model.from_pretrained(weights=...)), the growth
of RssAnon (anonymous memory: what a memory-mapped load avoids) against the plan's mapped /
anonymous bytes, and greedy decode tokens/s (a memory-bound GEMV per projection). A format
whose plan does not fit the available memory is skipped with its refusal. Timings on a shared
machine are indicative.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dsv3  # noqa: E402
from common import machine_line, print_table, set_threads  # noqa: E402
from dsv3 import _memory, resident  # noqa: E402


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def run(ckpt: str, fmt: str, tokens: int):
    plan = resident.plan(*resident.inspect(ckpt), None if fmt == "auto" else fmt)
    before, t0 = rss_anon(), time.perf_counter()
    try:
        m = dsv3.Model.from_pretrained(ckpt, weights=fmt)
    except _memory.MemoryBudgetError as e:
        return [fmt, "refused", str(e)[:60], "", "", ""]
    load = time.perf_counter() - t0
    grown = rss_anon() - before
    prompt = np.array([1, 2, 3])
    m.generate(prompt, max_new_tokens=1)  # warm the mapped pages
    out = m.generate(prompt, max_new_tokens=tokens, eos_token_id=None)
    return [f"{fmt} ({plan.weights})", f"{load:.2f}", f"{grown / 2**20:.0f}",
            f"{plan.mapped_bytes / 2**20:.0f}", f"{plan.anonymous_bytes / 2**20:.0f}",
            f"{out.stats['tokens_per_second']:.1f}"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", nargs="?", default=None)
    p.add_argument("--make", action="store_true", help="write a synthetic checkpoint first")
    p.add_argument("--model", default="moonlight_16b_a3b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--weights", default="auto,fp8,bf16,fp32")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        set_threads(a.threads)
    tmp = None
    ckpt = a.checkpoint
    if a.make or ckpt is None:
        import make_checkpoint
        tmp = tempfile.mkdtemp(prefix="dsv3-bench-load-")
        ckpt = os.path.join(tmp, "ck")
        make_checkpoint.write(ckpt, make_checkpoint.config(a.model, a.layers, a.tiny), "fp8",
                              4 << 30)
    try:
        print(machine_line())
        rows = [run(ckpt, f, a.tokens) for f in a.weights.split(",")]
        print_table(f"resident loading of {ckpt}",
                    ["weights", "load s", "RssAnon +MiB", "mapped MiB", "anon MiB", "tok/s"],
                    rows)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
