"""Resident loading of a checkpoint (dsv3.resident): load time, anonymous memory, decode speed
per weight format.

    python bench/bench_load.py CKPT [--weights auto,fp8,bf16,fp32] [--tokens N] [--threads N]
    python bench/bench_load.py --make [--model moonlight_16b_a3b] [--layers 2]   (a synthetic
                                       checkpoint from make_checkpoint.py, in a temporary dir)

For each format: seconds to build the model (Model.from_pretrained(weights=...)), the growth
of RssAnon (anonymous memory: what a memory-mapped load avoids) against the plan's mapped /
anonymous bytes, the process's peak RSS, greedy decode tokens/s (a memory-bound GEMV per
projection) against the bytes-moved floor, and prefill tokens/s.

Floor: the bytes one decoded token reads (every attention / dense / shared-expert matrix in its
resident format with its scales, kv_b_proj and the router gates in fp32, the routed experts
times num_experts_per_tok / n_routed_experts, the norms, lm_head, and the KV cache rows at the
mean context), divided by the measured copy bandwidth (bench/common.memory_bandwidth on the
decode's threads: read + write counted); "floor %" = measured tok/s / (bandwidth / bytes per token). Prefill: the
FLOPs of the prompt (2 x the matrix weights each token meets, routed experts at top-k / E,
lm_head included since forward returns every position's logits, plus causal attention's
QK^T and PV) over the prefill time, against the rate of the same linear kernel
(dsv3.ops.wlinear in the row's format, PROMPT x hidden -> hidden) measured in the process
("of GEMM"). A format whose plan does not fit the available memory is skipped with its
refusal. Run one format per process for its own peak RSS. Timings on a shared machine are
indicative.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import re
import resource

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dsv3  # noqa: E402
from common import machine_line, memory_bandwidth, print_table, set_threads, timeit  # noqa: E402
from dsv3 import _memory, resident  # noqa: E402
from dsv3 import safetensors_io as st  # noqa: E402


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


ELEM = {"fp32": 4, "bf16": 2, "fp8": 1}
EXPERT = re.compile(r"\.mlp\.experts\.\d+\.")


def token_bytes(m, context: int, plan=None, matrix_bytes=None) -> int:
    """Bytes one batch-1 decode step reads (the floor's numerator, see the module docstring);
    a kv_b_proj the plan maps in its stored format is read in that format by the decode.
    ``matrix_bytes``: every matrix at that many bytes per weight instead of its resident
    format (another engine's file of one type, e.g. llama.cpp's Q8_0 at 34 / 32)."""
    cfg, shapes, fmts = m.config, m.parameter_shapes(), dict(m.weight_formats())
    for name, (fmt, mapped, _) in (plan.tensors.items() if plan else ()):
        if name.endswith("kv_b_proj.weight") and mapped:
            fmts[name] = fmt
    E, K = cfg.n_routed_experts or 1, cfg.num_experts_per_tok or 0
    total = 0.0
    for name, shape in shapes.items():
        if name == "model.embed_tokens.weight" and not cfg.tie_word_embeddings:
            continue  # one row per token
        if ".layers." in name and int(name.split(".")[2]) >= cfg.num_hidden_layers:
            continue  # MTP modules: not run by plain decoding
        n = int(np.prod(shape))
        f = fmts.get(name, "fp32")
        if matrix_bytes is not None and len(shape) == 2:
            b = n * matrix_bytes
        else:
            b = n * ELEM[f]
            if f == "fp8":
                b += 4 * (-(-shape[0] // 128)) * (-(-shape[1] // 128))
        total += b * K / E if EXPERT.search(name) else b
    cache = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4 * context
    return int(total + cache)


def prefill_flops(m, T: int) -> float:
    """FLOPs of a T-token prefill (see the module docstring)."""
    cfg = m.config
    E, K = cfg.n_routed_experts or 1, cfg.num_experts_per_tok or 0
    per_token = 0.0
    for name, shape in m.parameter_shapes().items():
        if len(shape) != 2 or name == "model.embed_tokens.weight":
            continue
        if ".layers." in name and int(name.split(".")[2]) >= cfg.num_hidden_layers:
            continue
        n = float(shape[0] * shape[1])
        per_token += 2 * n * K / E if EXPERT.search(name) else 2 * n
    pairs = T * (T + 1) / 2  # causal (query, key) pairs
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    attn = 2 * pairs * cfg.num_attention_heads * (qk + cfg.v_head_dim) * cfg.num_hidden_layers
    return per_token * T + attn


def gemm_rate(fmt: str, rows: int, hidden: int) -> float:
    """GFLOP/s of dsv3.ops.wlinear in ``fmt`` at rows x hidden -> hidden (median)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((hidden, hidden)) * 0.02).astype(np.float32)
    x = rng.standard_normal((rows, hidden)).astype(np.float32)
    if fmt == "fp8":
        data, sinv = dsv3.fp8.quantize(w, "e4m3", block=(128, 128))
    else:
        data, sinv = (st.bf16_bits(w) if fmt == "bf16" else w), None
    t = timeit(lambda: dsv3.ops.wlinear(x, fmt, data, sinv), min_time=0.5)
    return 2.0 * rows * hidden * hidden / t / 1e9


