"""Synthetic checkpoints with the dims and tensor layout of real DeepSeek-family models.

    python bench/make_checkpoint.py OUT --model deepseek_v2_lite --dtype fp8
    python bench/make_checkpoint.py OUT --model moonlight_16b_a3b --dtype bf16 --layers 4
    python bench/make_checkpoint.py OUT --tiny                      (seconds; for tests)

The config is dsv3's preset of the model (Config.deepseek_v2_lite: hidden 2048, 27 layers,
the first dense (intermediate 10944), 64 routed experts top-6 + 2 shared of width 1408, no
query compression, kv_lora_rank 512, 16 heads of nope 128 / rope 64 / v 128, vocab 102400,
softmax gate; Config.moonlight_16b_a3b: the same shape with the DeepseekV3 architecture,
intermediate 11264, noaux_tc sigmoid gate, vocab 163840). The tensor names and shapes are the
engine's layout (``_core.param_layout``), stored as ``save_pretrained`` stores them
(checkpoint.stored_dtype): fp8 = E4M3 codes + float32 weight_scale_inv per 128x128 block for
the linear weights, bf16 for the embedding / head / router gate / norms, float32 correction
biases; bf16 = everything bf16 but those biases. The values are random (N(0, 0.02) matrices,
norms 1, biases N(0, 1e-3)), drawn per tensor from a seed and the tensor's name, so the
files do not depend on the order or the sharding.

Written streaming: one tensor at a time (the largest, the embedding, in bands of 4096 rows),
into shards of at most ``--shard-gb`` with ``model.safetensors.index.json`` (one
``model.safetensors`` when everything fits one shard), in a temporary directory published
by rename like ``save_pretrained``. ``--layers N`` keeps the first N layers; ``--tiny``
shrinks every width (hidden 256, 8 experts top-2, vocab 512, 2 layers unless --layers) for
tests, keeping the structure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import zlib

import numpy as np

try:  # the installed dsv3; a source tree's python/ only when none is importable (a prepended
    import dsv3  # noqa: F401  source tree has no built _core and would shadow the install)
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from dsv3 import Config, _core, fp8  # noqa: E402
from dsv3 import checkpoint as ck  # noqa: E402
from dsv3 import safetensors_io as st  # noqa: E402
from dsv3._files import temp_name  # noqa: E402

MODELS = {"deepseek_v2_lite": Config.deepseek_v2_lite,
          "moonlight_16b_a3b": Config.moonlight_16b_a3b}
DTYPES = {"fp8": "fp8", "bf16": "bfloat16"}
ROWS = 4096  # rows generated at a time for bf16 tensors


def config(model: str, layers=None, tiny: bool = False) -> Config:
    cfg = MODELS[model]()
    if tiny:
        cfg = cfg.replace(hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                          num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=64,
                          qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                          n_routed_experts=8, num_experts_per_tok=2, vocab_size=512,
                          num_hidden_layers=2, bos_token_id=0, eos_token_id=1,
                          max_position_embeddings=1024)
    if layers is not None:
        cfg = cfg.replace(num_hidden_layers=layers)
    return cfg


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def values(name: str, shape, seed: int, rows=None) -> np.ndarray:
    """float32 values of tensor ``name`` (rows ``rows`` = (r0, r1) of a matrix: drawn from the
    band's own stream, so a band is the same whether generated alone or in a whole)."""
    if len(shape) == 1:
        g = _rng(seed, name)
        if name.endswith("e_score_correction_bias"):
            return (g.standard_normal(shape[0]) * 1e-3).astype(np.float32)
        return np.ones(shape, np.float32)  # norms
    r0, r1 = rows or (0, shape[0])
    out = np.empty((r1 - r0, shape[1]), np.float32)
    for b in range(r0 // ROWS, -(-r1 // ROWS)):
        g = _rng(seed, f"{name}#{b}")
        band = g.standard_normal((min(ROWS, shape[0] - b * ROWS), shape[1]), np.float32)
        lo, hi = max(r0, b * ROWS), min(r1, (b + 1) * ROWS)
        out[lo - r0:hi - r0] = band[lo - b * ROWS:hi - b * ROWS] * np.float32(0.02)
    return out


def stored(cfg: Config, dtype: str):
    """[(name, safetensors dtype, shape)] in layout order, scale_inv after its weight."""
    out = []
    for name, shape in _core.param_layout(cfg):
        d = ck.stored_dtype(name, tuple(shape), dtype)
        out.append((name, d, tuple(shape)))
        if d == "F8_E4M3":
            out.append((name + "_scale_inv", "F32", tuple(-(-s // 128) for s in shape)))
    return out


def produce(cfg: Config, specs, seed: int):
    """produce(name) -> the stored array (fp8 codes / scales of one quantization per weight)."""
    cache = {}
    pow2 = (cfg.quantization_config or {}).get("scale_fmt") == "ue8m0"

    def get(name):
        if name in cache:
            return cache.pop(name)
        dtype, shape = specs[name]
        if dtype == "F32":
            return values(name, shape, seed)
        if dtype == "BF16":
            if len(shape) == 1:
                return st.bf16_bits(values(name, shape, seed))
            out = np.empty(shape, np.uint16)
            for r0 in range(0, shape[0], ROWS):
                r1 = min(shape[0], r0 + ROWS)
                out[r0:r1] = st.bf16_bits(values(name, shape, seed, (r0, r1)))
            return out
        codes, scales = fp8.quantize(values(name, shape, seed), "e4m3", block=(128, 128),
                                     pow2_scale=pow2)
        cache[name + "_scale_inv"] = scales
        return codes
    return get


def write(out: str, cfg: Config, dtype: str, shard_bytes: int, seed: int = 0):
    """Write the checkpoint; returns the file names."""
    ck.check_target(out, "make_checkpoint")
    items = stored(cfg, dtype)
    nbytes = lambda d, s: int(np.prod(s, dtype=np.int64)) * st.element_dtype(d).itemsize
    shards, cur, size = [], [], 0
    for name, d, shape in items:  # a weight and its scale_inv stay in one shard
        n = nbytes(d, shape)
        if cur and size + n > shard_bytes and not name.endswith("_scale_inv"):
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, d, shape))
        size += n
    shards.append(cur)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = temp_name(os.path.join(parent, "." + os.path.basename(os.path.abspath(out))))
    os.makedirs(tmp)
    try:
        names, weight_map = [], {}
        for i, shard in enumerate(shards):
            fname = ("model.safetensors" if len(shards) == 1 else
                     f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
            specs = {n: (d, s) for n, d, s in shard}
            st.write_stream(os.path.join(tmp, fname), specs, produce(cfg, specs, seed),
                            metadata={"format": "pt"})
            names.append(fname)
            weight_map.update({n: fname for n in specs})
        if len(shards) > 1:
            names.append(st.write_index(tmp, weight_map,
                                        sum(nbytes(d, s) for _, d, s in items)))
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(ck.checkpoint_config(cfg, dtype), f, indent=2, sort_keys=True)
        ck.fsync_tree(tmp)
        ck.publish_dir(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="checkpoint directory to write")
    p.add_argument("--model", choices=sorted(MODELS), default="deepseek_v2_lite")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp8")
    p.add_argument("--layers", type=int, default=None, help="keep the first N layers")
    p.add_argument("--tiny", action="store_true", help="shrink every width (tests)")
    p.add_argument("--shard-gb", type=float, default=4.0, help="maximum shard size (GiB)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.layers is not None and a.layers < 1:
        p.error("--layers must be >= 1")
    if not a.shard_gb > 0:
        p.error("--shard-gb must be > 0")
    cfg = config(a.model, a.layers, a.tiny)
    files = write(a.out, cfg, DTYPES[a.dtype], int(a.shard_gb * 2**30), a.seed)
    total = sum(os.path.getsize(os.path.join(a.out, f)) for f in files)
    print(f"{a.out}: {a.model}{' (tiny)' if a.tiny else ''}, {cfg.num_hidden_layers} layers, "
          f"{a.dtype}, {cfg.num_parameters():,} parameters, {len(files)} files, "
          f"{total / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
