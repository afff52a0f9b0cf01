"""Core ops: dsv3 vs PyTorch CPU on the same shapes and threads (forward, forward+backward).

    python bench/bench_ops.py [--threads 1 2] [--quick]

Prints the machine's sgemm peak (1 and 2 threads) and memory bandwidth, then per op and shape
ms, GFLOP/s or GB/s, the fraction of the machine's peak, and the speed ratio torch/dsv3
(> 1 means dsv3 is faster).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, memory_bandwidth, print_table, set_threads, sgemm_peak, timeit  # noqa: E402

import dsv3  # noqa: E402
from dsv3 import ops  # noqa: E402


def cases(rng, quick):
    import torch
    F = torch.nn.functional
    rows = 4096
    out = []
    for D in (512, 2048):
        x = rng.standard_normal((rows, D)).astype(np.float32)
        w = (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
        dy = rng.standard_normal((rows, D)).astype(np.float32)
        xt, wt, dyt = (torch.from_numpy(a) for a in (x, w, dy))
        nw = rng.standard_normal(D).astype(np.float32)
        nwt = torch.from_numpy(nw)

        def t_linear_fb(xt=xt, wt=wt, dyt=dyt):
            a, b = xt.clone().requires_grad_(), wt.clone().requires_grad_()
            F.linear(a, b).backward(dyt)

        out.append((f"linear {rows}x{D}->{D}", "flop", 2 * rows * D * D,
                    lambda x=x, w=w: ops.linear(x, w), lambda xt=xt, wt=wt: F.linear(xt, wt),
                    6 * rows * D * D,
                    lambda x=x, w=w, dy=dy: (ops.linear(x, w), ops.linear_backward(dy, x, w)),
                    t_linear_fb))

        def t_rms(xt=xt, nwt=nwt):
            return F.rms_norm(xt, (xt.shape[-1],), nwt, 1e-6)

        def t_rms_fb(xt=xt, nwt=nwt, dyt=dyt):
            a, b = xt.clone().requires_grad_(), nwt.clone().requires_grad_()
            F.rms_norm(a, (a.shape[-1],), b, 1e-6).backward(dyt)

        # bytes: forward reads x, writes y; forward+backward adds reading x, dy, writing dx
        out.append((f"rmsnorm {rows}x{D}", "byte", 2 * x.nbytes,
                    lambda x=x, nw=nw: ops.rmsnorm(x, nw), t_rms, 5 * x.nbytes,
                    lambda x=x, nw=nw, dy=dy: (ops.rmsnorm(x, nw), ops.rmsnorm_backward(dy, x, nw)),
                    t_rms_fb))

        u = rng.standard_normal((rows, D)).astype(np.float32)
        ut = torch.from_numpy(u)

        def t_sw_fb(xt=xt, ut=ut, dyt=dyt):
            a, b = xt.clone().requires_grad_(), ut.clone().requires_grad_()
            (F.silu(a) * b).backward(dyt)

        out.append((f"swiglu {rows}x{D}", "byte", 3 * x.nbytes,
                    lambda x=x, u=u: ops.swiglu(x, u), lambda xt=xt, ut=ut: F.silu(xt) * ut,
                    3 * x.nbytes + 5 * x.nbytes,
                    lambda x=x, u=u, dy=dy: (ops.swiglu(x, u), ops.swiglu_backward(dy, x, u)),
                    t_sw_fb))

        ids = rng.integers(0, 32000, size=rows)
        emb = rng.standard_normal((32000, D)).astype(np.float32)
        idst, embt = torch.from_numpy(ids), torch.from_numpy(emb)
        out.append((f"embedding {rows}x{D}", "byte", 2 * rows * D * 4,
                    lambda ids=ids, emb=emb: ops.embedding(ids, emb),
                    lambda idst=idst, embt=embt: F.embedding(idst, embt), None, None, None))

        V = 8 * D
        logits = rng.standard_normal((rows // 4, V)).astype(np.float32)
        tg = rng.integers(0, V, size=rows // 4)
        lt, tt = torch.from_numpy(logits), torch.from_numpy(tg)

        def d_ce(logits=logits, tg=tg):
            _, lse, _ = ops.cross_entropy(logits, tg)
            return ops.cross_entropy_backward(logits, tg, lse)

        def t_ce_fb(lt=lt, tt=tt):
            a = lt.clone().requires_grad_()
            F.cross_entropy(a, tt).backward()

        out.append((f"cross_entropy {rows // 4}x{V}", "byte", logits.nbytes,
                    lambda logits=logits, tg=tg: ops.cross_entropy(logits, tg),
                    lambda lt=lt, tt=tt: F.cross_entropy(lt, tt), 3 * logits.nbytes, d_ce,
                    t_ce_fb))

        H, Dr = 16, 64
        xr = rng.standard_normal((rows, H, Dr)).astype(np.float32)
        pos = np.arange(rows)
        xrt = torch.from_numpy(xr)
        inv = torch.tensor(10000.0 ** (-np.arange(0, Dr, 2) / Dr), dtype=torch.float32)

        def t_rope(xrt=xrt, inv=inv):  # the adjacent-pair rotation written in torch
            ang = torch.arange(xrt.shape[0], dtype=torch.float32)[:, None] * inv
            c, s = ang.cos()[:, None], ang.sin()[:, None]
            x0, x1 = xrt[..., 0::2], xrt[..., 1::2]
            return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2)

        out.append((f"rope {rows}x{H}x{Dr}", "byte", 2 * xr.nbytes,
                    lambda xr=xr, pos=pos: ops.rope(xr, pos), t_rope, None, None, None))
        if quick:
            break

    for (B, T, H, Dh) in ((1, 1024, 8, 64), (4, 512, 8, 128)):
        q = rng.standard_normal((B, T, H, Dh)).astype(np.float32)
        qt = torch.from_numpy(q).transpose(1, 2)  # torch wants (B, H, T, D)
        scale = Dh ** -0.5
        flops = 4 * B * H * T * T * Dh / 2  # causal half of QK^T and PV

        def t_sdpa(qt=qt, scale=scale):
            return F.scaled_dot_product_attention(qt, qt, qt, is_causal=True, scale=scale)

        def d_attn(q=q, scale=scale):
            o, lse = ops.attention(q, q, q, scale)
            return ops.attention_backward(q, q, q, q, o, lse, scale)

        def t_attn_fb(qt=qt, scale=scale):
            a, b, c = (qt.clone().requires_grad_() for _ in range(3))
            o = F.scaled_dot_product_attention(a, b, c, is_causal=True, scale=scale)
            o.backward(o.detach())

        out.append((f"attention B{B} T{T} H{H} D{Dh}", "flop", flops,
                    lambda q=q, scale=scale: ops.attention(q, q, q, scale), t_sdpa,
                    3.5 * flops, d_attn, t_attn_fb))
        if quick:
            break
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--quick", action="store_true", help="one shape per op")
    args = p.parse_args(argv)
    import torch
    print(machine_line())
    print(f"torch {torch.__version__}, dsv3 {dsv3.__version__}")
    peaks = {}
    for n in args.threads:
        set_threads(n)
        peaks[n] = sgemm_peak()
    set_threads(max(args.threads))
    bw = memory_bandwidth()
    print_table("Machine peaks", ["threads", "sgemm GFLOP/s (2048^3)", "copy GB/s"],
                [[n, peaks[n], bw if n == max(args.threads) else "-"] for n in args.threads])
    rng = np.random.default_rng(0)
    for n in args.threads:
        set_threads(n)
        rows = []
        for name, unit, work, f_d, f_t, work_fb, fb_d, fb_t in cases(rng, args.quick):
            for phase, w, fd, ft in (("fwd", work, f_d, f_t), ("fwd+bwd", work_fb, fb_d, fb_t)):
                if fd is None:
                    continue
                td, tt = timeit(fd), timeit(ft)
                rate = w / td / 1e9
                peak = peaks[n] if unit == "flop" else bw
                rows.append([name, phase, f"{td * 1e3:.2f}", f"{tt * 1e3:.2f}",
                             f"{rate:.1f} {'GFLOP/s' if unit == 'flop' else 'GB/s'}",
                             f"{100 * rate / peak:.0f}% of {'sgemm' if unit == 'flop' else 'bw'}",
                             f"{tt / td:.2f}x"])
        print_table(f"{n} thread(s): dsv3 vs torch (ratio = torch time / dsv3 time)",
                    ["op", "pass", "dsv3 ms", "torch ms", "dsv3 rate", "of peak", "speedup"], rows)


if __name__ == "__main__":
    main()