def run(ckpt: str, fmt: str, tokens: int, bw: float, prefill: int):
    plan = resident.plan(*resident.inspect(ckpt), None if fmt == "auto" else fmt)
    before, t0 = rss_anon(), time.perf_counter()
    try:
        m = dsv3.Model.from_pretrained(ckpt, weights=fmt)
    except _memory.MemoryBudgetError as e:
        return [fmt, "refused", str(e)[:60]] + [""] * 13
    load = time.perf_counter() - t0
    grown = rss_anon() - before
    prompt = np.array([1, 2, 3])
    t0 = time.perf_counter()
    m.generate(prompt, max_new_tokens=1)  # warm the mapped pages
    first = time.perf_counter() - t0
    out = m.generate(prompt, max_new_tokens=tokens, eos_token_id=None)
    tps = out.stats["tokens_per_second"]
    per_tok = token_bytes(m, len(prompt) + tokens // 2, plan)
    floor = bw * 1e9 / per_tok
    pf = ["", "", "", ""]
    if prefill:
        ids = np.arange(prefill) % m.config.vocab_size
        t1 = time.perf_counter()
        m.forward(ids[None], m.new_cache(1, prefill))
        secs = time.perf_counter() - t1
        rate = prefill_flops(m, prefill) / secs / 1e9
        gemm = gemm_rate(plan.weights, prefill, m.config.hidden_size)
        pf = [f"{prefill / secs:.1f}", f"{rate:.0f}", f"{gemm:.0f}", f"{rate / gemm:.2f}"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return [f"{fmt} ({plan.weights})", f"{load:.2f}", f"{load + first:.2f}",
            f"{grown / 2**20:.0f}", f"{plan.mapped_bytes / 2**20:.0f}",
            f"{plan.anonymous_bytes / 2**20:.0f}", f"{peak:.2f}", f"{tps:.2f}",
            f"{per_tok / 2**20:.0f}", f"{floor:.2f}", f"{100 * tps / floor:.0f}%"] + pf


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", nargs="?", default=None)
    p.add_argument("--make", action="store_true", help="write a synthetic checkpoint first")
    p.add_argument("--model", default="moonlight_16b_a3b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--weights", default="auto,fp8,bf16,fp32")
    p.add_argument("--tokens", type=int, default=8, help="greedy decode tokens")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--prefill", type=int, default=0, help="also time a prefill of N tokens")
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
        nt = dsv3.get_num_threads()
        bw = memory_bandwidth(threads=nt)
        print(f"copy bandwidth {bw:.1f} GB/s (numpy copy on {nt} threads, read + write; one "
              f"thread: {memory_bandwidth():.1f}); load average {os.getloadavg()[0]:.2f}")
        rows = [run(ckpt, f, a.tokens, bw, a.prefill) for f in a.weights.split(",")]
        print_table(f"resident loading of {ckpt}",
                    ["weights", "load s", "to 1st token s", "RssAnon +MiB", "mapped MiB",
                     "anon MiB", "peak RSS GiB", "decode tok/s", "MiB/token", "floor tok/s",
                     "floor %", "prefill tok/s", "prefill GFLOP/s", "GEMM GFLOP/s", "of GEMM"],
                    rows)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
