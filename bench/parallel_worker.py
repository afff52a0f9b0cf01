"""One rank of bench_parallel.py (run under mpirun, or alone for the single-process row):
times Trainer steps on fixed global batches and writes this rank's figures as JSON."""
import argparse
import json
import os
import time

import numpy as np

import dsv3

ap = argparse.ArgumentParser()
ap.add_argument("--config", default="small")
ap.add_argument("--layout", default="none")
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--seq", type=int, default=128)
ap.add_argument("--steps", type=int, default=4)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--fp8-dispatch", action="store_true")
ap.add_argument("--out", required=True)
a = ap.parse_args()

dsv3.set_num_threads(a.threads)
par = None if a.layout == "none" else dsv3.distributed.init(a.layout, a.fp8_dispatch)
cfg = getattr(dsv3.Config, a.config)()
# an EP rank builds only its routed experts (never the whole model)
model = dsv3.Model(cfg, seed=0, expert_shard=par.expert_shard if par else None)
tr = dsv3.Trainer(model,
                  dsv3.TrainConfig(batch_size=a.batch, seq_len=a.seq, schedule="constant",
                                   warmup_steps=0), parallel=par)
rng = np.random.default_rng(0)
rows = []
for s in range(a.steps + 1):  # the first step warms up (page faults, first-touch)
    batch = rng.integers(0, cfg.vocab_size, size=(a.batch, a.seq + 1))
    t0 = time.perf_counter()
    st = tr.step(batch)
    dt = time.perf_counter() - t0
    if s:
        rows.append({"seconds": dt, "split": st.get("time_split"),
                     "routed_rows": int(np.asarray(st["expert_load"]).sum())})
rank = par.rank if par else 0


def status_bytes(key):
    """/proc/self/status's VmRSS / VmHWM in bytes (0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


m, _ = tr._t.moments()  # this rank's slab layout (padding included)
memory = {"parameters": tr.model.num_local_parameters(),
          # the training state: fp32 weights and gradients over the slab, the AdamW moments
          "state_bytes": 2 * 4 * m.size + 2 * m.nbytes,
          "rss_bytes": status_bytes("VmRSS"), "peak_rss_bytes": status_bytes("VmHWM")}
with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
    json.dump({"steps": rows, "ep": tr.expert_parallel_stats(), "memory": memory,
               "hidden": cfg.hidden_size}, f)
