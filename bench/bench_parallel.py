"""Parallel training over MPI on loopback (issue #18's figures): per layout, the step time
against the single process at the same global batch, the all-to-all bytes of the expert
dispatch against the closed form, and the fraction of the gradient all-reduce hidden behind
the backward; and the memory each rank holds against the single process: parameters, the
training state (fp32 weights + gradients + AdamW moments: with ep > 1 only the rank's routed
experts, model/shard.h) and the peak resident set (VmHWM: also Python, the activations, MPI).

    python bench/bench_parallel.py [--config small] [--batch 8] [--seq 128] [--steps 4]

Closed form of the forward dispatch: every routed (token, expert) row of the global batch is
one row of [x | w] (D fp32 + 1 weight = 4(D+1) bytes; with --fp8-dispatch D E4M3 codes +
ceil(D/128) scales + the weight); a fraction (ep-1)/ep of the rows leaves its rank when
routing is uniform over the owners. The measured bytes are what the ranks sent to OTHER ranks
(MPI's self-copies excluded). On a 2-core machine 4 ranks oversubscribe the cores: their step
times measure contention, not scaling; bytes and overlap fractions are still meaningful.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def env():
    e = dict(os.environ)
    e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
             OMPI_MCA_btl="self,vader", OMPI_MCA_rmaps_base_oversubscribe="1",
             OMP_NUM_THREADS="1")
    return e


def run(layout, np_, args, fp8=False):
    out = tempfile.mkdtemp(prefix="dsv3-par-")
    cmd = [sys.executable, os.path.join(HERE, "parallel_worker.py"), "--layout", layout,
           "--out", out, "--config", args.config, "--batch", str(args.batch), "--seq",
           str(args.seq), "--steps", str(args.steps), "--threads", str(args.threads)]
    if fp8:
        cmd.append("--fp8-dispatch")
    if layout != "none":
        cmd = [shutil.which("mpirun"), "--oversubscribe", "-np", str(np_)] + cmd
    subprocess.run(cmd, env=env(), check=True, capture_output=True, text=True)
    ranks = []
    for r in range(np_):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            ranks.append(json.load(f))
    shutil.rmtree(out, ignore_errors=True)
    return ranks


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="dsv3 threads per rank")
    args = ap.parse_args()
    if shutil.which("mpirun") is None:
        print("mpirun not found: apt-get install openmpi-bin libopenmpi-dev")
        return
    single = run("none", 1, args)
    t1 = median([s["seconds"] for s in single[0]["steps"]])
    print(f"config {args.config}, global batch {args.batch}x{args.seq}, {args.threads} thread(s) "
          f"per rank, loopback (shared memory), cores: {os.cpu_count()}")
    print(f"{'layout':<18}{'ranks':>6}{'step s':>9}{'vs 1 proc':>10}{'AR MB/rank':>11}"
          f"{'AR hidden':>10}{'disp MB':>9}{'closed MB':>10}{'ratio':>7}{'(ep-1)/ep':>10}"
          f"{'ranks/tok':>10}")
    print(f"{'single':<18}{1:>6}{t1:>9.3f}{1.0:>10.2f}")
    mem = [("single", 1, single)]
    for layout, np_, fp8 in [("dp=2", 2, False), ("ep=2", 2, False), ("ep=2", 2, True),
                             ("dp=2,ep=2", 4, False), ("dp=2,ep=2", 4, True), ("ep=4", 4, False)]:
        rk = run(layout, np_, args, fp8)
        if not fp8:
            mem.append((layout, np_, rk))
        t = median([max(r["steps"][i]["seconds"] for r in rk) for i in range(args.steps)])
        split = [s["split"] for s in rk[0]["steps"]]
        ar_mb = median([s["all_reduce_bytes"] for s in split]) / 1e6
        hidden = median([s["all_reduce_hidden_fraction"] for s in split])
        ep = int(layout.split("ep=")[1]) if "ep=" in layout else 1
        name = layout + (" fp8" if fp8 else "")
        if ep > 1:
            D = rk[0]["hidden"]
            row = (D + 4 * (-(-D // 128) + 1)) if fp8 else 4 * (D + 1)
            routed = rk[0]["steps"][0]["routed_rows"]  # the global load of one step
            closed = routed * row * (args.steps + 1) / 1e6
            sent = sum(r["ep"]["dispatch_bytes"] for r in rk) / 1e6
            per_tok = median([r["ep"]["ranks_per_token"] for r in rk])
            print(f"{name:<18}{np_:>6}{t:>9.3f}{t1 / t:>10.2f}{ar_mb:>11.2f}{hidden:>10.2f}"
                  f"{sent:>9.2f}{closed:>10.2f}{sent / closed:>7.2f}{(ep - 1) / ep:>10.2f}"
                  f"{per_tok:>10.2f}")
        else:
            print(f"{name:<18}{np_:>6}{t:>9.3f}{t1 / t:>10.2f}{ar_mb:>11.2f}{hidden:>10.2f}")
    m1 = single[0]["memory"]
    print(f"\nmemory per rank (max over ranks) vs the single process")
    print(f"{'layout':<18}{'ranks':>6}{'params':>12}{'vs 1':>7}{'state MB':>10}{'vs 1':>7}"
          f"{'peak RSS MB':>13}{'vs 1':>7}")
    for name, np_, rk in mem:
        p = max(r["memory"]["parameters"] for r in rk)
        sb = max(r["memory"]["state_bytes"] for r in rk)
        rss = max(r["memory"]["peak_rss_bytes"] for r in rk)
        print(f"{name:<18}{np_:>6}{p:>12,}{p / m1['parameters']:>7.2f}{sb / 1e6:>10.1f}"
              f"{sb / m1['state_bytes']:>7.2f}{rss / 1e6:>13.1f}"
              f"{rss / max(1, m1['peak_rss_bytes']):>7.2f}")


if __name__ == "__main__":
    main()
