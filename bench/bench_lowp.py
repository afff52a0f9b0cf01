"""Low-precision GEMMs: dsv3.ops.bf16_matmul and the exact-mode dsv3.fp8.gemm (block-scaled,
1x128 / 128x128) vs dsv3's fp32 linear (ops.linear: register tiles on the vector tiers) and
torch.matmul on bf16 tensors, at 4096x2048x2048 and at Config.medium()'s MoE expert shapes;
each tier (the active one, then the fp32 tier forced with DSV3_ISA=avx2 in a child process).

    python bench/bench_lowp.py [--threads 2] [--quick] [--no-fallback]

Shapes are M x K x N with C[M,N] = A[M,K] B[K,N] (for fp8: A codes [M,K], B codes [N,K]).
Times are medians of at least 7 calls and 1.5 s after 3 warm-ups (on this project's VMs a
second of calls at half speed now and then is common: fewer calls let it set the median); the
machine may be shared, so they are indicative. The
training-step comparison (fp32 / bf16 / fp8 vs PyTorch autocast bf16, Config.small and
Config.medium) is bench/bench_train.py --config medium.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import machine_line, print_table, set_threads, timeit  # noqa: E402

import dsv3  # noqa: E402
from dsv3 import fp8, ops  # noqa: E402


def shapes(quick: bool):
    cfg = dsv3.Config.medium()
    D, F = cfg.hidden_size, cfg.moe_intermediate_size
    # one routed expert's share of a 4096-token batch: T * top-k / experts rows
    rows = 4096 * cfg.num_experts_per_tok // cfg.n_routed_experts
    out = [("square-ish", 4096, 2048, 2048), ("expert gate/up", rows, D, F),
           ("expert down", rows, F, D), ("expert dW gate", F, rows, D)]
    return out[1:] if quick else out


def timed(fn):
    return timeit(fn, min_time=1.5, min_reps=7, warmup=3)


def bench_shape(name, M, K, N, with_torch):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)  # linear weight [out, in]
    b = np.ascontiguousarray(w.T)
    qa, sa = fp8.quantize(a, "e4m3", (1, 128))
    qw, sw = fp8.quantize(w, "e4m3", (128, 128))
    flop = 2.0 * M * N * K
    r = {"shape": f"{name} {M}x{K}x{N}",
         "fp32": timed(lambda: ops.linear(a, w)),
         "bf16": timed(lambda: ops.bf16_matmul(a, b)),
         "fp8": timed(lambda: fp8.gemm(qa, sa, qw, sw))}
    if with_torch:
        try:
            import torch
            ta, tb = torch.from_numpy(a).bfloat16(), torch.from_numpy(b).bfloat16()
            r["torch"] = timed(lambda: torch.matmul(ta, tb))
        except ImportError:
            pass
    r["gflop"] = flop / 1e9
    return r


def run(a) -> list:
    set_threads(a.threads)
    return [bench_shape(*s, with_torch=True) for s in shapes(a.quick)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="expert shapes only")
    p.add_argument("--no-fallback", action="store_true", help="skip the forced fp32 tier")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(run(a)))
        return 0
    print(machine_line())
    tiers = [None] if a.no_fallback else [None, "avx2"]
    for isa in tiers:
        env = dict(os.environ)
        env.pop("DSV3_ISA", None)
        if isa:
            env["DSV3_ISA"] = isa
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--threads", str(a.threads)]
        if a.quick:
            cmd.append("--quick")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            print(out.stderr[-2000:])
            return 1
        info = json.loads(subprocess.run(
            [sys.executable, "-c", "import json, dsv3; print(json.dumps(dsv3.build_info()['lowp']))"],
            capture_output=True, text=True, env=env).stdout)
        rows = []
        for r in json.loads(out.stdout.strip().splitlines()[-1]):
            g = r["gflop"]
            t = r.get("torch")
            rows.append((r["shape"], f"{r['fp32'] * 1e3:.1f} ({g / r['fp32']:.0f})",
                         f"{r['bf16'] * 1e3:.1f} ({g / r['bf16']:.0f})",
                         f"{r['fp8'] * 1e3:.1f} ({g / r['fp8']:.0f})",
                         f"{t * 1e3:.1f} ({g / t:.0f})" if t else "-",
                         f"{r['fp32'] / r['bf16']:.2f}x", f"{r['fp32'] / r['fp8']:.2f}x",
                         f"{t / r['bf16']:.2f}x" if t else "-"))
        print_table(f"tier {info['tier']} ({info['reason']}), {a.threads} threads: ms (GFLOP/s)",
                    ["shape", "dsv3 fp32 linear", "dsv3 bf16", "dsv3 fp8 exact",
                     "torch bf16 matmul", "bf16 vs fp32", "fp8 vs fp32", "bf16 vs torch"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
