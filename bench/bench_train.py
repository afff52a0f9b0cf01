"""Training step: tokens/s of a full step (forward, backward, clipping, AdamW, bias update) of
Config.small() in fp32 / bf16 / fp8 vs the PyTorch eager model (dsv3.reference.torch_model) with
torch.optim.AdamW on the same threads; fp8 emulation overhead vs fp32; peak RSS per mode.

Each mode runs in its own child process so its peak RSS is its own.

    python bench/bench_train.py [--threads 2] [--batch 8] [--seq 256] [--steps 3]
                                [--config small|medium]

"torch autocast bf16" runs the PyTorch step under torch.autocast("cpu", dtype=torch.bfloat16)
(the peer of dsv3's bf16/fp8 modes; Config.medium is the GEMM-dominated preset).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import machine_line, print_table, set_threads  # noqa: E402

import dsv3  # noqa: E402

MODES = ("dsv3 fp32", "dsv3 bf16", "dsv3 fp8", "dsv3 fp32 + bf16 moments", "torch fp32",
         "torch autocast bf16")


def run_mode(mode: str, a) -> dict:
    set_threads(a.threads)
    cfg = getattr(dsv3.Config, a.config)()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, cfg.vocab_size, size=(a.batch, a.seq + 1))
               for _ in range(a.steps + 1)]
    model = dsv3.Model(cfg, seed=0)
    losses = []
    if mode.startswith("dsv3"):
        prec = mode.split()[1]
        t = dsv3.Trainer(model, dsv3.TrainConfig(
            lr=1e-3, schedule="constant", precision=prec, batch_size=a.batch, seq_len=a.seq,
            moment_dtype="bfloat16" if "moments" in mode else "float32"))
        step = lambda b: t.step(b)["loss"]  # noqa: E731
    else:
        import torch
        from dsv3.reference.torch_model import TorchModel
        tm = TorchModel(cfg, model.state_dict())
        params = [(n, p) for n, p in tm.p.items() if p.requires_grad]
        opt = torch.optim.AdamW(
            [{"params": [p for _, p in params if p.ndim == 2], "weight_decay": 0.1},
             {"params": [p for _, p in params if p.ndim != 2], "weight_decay": 0.0}],
            lr=1e-3, betas=(0.9, 0.95), eps=1e-8)

        autocast = "autocast" in mode

        def step(b):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = tm.loss(torch.from_numpy(b), alpha=cfg.seq_aux_loss_alpha)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
            opt.step()
            return float(out["loss"])
    losses.append(step(batches[0]))  # warm-up
    times, cpu = [], []
    for b in batches[1:]:
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step(b))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    sec = float(np.median(times))
    return {"mode": mode, "sec": sec, "cpu": float(np.median(cpu)), "tok_s": a.batch * a.seq / sec, "losses": losses,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode (median)")
    p.add_argument("--config", default="small", choices=("small", "medium"))
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma-separated subset of: " + ", ".join(MODES))
    p.add_argument("--repeat", type=int, default=1,
                   help="run the modes this many times, interleaved (the machine is shared: "
                        "each row is the best of the repeats)")
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.mode:
        print(json.dumps(run_mode(a.mode, a)))
        return 0
    print(machine_line())
    res = {}
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    for mode in [m for _ in range(a.repeat) for m in modes]:
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--threads",
               str(a.threads), "--batch", str(a.batch), "--seq", str(a.seq), "--steps",
               str(a.steps), "--config", a.config]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if out.returncode:
            print(f"{mode}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {mode}: {r['sec'] * 1e3:.0f} ms/step (CPU time {r['cpu'] * 1e3:.0f} ms: "
              f"{r['cpu'] / r['sec']:.2f} cores busy)", flush=True)
        if mode not in res or r["sec"] < res[mode]["sec"]:
            res[mode] = r
    base = res.get("dsv3 fp32")
    peer = res.get("torch fp32")
    rows = []
    for mode, r in res.items():
        rows.append((mode, f"{r['sec'] * 1e3:.0f}", f"{r['tok_s']:.0f}",
                     f"{r['tok_s'] / peer['tok_s']:.2f}x" if peer else "-",
                     f"{r['sec'] / base['sec']:.2f}x" if base else "-",
                     f"{r['rss_mb']:.0f}", f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}"))
    print_table(f"Training step, Config.{a.config}(), batch {a.batch} x seq {a.seq}, {a.threads} "
                f"threads (median of {a.steps} steps after 1 warm-up; best of {a.repeat} runs)",
                ["mode", "ms/step", "tokens/s", "vs torch", "time vs dsv3 fp32",
                 "peak RSS MB", "loss first -> last"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
