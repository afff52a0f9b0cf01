"""dsv3 beside llama.cpp on one random DeepseekV3 MoE: decode and prefill speed per weight
format, and the logits of both engines on the same weights.

    LLAMA_CPP_DIR=/path/to/llama.cpp LLAMA_CPP_BUILD=/path/to/build \\
        python bench/bench_llamacpp.py [--threads 2] [--ctx 64] [--rounds 3] [--work DIR]

llama.cpp is not part of dsv3 and nothing of it is committed: build it yourself (CPU backend,
``cmake -B build -DGGML_NATIVE=ON && cmake --build build --target llama-bench llama-quantize
llama``) and point LLAMA_CPP_DIR at its source (convert_hf_to_gguf.py, include/) and
LLAMA_CPP_BUILD at the build (bin/llama-bench). Without them the script says so and exits 0.

The model: Config.medium's shape (hidden 1024, 8 layers, 16 MLA heads, q_lora 384, kv_lora
256, 32 routed experts top-4 in 4 groups + 1 shared, width 512, noaux_tc sigmoid gate) with
MTP off (llama.cpp drops MTP layers). transformers' DeepseekV3ForCausalLM draws the random
weights (torch seed 0; the correction biases too, so that the routing is not all ties) and
saves them in float32; llama.cpp's convert_hf_to_gguf.py converts that directory to a GGUF in
f32 and llama-quantize derives bf16 and Q8_0 from it; dsv3 loads the same directory with
``Model.from_pretrained`` as float32 (weights=None); for the bf16 and fp8 rows it loads the
bf16 and FP8 checkpoints ``save_pretrained(dtype="bfloat16" | "fp8")`` makes of it (the FP8 one
in DeepSeek's layout: every projection, kv_b_proj included, E4M3 + 128x128 scales) with
``weights="bf16"`` / ``"fp8"``, mapped as a released checkpoint is, as llama.cpp maps its
GGUFs (converting while loading would keep kv_b_proj in float32). The byte vocabulary needs a tokenizer for
the converter: a byte-level BPE with one merge, and its pre-tokenizer declared "gpt-2" (the
converter otherwise refuses a tokenizer it does not know by hash); the benchmark feeds token
ids, so the tokenizer only has to load.

Speed: llama-bench ``-p CTX -n CTX -t THREADS`` (its prompt test: CTX tokens in one batch;
its generation test: CTX tokens one at a time from an empty context), and dsv3 the same work:
a prefill ``forward`` of CTX tokens into a fresh cache, and CTX batch-1 ``forward`` calls on
a cache from position 0. The two sides alternate, ``--rounds`` times; medians. Floor: the
bytes one decoded token reads (bench_load.token_bytes: attention, dense / shared expert, top-k
of the routed experts, lm_head, the KV cache at half the context; dsv3 in its resident formats,
llama.cpp with every matrix in the GGUF's type, Q8_0 at 34 bytes per 32 weights) over the
measured copy bandwidth on the benchmark's threads.

Logits: llamacpp_logits.cpp (compiled here against the build) feeds 24 tokens one at a time
to the f32 GGUF; dsv3's float32 model runs the same tokens in one causal forward. Reported:
the largest absolute difference and that over the largest |logit|.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dsv3  # noqa: E402
from bench_load import token_bytes  # noqa: E402
from common import machine_line, memory_bandwidth, print_table, set_threads  # noqa: E402
from dsv3 import resident  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# bytes per weight of a matrix in each row's format (norms, biases, kv_b_proj-free: see floor)
LLAMA_BYTES = {"f32": 4.0, "bf16": 2.0, "q8_0": 34 / 32}
PAIRS = [("f32", None), ("bf16", "bf16"), ("q8_0", "fp8")]  # llama.cpp type, dsv3 weights=


def config() -> dsv3.Config:
    return dsv3.Config.medium().replace(num_nextn_predict_layers=0)


def write_hf_model(cfg: dsv3.Config, out: str) -> None:
    """transformers' random DeepseekV3ForCausalLM in float32, plus a loadable tokenizer."""
    import torch
    import transformers
    os.makedirs(out, exist_ok=True)
    cfg.to_json(out)
    hf_cfg = transformers.AutoConfig.from_pretrained(out)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.normal_(0.0, 1e-2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 1e-2)
    model.save_pretrained(out, safe_serialization=True)
    write_tokenizer(out, cfg)


