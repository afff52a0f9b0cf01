"""FP8 emulation benchmarks: accumulation precision, quantization throughput, GEMM speed.

    python bench/bench_fp8.py [--quick] [--threads N] [--sections acc,quant,gemm]
    python -m dsv3 bench fp8 [...same options]

(a) acc   max / mean relative error of dsv3.fp8.gemm vs the float64 product of the
          dequantized operands, K = 256 .. 16384: fp32 accumulation, a 14-bit accumulator
          over all of K (no promotion), and a 14-bit accumulator promoted every 128. Per-tensor
          scales, so the three columns multiply the same fp8 numbers. Relative error of an
          element = |C - C_ref| / rms(C_ref) (an elementwise |C_ref| is near 0 for some
          elements of a zero-mean product). Two inputs: standard normal (zero-mean products,
          the sum is a random walk) and uniform(0, 1) (all products positive, the sum grows
          linearly and truncation toward zero biases every add the same way).
(b) quant quantize / dequantize GB/s (bytes read + written) vs a numpy copy into a
          preallocated array (the memory bandwidth the cores can use) and vs x.copy(), which
          like every dsv3 call also pays for first touching a fresh output array; torch's
          cast and a torch-ops 1x128 quantization as peers.
(c) gemm  fp8.gemm GFLOP/s (fp32-accumulation mode, which includes dequantizing both
          operands) vs fp32: numpy float32 matmul (numpy's OpenBLAS), dsv3.ops.linear (the
          engine's fp32 linear: register tiles on the vector tiers, sgemm on the scalar
          one) and torch float32 matmul; torch._scaled_mm (float8 with
          per-tensor scales) where this torch supports it on CPU. The limited-accumulation
          mode is reported as is. Same thread count for all.
Timings are the best of several runs; on a shared machine they are indicative.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, List, Optional

import numpy as np

import dsv3
from dsv3 import fp8


def best_time(fn: Callable[[], object], repeat: int = 5, min_time: float = 0.2) -> float:
    fn()  # warm-up
    times: List[float] = []
    t_start = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - t_start < min_time and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def try_torch():
    try:
        import torch
        return torch
    except ImportError:
        return None


def dequant64(codes: np.ndarray, scales: np.ndarray, fmt: str = "e4m3") -> np.ndarray:
    return fp8.decode(codes, fmt).astype(np.float64) * float(scales.reshape(-1)[0])


# ---- (a) accumulation precision -------------------------------------------------------------
def section_acc(args) -> None:
    Ks = [256, 512, 1024, 2048, 4096] + ([] if args.quick else [8192, 16384])
    M = N = 32 if args.quick else 64
    rng = np.random.default_rng(0)
    modes = [("fp32 acc", None, 128), ("14-bit, no promotion", 14, None),
             ("14-bit, promote/128", 14, 128)]
    print(f"\n(a) Accumulation precision: M = N = {M}, e4m3 operands, per-tensor scales; "
          "max / mean of |C - C_ref| / rms(C_ref)")
    for dist in ("normal", "uniform(0,1)"):
        print(f"\n  inputs {dist}")
        head = "  {:>6} | " + " | ".join(["{:>21}"] * len(modes))
        print(head.format("K", *[m[0] for m in modes]))
        print("  " + "-" * (9 + 24 * len(modes)))
        for K in Ks:
            if dist == "normal":
                a, b = rng.standard_normal((M, K)), rng.standard_normal((N, K))
            else:
                a, b = rng.uniform(0, 1, (M, K)), rng.uniform(0, 1, (N, K))
            qa, sa = fp8.quantize(a.astype(np.float32), block=(M, K))
            qb, sb = fp8.quantize(b.astype(np.float32), block=(N, K))
            ref = dequant64(qa, sa) @ dequant64(qb, sb).T
            rms = np.sqrt(np.mean(ref ** 2))
            cells = []
            for _, bits, P in modes:
                C = fp8.gemm(qa, sa, qb, sb, accumulator_bits=bits, promotion_interval=P)
                rel = np.abs(C - ref) / rms
                cells.append(f"{rel.max():9.2e} / {rel.mean():9.2e}")
            print(head.format(K, *cells))


# ---- (b) quantization throughput ------------------------------------------------------------
def section_quant(args) -> None:
    R, C = (2048, 4096) if args.quick else (4096, 7168)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((R, C)).astype(np.float32)
    n = x.size
    dst = np.empty_like(x)
    t_copy = best_time(lambda: np.copyto(dst, x))
    bw = 2 * x.nbytes / t_copy / 1e9
    rows = [("numpy copy (preallocated)", 2 * x.nbytes, t_copy)]
    rows.append(("numpy copy (x.copy())", 2 * x.nbytes, best_time(lambda: x.copy())))
    for block in ((1, 128), (128, 128)):
        codes, scales = fp8.quantize(x, block=block)
        nb = n * 4 + n + scales.nbytes
        rows.append((f"fp8.quantize {block[0]}x{block[1]}", nb,
                     best_time(lambda: fp8.quantize(x, block=block))))
        rows.append((f"fp8.dequantize {block[0]}x{block[1]}", nb,
                     best_time(lambda: fp8.dequantize(codes, scales, block))))
    rows.append(("fp8.encode e4m3 (no scale)", 5 * n, best_time(lambda: fp8.encode(x))))
    rows.append(("fp8.cast bf16", 8 * n, best_time(lambda: fp8.cast(x, "bf16"))))
    torch = try_torch()
    if torch is not None:
        xt = torch.from_numpy(x)
        rows.append(("torch .to(float8_e4m3fn)", 5 * n,
                     best_time(lambda: xt.to(torch.float8_e4m3fn))))

        def torch_quant():  # the 1x128 recipe with torch ops (peer of fp8.quantize)
            v = xt.view(R, C // 128, 128)
            s = v.abs().amax(-1, keepdim=True).clamp_min(1e-4) / 448.0
            return (v / s).to(torch.float8_e4m3fn), s
        rows.append(("torch 1x128 quantize (ops)", 5 * n + n // 32, best_time(torch_quant)))
    print(f"\n(b) Quantization throughput: x float32 ({R}, {C}) = {x.nbytes / 1e6:.0f} MB, "
          f"{dsv3.get_num_threads()} threads; GB/s = (bytes read + written) / time")
    bw_alloc = 2 * x.nbytes / rows[1][2] / 1e9
    print(f"  {'operation':<30} {'ms':>8} {'GB/s':>8} {'vs copy':>8} {'vs x.copy()':>12}")
    for name, nbytes, t in rows:
        gbs = nbytes / t / 1e9
        print(f"  {name:<30} {t * 1e3:8.2f} {gbs:8.2f} {gbs / bw:8.0%} {gbs / bw_alloc:12.0%}")


# ---- (c) GEMM throughput --------------------------------------------------------------------
def section_gemm(args) -> None:
    shapes = [(1024, 1024, 1024), (4096, 2048, 512)]
    rng = np.random.default_rng(2)
    torch = try_torch()
    nt = dsv3.get_num_threads()
    if torch is not None:
        torch.set_num_threads(nt)
    print(f"\n(c) GEMM C[M,N] = A[M,K] @ B[N,K]^T, {nt} threads, GFLOP/s = 2MNK / time "
          "(fp8 rows include dequantizing both operands)")
    print(f"  {'M x N x K':<16} {'implementation':<42} {'ms':>9} {'GFLOP/s':>8} {'vs numpy':>8} "
          f"{'vs dsv3 fp32':>13}")
    for M, N, K in shapes:
        a = rng.standard_normal((M, K)).astype(np.float32)
        b = rng.standard_normal((N, K)).astype(np.float32)
        qa, sa = fp8.quantize(a)
        qb, sb = fp8.quantize(b, block=(128, 128))
        flop = 2.0 * M * N * K
        rows = [("numpy float32 matmul (sgemm)", best_time(lambda: a @ b.T)),
                ("dsv3.ops.linear (fp32 linear)", best_time(lambda: dsv3.ops.linear(a, b)))]
        if torch is not None:
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            rows.append(("torch float32 matmul", best_time(lambda: ta @ tb.T)))
        rows.append(("fp8.gemm 1x128 / 128x128, fp32 acc",
                     best_time(lambda: fp8.gemm(qa, sa, qb, sb))))
        if torch is not None:
            rows += torch_scaled_mm(torch, a, b)
        if not args.quick or M * N * K <= 1 << 30:
            rows.append(("fp8.gemm, 14-bit acc, promote/128",
                         best_time(lambda: fp8.gemm(qa, sa, qb, sb, 14), repeat=2, min_time=0)))
        t_np, t_eng = rows[0][1], rows[1][1]
        for name, t in rows:
            if t is None:
                print(f"  {f'{M}x{N}x{K}':<16} {name}")
                continue
            print(f"  {f'{M}x{N}x{K}':<16} {name:<42} {t * 1e3:9.2f} {flop / t / 1e9:8.1f} "
                  f"{t_np / t:8.0%} {t_eng / t:13.0%}")


def torch_scaled_mm(torch, a: np.ndarray, b: np.ndarray):
    """torch._scaled_mm on CPU with per-tensor float8 scales, if this build supports it. Its
    CPU kernel can be very slow, so one call on a 256-slice estimates the time first and the
    full shape runs only when the estimate is under 5 s."""
    name = "torch._scaled_mm e4m3, per-tensor (peer)"
    if not hasattr(torch, "_scaled_mm"):
        return [(name + " [absent]", None)]

    def prepare(x):
        s = torch.tensor(float(np.abs(x).max()) / 448.0)
        return (torch.from_numpy(x) / s).to(torch.float8_e4m3fn), s

    def run(x, y):
        (fx, sx), (fy, sy) = prepare(x), prepare(y)
        return lambda: torch._scaled_mm(fx, fy.t(), scale_a=sx, scale_b=sy,
                                        out_dtype=torch.float32)
    try:
        probe = run(np.ascontiguousarray(a[:256, :256]), np.ascontiguousarray(b[:256, :256]))
        t0 = time.perf_counter()
        probe()
        t_probe = time.perf_counter() - t0
    except Exception as e:  # not implemented for this device/layout
        return [(name + f" [unsupported: {type(e).__name__}]", None)]
    estimate = t_probe * (a.shape[0] * b.shape[0] * a.shape[1]) / 256 ** 3
    if estimate > 5.0:
        gflops = 2 * 256 ** 3 / t_probe / 1e9
        return [(f"torch._scaled_mm: {gflops:.2f} GFLOP/s at 256^3, skipped", None)]
    fn = run(a, b)
    return [(name, best_time(fn, repeat=2, min_time=0))]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bench_fp8", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    p.add_argument("--threads", type=int, default=None, help="threads (default: dsv3's)")
    p.add_argument("--sections", default="acc,quant,gemm", help="comma list of acc,quant,gemm")
    args = p.parse_args(argv)
    if args.threads:
        dsv3.set_num_threads(args.threads)
    info = dsv3.build_info()
    print(f"dsv3 {info['version']} | {info['simd']} | {info['blas']}")
    sections = {"acc": section_acc, "quant": section_quant, "gemm": section_gemm}
    for s in args.sections.split(","):
        if s not in sections:
            p.error(f"unknown section {s!r}; choose from {sorted(sections)}")
        sections[s](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
