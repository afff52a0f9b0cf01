"""Decode-shaped linears over resident weights (kernels/wlinear.h through dsv3._core.wlinear):
y[R, O] = x[R, K] W^T for R = 1..4 with W stored as fp32, bf16 or FP8 E4M3 (128x128 block
scales), beside the peer torch.nn.functional.linear with fp32 and bf16 weights on the same
threads. Each pair (dsv3 format, torch) is timed alternately (common.timeit_paired).

    python bench/bench_decode.py [--threads 2] [--quick] [--no-lm-head] [--rows 1,2,4]

Batch-1 decode reads every weight byte once: GB/s = resident weight bytes / time, printed with
its fraction of the measured read bandwidth (a multi-threaded torch sum over 512 MiB: the same
one-pass read stream, no writes; the numpy copy of common.memory_bandwidth, read + write, is
printed as well). Shapes: DeepSeek-V2-Lite (attention / dense MLP / expert / lm_head) and
Config.medium(). Medium's weights are a few MiB and stay in cache, so they can exceed the
DRAM figure. On a shared machine every number is indicative only. `--rows 64,512` times the
prefill path instead (R > 16; bf16 R > 64: dequantized panels in register tiles,
kernels/wlinear_tier_prefill.inc) beside the same torch peers; its GB/s column is then weight
bytes per time, not a bandwidth.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import (machine_line, memory_bandwidth, print_table, set_threads, timeit,  # noqa: E402
                    timeit_paired)

import dsv3  # noqa: E402
from dsv3 import _core  # noqa: E402


def shapes(quick: bool, lm_head: bool):
    lite = dsv3.Config.deepseek_v2_lite()
    med = dsv3.Config.medium()
    D, F, E = lite.hidden_size, lite.intermediate_size, lite.moe_intermediate_size
    out = [("lite attn o_proj", D, D), ("lite mlp up", F, D), ("lite mlp down", D, F),
           ("lite expert gate", E, D), ("lite expert down", D, E)]
    if lm_head:
        out.append(("lite lm_head", lite.vocab_size, D))
    md, mf, me = med.hidden_size, med.intermediate_size, med.moe_intermediate_size
    out += [("medium mlp up", mf, md), ("medium mlp down", md, mf),
            ("medium expert gate", me, md), ("medium expert down", md, me)]
    return out[:3] + out[-1:] if quick else out


def weights(rng, O, K):
    """fp32 [O,K], its bf16 bits, E4M3 codes + 128x128 scale_inv (a random-code stand-in:
    decode speed does not depend on the values)."""
    w = rng.standard_normal((O, K), dtype=np.float32)
    bits = (w.view(np.uint32) >> 16).astype(np.uint16)
    codes = rng.integers(0, 256, size=(O, K), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x38
    sinv = np.full((-(-O // 128), -(-K // 128)), 1e-2, np.float32)
    return w, bits, codes, sinv


def read_bandwidth(threads: int) -> float:
    """GB/s of a one-pass read of 512 MiB (torch.sum on `threads` threads), or 0 without torch."""
    try:
        import torch
    except ImportError:
        return 0.0
    torch.set_num_threads(threads)
    a = torch.ones(128 << 20)
    t = timeit(lambda: a.sum(), min_time=1.0)
    return a.numel() * 4 / t / 1e9


def bench(name, O, K, rows, reps, read_bw):
    import torch
    import torch.nn.functional as tf
    rng = np.random.default_rng(0)
    w, bits, codes, sinv = weights(rng, O, K)
    tw32 = torch.from_numpy(w)
    tw16 = tw32.bfloat16()
    fmts = {"fp32": (w, None, w.nbytes), "bf16": (bits, None, bits.nbytes),
            "fp8": (codes, sinv, codes.nbytes + sinv.nbytes)}
    out = []
    for R in rows:
        x = rng.standard_normal((R, K), dtype=np.float32)
        tx32 = torch.from_numpy(x)
        tx16 = tx32.bfloat16()
        peers = {"fp32": lambda: tf.linear(tx32, tw32), "bf16": lambda: tf.linear(tx16, tw16),
                 "fp8": lambda: tf.linear(tx16, tw16)}  # torch has no fp8 CPU linear: bf16
        row = [f"{name} {O}x{K}", R]
        for fmt, (data, s, nbytes) in fmts.items():
            ours, peer = timeit_paired(lambda: _core.wlinear(x, fmt, data, s), peers[fmt],
                                       reps=reps)
            gbs = nbytes / ours / 1e9
            peer_bytes = w.nbytes if fmt == "fp32" else bits.nbytes
            row += [f"{gbs:.1f}" + (f" ({gbs / read_bw:.0%})" if read_bw else ""),
                    f"{peer_bytes / peer / 1e9:.1f}", f"{peer / ours:.2f}x"]
        out.append(row)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="four shapes, few repetitions")
    p.add_argument("--no-lm-head", action="store_true", help="skip the 102400x2048 lm_head")
    p.add_argument("--rows", default="1,2,3,4", help="batch sizes R (comma-separated)")
    a = p.parse_args(argv)
    set_threads(a.threads)
    rows = [int(r) for r in a.rows.split(",")]
    reps = 3 if a.quick else 9
    print(machine_line())
    print(f"wlinear tier: {_core.wlinear_tier()} ({dsv3.build_info()['wlinear_tier_reason']}); "
          f"{a.threads} threads")
    read_bw = read_bandwidth(a.threads)
    copy_bw = memory_bandwidth(128 if a.quick else 512)
    print(f"read bandwidth (torch sum, {a.threads} threads): {read_bw:.1f} GB/s; "
          f"numpy copy (1 thread, read + write): {copy_bw:.1f} GB/s")
    table = []
    for name, O, K in shapes(a.quick, not a.no_lm_head and not a.quick):
        table += bench(name, O, K, rows, reps, read_bw)
    print_table("GB/s of resident weight bytes (fraction of read bandwidth); torch peer GB/s of "
                "its own weight bytes (fp32 / bf16; fp8 column: torch bf16); time ratio "
                "torch / dsv3",
                ["shape O x K", "R", "dsv3 fp32", "torch fp32", "vs torch", "dsv3 bf16",
                 "torch bf16", "vs torch", "dsv3 fp8", "torch bf16", "vs torch"], table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