def write_tokenizer(out: str, cfg: dsv3.Config) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    vocab["ab"] = len(vocab)
    assert len(vocab) <= cfg.vocab_size
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(out)


CONVERT = """
import sys
sys.path.insert(0, {gguf!r}); sys.path.insert(0, {src!r})
import gguf  # the source tree's gguf-py, not an installed one
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", {hf!r}, "--outtype", "f32", "--outfile", {out!r}]
import runpy
runpy.run_path({script!r}, run_name="__main__")
"""


def make_ggufs(src: str, build: str, hf: str, work: str) -> dict:
    paths = {t: os.path.join(work, f"model-{t}.gguf") for t, _ in PAIRS}
    if not os.path.exists(paths["f32"]):
        code = CONVERT.format(gguf=os.path.join(src, "gguf-py"), src=src, hf=hf,
                              out=paths["f32"], script=os.path.join(src, "convert_hf_to_gguf.py"))
        run([sys.executable, "-c", code], "convert_hf_to_gguf")
    for t in ("bf16", "q8_0"):
        if not os.path.exists(paths[t]):
            run([os.path.join(build, "bin", "llama-quantize"), paths["f32"], paths[t], t.upper()],
                "llama-quantize")
    return paths


def run(cmd, what: str, **kw) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise SystemExit(f"{what} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p.stdout


def llama_bench(build: str, gguf_path: str, threads: int, ctx: int, reps: int):
    """(prefill tok/s, decode tok/s, build id) from llama-bench's JSON."""
    out = run([os.path.join(build, "bin", "llama-bench"), "-m", gguf_path, "-t", str(threads),
               "-p", str(ctx), "-n", str(ctx), "-r", str(reps), "-o", "json"], "llama-bench")
    res = json.loads(out)
    pp = next(r for r in res if r["n_prompt"] and not r["n_gen"])
    tg = next(r for r in res if r["n_gen"] and not r["n_prompt"])
    return pp["avg_ts"], tg["avg_ts"], f"{res[0].get('build_commit', '?')} ({res[0].get('build_number', '?')})"


def dsv3_speed(m: dsv3.Model, ctx: int, reps: int):
    """(prefill tok/s, decode tok/s): the mean over ``reps`` of each (llama-bench reports its
    mean too), llama-bench's two tests."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, m.config.vocab_size, ctx)
    pp, tg = [], []
    m.forward(ids[None], m.new_cache(1, 2 * ctx))  # warm-up
    for _ in range(reps):
        cache = m.new_cache(1, 2 * ctx)
        t0 = time.perf_counter()
        m.forward(ids[None], cache)
        pp.append(ctx / (time.perf_counter() - t0))
        cache = m.new_cache(1, 2 * ctx)
        t0 = time.perf_counter()
        for i in range(ctx):
            m.forward(ids[None, i:i + 1], cache, start_pos=i)
        tg.append(ctx / (time.perf_counter() - t0))
    return statistics.mean(pp), statistics.mean(tg)


def logits_check(src: str, build: str, gguf_f32: str, m: dsv3.Model, threads: int, work: str):
    exe = os.path.join(work, "llamacpp_logits")
    lib = os.path.join(build, "bin")
    run(["g++", "-O2", "-std=c++17", os.path.join(HERE, "llamacpp_logits.cpp"), "-o", exe,
         "-I", os.path.join(src, "include"), "-I", os.path.join(src, "ggml", "include"),
         "-L", lib, "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{lib}"], "g++ llamacpp_logits")
    ids = np.random.default_rng(1).integers(0, m.config.vocab_size, 24)
    out = os.path.join(work, "logits.bin")
    run([exe, gguf_f32, out, str(threads)] + [str(int(t)) for t in ids], "llamacpp_logits")
    theirs = np.fromfile(out, np.float32).reshape(len(ids), -1)
    ours = m.forward(ids)
    diff = float(np.abs(theirs[:, :ours.shape[1]] - ours).max())
    return diff, diff / float(np.abs(ours).max()), len(ids)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="alternations of the two engines")
    p.add_argument("--reps", type=int, default=3, help="repetitions inside one measurement")
    p.add_argument("--work", default=None, help="keep the checkpoint and GGUFs here")
    a = p.parse_args(argv)
    src, build = os.environ.get("LLAMA_CPP_DIR"), os.environ.get("LLAMA_CPP_BUILD")
    if build is None and src is not None:
        build = os.path.join(src, "build")
    if not src or not build or not os.path.exists(os.path.join(build, "bin", "llama-bench")):
        print("skip: llama.cpp not built (set LLAMA_CPP_DIR to its source and LLAMA_CPP_BUILD "
              "to a build holding bin/llama-bench, bin/llama-quantize and libllama)")
        return 0
    set_threads(a.threads)
    work = a.work or tempfile.mkdtemp(prefix="dsv3-llamacpp-")
    try:
        cfg = config()
        hf = os.path.join(work, "hf")
        if not os.path.exists(os.path.join(hf, "config.json")):
            write_hf_model(cfg, hf)
        ggufs = make_ggufs(src, build, hf, work)
        print(machine_line())
        bw = memory_bandwidth(threads=a.threads)
        print(f"copy bandwidth {bw:.1f} GB/s (numpy copy on {a.threads} threads, read + write); load average "
              f"{os.getloadavg()[0]:.2f}; {a.threads} threads, context {a.ctx}")
        dirs = {None: hf}
        for w, dtype in (("bf16", "bfloat16"), ("fp8", "fp8")):
            dirs[w] = os.path.join(work, w)
            if not os.path.exists(os.path.join(dirs[w], "config.json")):
                dsv3.Model.from_pretrained(hf).save_pretrained(dirs[w], dtype=dtype)
        models = {w: dsv3.Model.from_pretrained(dirs[w], weights=w) for _, w in PAIRS}
        plans = {w: resident.plan(*resident.inspect(dirs[w]), w) if w else None
                 for _, w in PAIRS}
        diff, rel, n = logits_check(src, build, ggufs["f32"], models[None], a.threads, work)
        print(f"logits, llama.cpp f32 (one token at a time) vs dsv3 float32 (one forward), "
              f"{n} positions: max |diff| {diff:.2e}, relative to max |logit| {rel:.2e}")
        res = {t: {"ll": [], "ds": []} for t, _ in PAIRS}
        build_id = "?"
        for r in range(a.rounds):
            for t, w in PAIRS:  # alternate: llama.cpp, dsv3, next format
                pp, tg, build_id = llama_bench(build, ggufs[t], a.threads, a.ctx, a.reps)
                res[t]["ll"].append((pp, tg))
                res[t]["ds"].append(dsv3_speed(models[w], a.ctx, a.reps))
        print(f"llama.cpp build {build_id}")
        rows = []
        for t, w in PAIRS:
            lp = statistics.median(x[0] for x in res[t]["ll"])
            lt = statistics.median(x[1] for x in res[t]["ll"])
            dp = statistics.median(x[0] for x in res[t]["ds"])
            dt = statistics.median(x[1] for x in res[t]["ds"])
            m = models[w]
            ll_floor = bw * 1e9 / token_bytes(m, a.ctx // 2, matrix_bytes=LLAMA_BYTES[t])
            ds_floor = bw * 1e9 / token_bytes(m, a.ctx // 2, plans[w])
            rows.append([f"{t} / {w or 'fp32'}", f"{lt:.1f}", f"{dt:.1f}", f"{dt / lt:.2f}x",
                         f"{lt / ll_floor:.2f}", f"{dt / ds_floor:.2f}",
                         f"{lp:.0f}", f"{dp:.0f}", f"{dp / lp:.2f}x"])
        print_table(f"decode (tg{a.ctx}) and prefill (pp{a.ctx}), medians of {a.rounds} "
                    f"alternated rounds",
                    ["llama.cpp / dsv3", "llama tok/s", "dsv3 tok/s", "dsv3/llama",
                     "llama floor", "dsv3 floor", "llama pp tok/s", "dsv3 pp tok/s",
                     "dsv3/llama pp"], rows)
        for t, _ in PAIRS:
            print(f"{t}: llama.cpp (pp, tg) per round {[(round(x), round(y, 1)) for x, y in res[t]['ll']]}; "
                  f"dsv3 {[(round(x), round(y, 1)) for x, y in res[t]['ds']]}")
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
