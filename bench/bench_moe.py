"""MoE layer forward+backward: dsv3 vs the FLOPs of the activated experts at the measured
fp32 linear rate, and vs the same layer in PyTorch (dsv3.reference.torch_moe) on the same threads.

    PYTHONPATH=python python bench/bench_moe.py [--tokens 4096] [--threads 2] [--repeat 5]

Default shape: hidden 512, 64 routed experts top-6 in 8 groups (4 kept), 1 shared
expert, moe_intermediate 256, 4096 tokens, noaux_tc sigmoid gate. Times are the median of
--repeat runs after a warm-up. dsv3's forward+backward is one moe_backward call, which runs
the forward (to rebuild the saved activations) and then the backward; dsv3 and PyTorch runs
are interleaved. The expert FLOPs count
the three GEMMs of every activated routed expert row and of the shared expert (forward), times
3 for forward+backward; the gate GEMM is counted as routing work. The fp32 linear rate is the best
of dsv3.ops.linear on the shapes the experts use (average expert block and the shared
expert) right before and after the layer runs; the yardstick is the larger of the rate on
the given threads and threads x the single-thread rate (so the overhead printed is an upper
bound). That rate is the fp32 forward's (dsv3's register tiles); the layer's backward
products run on sgemm, slower where OpenBLAS runs its AVX2 kernels (OPENBLAS_CORETYPE=Haswell),
so the overhead is measured against a high bar. Timings on a shared machine are indicative.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import dsv3  # noqa: E402


def timeit(fn, repeat):
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts)


def linear_rate(D, F, rows, repeat, threads):
    """Best GFLOP/s of dsv3.ops.linear (x[M,D] @ W[F,D]^T) over the given M, on `threads`."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((F, D)).astype(np.float32)
    best = 0.0
    old = dsv3.get_num_threads()
    dsv3.set_num_threads(threads)
    try:
        for M in rows:
            a = rng.standard_normal((M, D)).astype(np.float32)
            n = max(3, 20_000 // M)
            med, _ = timeit(lambda: [dsv3.ops.linear(a, w) for _ in range(n)], repeat)
            best = max(best, 2 * M * D * F * n / med / 1e9)
    finally:
        dsv3.set_num_threads(old)
    return best


def interleaved(fns, repeat):
    """Median and min time of each fn, runs interleaved so that load changes hit all alike."""
    for fn in fns.values():
        fn()
    ts = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    return {k: (statistics.median(v), min(v)) for k, v in ts.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=6)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--topk-group", type=int, default=4)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--shared", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)

    T, D, E, K, F = args.tokens, args.hidden, args.experts, args.topk, args.inter
    cfg = dsv3.Config.tiny().replace(
        hidden_size=D, n_routed_experts=E, num_experts_per_tok=K, n_group=args.groups,
        topk_group=args.topk_group, n_shared_experts=args.shared, moe_intermediate_size=F,
        topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
        routed_scaling_factor=2.5)
    dsv3.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    params = dsv3.ops.init_moe_params(cfg, seed=0, std=0.02)
    params["gate.weight"] = (rng.standard_normal((E, D)) / np.sqrt(D)).astype(np.float32)
    params["gate.e_score_correction_bias"] = (rng.standard_normal(E) * 0.01).astype(np.float32)
    x = rng.standard_normal((T, D)).astype(np.float32)
    dy = rng.standard_normal((T, D)).astype(np.float32)
    S = args.shared * F

    print(f"# MoE layer: T={T} D={D} E={E} top-{K} groups {args.groups}/{args.topk_group} "
          f"shared {args.shared}x{F} F={F}; threads {args.threads}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"# BLAS: {dsv3.build_info()['blas']}")
    rows = (max(1, T * K // E), T)
    nt = args.threads
    rate_n0, rate_10 = (linear_rate(D, F, rows, args.repeat, nt),
                        linear_rate(D, F, rows, args.repeat, 1))

    fwd_flops = 2 * 3 * D * F * T * K + 2 * 3 * D * S * T
    fb_flops = 3 * fwd_flops
    y, aux = dsv3.ops.moe_forward(x, params, cfg)
    fns = {
        "gate": lambda: dsv3.ops.moe_gate(x, params["gate.weight"],
                                          params["gate.e_score_correction_bias"], cfg),
        "dsv3 fwd": lambda: dsv3.ops.moe_forward(x, params, cfg),
        "dsv3 f+b": lambda: dsv3.ops.moe_backward(dy, x, params, cfg),
    }
    if not args.no_torch:
        import torch
        from dsv3.reference.torch_moe import TorchMoE
        torch.set_num_threads(nt)
        layer = TorchMoE(params, cfg)
        xt = torch.tensor(x)
        dyt = torch.tensor(dy)
        with torch.no_grad():
            yt = layer(xt).numpy()
        ok = np.all(layer.route(xt)[0].numpy() == aux["topk_idx"], axis=-1)
        diff = np.max(np.abs(yt[ok] - y[ok])) / np.max(np.abs(y))

        def torch_fwd():
            with torch.no_grad():
                layer(xt)

        def torch_fb():
            layer.zero_grad(set_to_none=True)
            (layer(xt) * dyt).sum().backward()

        fns["torch fwd"] = torch_fwd
        fns["torch f+b"] = torch_fb
    t = interleaved(fns, args.repeat)
    rate_n1, rate_11 = (linear_rate(D, F, rows, args.repeat, nt),
                        linear_rate(D, F, rows, args.repeat, 1))
    rate_n, rate_1 = max(rate_n0, rate_n1), max(rate_10, rate_11)
    rate = max(rate_n, nt * rate_1)
    t_gate, t_fwd, (t_fb, t_fb_min) = t["gate"][0], t["dsv3 fwd"][0], t["dsv3 f+b"]
    res = {"dsv3": (t_fwd, t_fb)}
    if "torch fwd" in t:
        res["torch"] = (t["torch fwd"][0], t["torch f+b"][0])

    ideal_fwd, ideal_fb = fwd_flops / rate / 1e9, fb_flops / rate / 1e9
    print(f"# fp32 linear rate (best of dsv3.ops.linear on M in {rows}, N={F}, K={D}, before and "
          f"after): {rate_n:.1f} GFLOP/s on {nt} threads, {rate_1:.1f} on 1 thread; the "
          f"yardstick is the larger of {rate_n:.1f} and {nt} x {rate_1:.1f} = {rate:.1f} GFLOP/s")
    print(f"# activated-expert FLOPs: forward {fwd_flops / 1e9:.2f} G, "
          f"forward+backward {fb_flops / 1e9:.2f} G; MaxVio of this routing "
          f"{aux['max_violation']:.2f}")
    print()
    print(f"| {'impl':<26} | {'fwd ms':>8} | {'fwd+bwd ms':>10} | {'GFLOP/s (f+b)':>13} | "
          f"{'time / ideal':>12} | {'torch / impl':>12} |")
    print(f"|{'-' * 28}|{'-' * 10}:|{'-' * 11}:|{'-' * 14}:|{'-' * 13}:|{'-' * 13}:|")
    print(f"| {'expert GEMMs at fp32 rate':<26} | {ideal_fwd * 1e3:8.1f} | {ideal_fb * 1e3:10.1f} | "
          f"{rate:13.1f} | {1.0:12.2f} | {'':>12} |")
    for name, (tf, tb) in res.items():
        vs = res["torch"][1] / tb if "torch" in res else float("nan")
        print(f"| {name:<26} | {tf * 1e3:8.1f} | {tb * 1e3:10.1f} | {fb_flops / tb / 1e9:13.1f} | "
              f"{tb / ideal_fb:12.2f} | {vs:12.2f} |")
    print()
    over = t_fb / ideal_fb - 1
    print(f"dsv3 overhead beyond the expert GEMMs at the fp32 linear rate (routing + dispatch + combine "
          f"+ everything else), forward+backward: {over * 100:+.1f}% (target <= 30%); "
          f"forward only: {(t_fwd / ideal_fwd - 1) * 100:+.1f}%")
    print(f"gate alone (logits GEMM + sigmoid + group/top-k routing): {t_gate * 1e3:.1f} ms "
          f"= {t_gate / ideal_fwd * 100:.1f}% of the forward expert GEMM time")
    print(f"fastest dsv3 forward+backward run: {t_fb_min * 1e3:.1f} ms")
    if "torch" in res:
        print(f"dsv3 vs PyTorch forward+backward: {res['torch'][1] / t_fb:.2f}x (target >= 2x); "
              f"forward: {res['torch'][0] / t_fwd:.2f}x. Max |y_torch - y_dsv3| / max|y| = "
              f"{diff:.1e} on the {ok.mean() * 100:.0f}% of tokens routed identically")
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
