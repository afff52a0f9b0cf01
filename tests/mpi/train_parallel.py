"""Runs under mpirun (tests/test_distributed.py): a few Trainer steps of a preset config on
fixed random global batches, in the parallel layout given; every rank writes what the test
compares (its losses, grad norms, expert loads, a hash of its weights; rank 0 also the weights
and biases). With --layout none it runs single-process (the reference)."""
import argparse
import hashlib
import json
import os
import sys

import numpy as np

import dsv3

ap = argparse.ArgumentParser()
ap.add_argument("--config", default="tiny")
ap.add_argument("--layout", default="none")
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--seq", type=int, default=16)
ap.add_argument("--grad-accum", type=int, default=1)
ap.add_argument("--precision", default="fp32")
ap.add_argument("--fp8-dispatch", action="store_true")
ap.add_argument("--save", default="")
ap.add_argument("--load", default="")
ap.add_argument("--fail-rank", type=int, default=-1, help="this rank raises at step 2")
ap.add_argument("--fail-rank-cpp", type=int, default=-1,
                help="at step 2 this rank's C++ step gets an out-of-range token (only it fails); "
                     "every rank records the error it raised and the run goes on")
ap.add_argument("--clip", type=float, default=1.0)
ap.add_argument("--skip-step", type=int, default=-1, help="draw this step's batch, do not step")
ap.add_argument("--grads", action="store_true", help="rank 0 saves the last step's gradient")
ap.add_argument("--pid-dir", default="", help="write this rank's pid there (kill tests)")
ap.add_argument("--moments", default="float32", help="TrainConfig.moment_dtype")
ap.add_argument("--evaluate", action="store_true", help="record Trainer.evaluate's loss")
ap.add_argument("--save-pretrained", default="", help="Trainer.save_pretrained there at the end")
ap.add_argument("--catch-save", action="store_true", help="record a save's error, go on")
ap.add_argument("--out", required=True)
a = ap.parse_args()

dsv3.set_num_threads(1)
par = None if a.layout == "none" else dsv3.distributed.init(a.layout, fp8_dispatch=a.fp8_dispatch)
rank = par.rank if par else 0
if a.pid_dir:
    with open(os.path.join(a.pid_dir, f"pid{rank}"), "w") as f:
        f.write(str(os.getpid()))
if a.config == "dense":  # no routed experts: an expert-parallel layout must be refused
    cfg = dsv3.Config.tiny().replace(n_routed_experts=0, first_k_dense_replace=2)
else:
    cfg = getattr(dsv3.Config, a.config)()
tc = dsv3.TrainConfig(batch_size=a.batch, seq_len=a.seq, lr=3e-3, warmup_steps=0, schedule="constant",
                      precision=a.precision, grad_accum=a.grad_accum, grad_clip=a.clip,
                      moment_dtype=a.moments)
if a.load:
    tr = dsv3.Trainer.load(a.load, parallel=par)
else:
    tr = dsv3.Trainer(dsv3.Model(cfg, seed=1), tc, parallel=par)
if par is None and a.fp8_dispatch:  # one process emulating the FP8 dispatch (the reference)
    dsv3._core.trainer_set_parallel(tr._t, None, True)


class _Val:
    """Fixed held-out batches for Trainer.evaluate (the same on every rank)."""

    def val_batches(self, batch_size, seq_len, n):
        r = np.random.default_rng(11)
        return [r.integers(0, cfg.vocab_size, size=(4, a.seq + 1)) for _ in range(2)]


rng = np.random.default_rng(7)
for _ in range(tr.step_count):  # a resumed run continues the same sequence of batches
    rng.integers(0, cfg.vocab_size, size=(a.batch, a.seq + 1))
rec = {"loss": [], "grad_norm": [], "expert_load": [], "main": [], "balance": [], "mtp": []}
for s in range(a.steps):
    batch = rng.integers(0, cfg.vocab_size, size=(a.batch, a.seq + 1))
    if rank == a.fail_rank and s == 1:
        raise RuntimeError(f"rank {rank} fails on purpose")
    if s == a.skip_step:
        continue
    if a.fail_rank_cpp >= 0 and s == 1:  # past the Python checks: only one rank's C++ step fails
        local = batch[par.local_rows(a.batch)] if par else batch
        local = np.ascontiguousarray(local, dtype=np.int64)
        if rank == a.fail_rank_cpp:
            local[0, 0] = cfg.vocab_size
        try:
            tr._t.step(local, tr._options(tr.config.lr_at(tr.step_count)), tr.step_count)
            rec["error"] = None
        except Exception as e:
            rec["error"] = [type(e).__name__, str(e)]
        continue
    st = tr.step(batch)
    for k in ("loss", "grad_norm", "main", "balance", "mtp"):
        rec[k].append(st[k])
    rec["expert_load"].append(st["expert_load"].tolist())
    if "time_split" in st:
        ts = st["time_split"]
        rec.setdefault("allreduce_bytes", []).append(ts["all_reduce_bytes"])
        rec.setdefault("time_split", []).append(ts)
state = tr.full_state_dict()  # the whole model (an expert shard gathers: every rank calls)
h = hashlib.sha256()
for k in sorted(state):
    h.update(k.encode())
    h.update(np.ascontiguousarray(state[k]).tobytes())
rec["weights_sha256"] = h.hexdigest()
rec["ep_stats"] = tr.expert_parallel_stats()
rec["expert_shard"] = tr.model.expert_shard
rec["local_parameters"] = tr.model.num_local_parameters()
rec["local_shapes"] = {k: list(v) for k, v in tr.model.parameter_shapes().items()}
rec["val_loss"] = tr.evaluate(_Val()) if a.evaluate else None
if par:
    rec["comm"] = par.stats()
    rec["mpi_thread_level"] = dsv3._core.mpi_thread_level()
rec["moment_elems"] = int(tr._t.moments()[0].size)  # this rank's AdamW moments
rec["slab_end"] = max(off + n for _, off, n in tr._t.entries())
os.makedirs(a.out, exist_ok=True)
with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
    json.dump(rec, f)
grads = dsv3._core.trainer_last_gradients(tr._t) if a.grads else None  # every rank calls
if rank == 0:
    np.savez(os.path.join(a.out, "weights.npz"), **state)
    if a.grads:
        np.save(os.path.join(a.out, "grads.npy"), grads)
sent = {}  # the all-to-all bytes this rank sent while saving (the experts' gather)
for name, path, save in [("save", a.save, tr.save), ("save_pretrained", a.save_pretrained,
                                                     tr.save_pretrained)]:
    if path:
        before = par.stats()["alltoall_bytes"] if par else 0
        try:
            save(path)
        except Exception as e:  # recorded (tests: a rank that cannot take part in the gather)
            if not a.catch_save:
                raise
            sent[name + "_error"] = [type(e).__name__, str(e)]
            continue
        sent[name] = (par.stats()["alltoall_bytes"] if par else 0) - before
with open(os.path.join(a.out, f"rank{rank}.saved.json"), "w") as f:
    json.dump(sent, f)
