"""Resident weights: bytes held and indicative speed of a model whose projection matrices stay in
fp32 / bf16 / FP8 E4M3 (+ 128x128 weight_scale_inv), against the ordinary fp32 model.

    python bench/bench_resident.py [--config small|medium] [--threads N] [--quick]

Rows: the fp32 Model, and Model._from_resident with every resident-capable matrix held as
("fp32" | "bf16" | "fp8", ...) (kv_b_proj, norms, router gates: fp32 in the slab). Columns:
bytes held (resident_bytes), batch-1 decode step at a 64-token context, prefill of 128 tokens,
and the largest logit difference (relative to the largest logit) against the fp32 model of the same (dequantized) weights.
The weights are quantized with dsv3.fp8.quantize / numpy bf16 rounding (the tests use an
independent torch quantizer). Timings on a shared machine are indicative.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dsv3  # noqa: E402
from common import machine_line, print_table, set_threads, timeit  # noqa: E402

SUFFIXES = ("q_a_proj", "q_b_proj", "q_proj", "k_proj", "v_proj", "kv_a_proj_with_mqa", "o_proj",
            "gate_proj", "up_proj", "down_proj", "eh_proj")


def resident_capable(name: str) -> bool:
    return name in ("model.embed_tokens.weight", "lm_head.weight") or \
        name.split(".")[-2] in SUFFIXES


def bf16_bits(w: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even to bf16, as uint16 bit patterns (finite inputs)."""
    u = w.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def resident_weights(state, fmt):
    """(weights for _from_resident, the dequantized fp32 state)."""
    weights, deq = {}, {}
    for name, w in state.items():
        if not resident_capable(name) or fmt == "copy":
            weights[name] = deq[name] = w
        elif fmt == "fp32":
            weights[name], deq[name] = ("fp32", w, None), w
        elif fmt == "bf16":
            b = bf16_bits(w)
            weights[name] = ("bf16", b, None)
            deq[name] = (b.astype(np.uint32) << 16).view(np.float32)
        else:
            codes, sinv = dsv3.fp8.quantize(w, "e4m3", block=(128, 128))
            weights[name] = ("fp8", codes, sinv)
            deq[name] = dsv3.fp8.dequantize(codes, sinv, block=(128, 128))
    return weights, deq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small", choices=["small", "medium"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny config, few repetitions")
    a = ap.parse_args()
    if a.threads:
        set_threads(a.threads)
    cfg = dsv3.Config.tiny() if a.quick else getattr(dsv3.Config, a.config)()
    print(machine_line())
    base = dsv3.Model(cfg, seed=0)
    state = base.state_dict()
    rng = np.random.default_rng(0)
    ctx = rng.integers(0, cfg.vocab_size, size=(1, 64))
    prefill = rng.integers(0, cfg.vocab_size, size=(1, 128))
    min_time = 0.05 if a.quick else 0.5
    rows = []
    for fmt in ("model", "fp32", "bf16", "fp8"):
        if fmt == "model":
            m, ref = base, base
        else:
            weights, deq = resident_weights(state, fmt)
            m = dsv3.Model._from_resident(cfg, weights)
            ref = dsv3.Model(cfg)
            ref.load_state_dict(deq)
        cache = m.new_cache(1, 80)
        m.forward(ctx, cache, 0)
        step = timeit(lambda: m.forward(ctx[:, -1:], cache, 63), min_time=min_time)
        pre = timeit(lambda: m.forward(prefill), min_time=min_time)
        want = ref.forward(prefill)
        err = float(np.abs(m.forward(prefill) - want).max() / np.abs(want).max())
        rows.append([fmt if fmt != "model" else "fp32 Model", f"{m.resident_bytes() / 2**20:.2f}",
                     f"{step * 1e3:.2f}", f"{pre * 1e3:.1f}", f"{err:.1e}"])
    print_table(f"resident weights, {'tiny' if a.quick else a.config} config",
                ["weights", "MiB held", "decode step ms", "prefill 128 ms",
                 "max diff / max ref"], rows)


if __name__ == "__main__":
    main()
