"""Command line: ``python -m dsv3 {info,train,generate,bench} ...`` (see ``--help``)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import List, Optional

from . import build_info
from .ops import CACHE_DTYPES
from .config import Config

_PRESETS = {"tiny": Config.tiny, "small": Config.small, "deepseek_v3": Config.deepseek_v3,
            "v3": Config.deepseek_v3, "deepseek_v2_lite": Config.deepseek_v2_lite,
            "deepseek_v2": Config.deepseek_v2, "deepseek_v3_1": Config.deepseek_v3_1,
            "moonlight_16b_a3b": Config.moonlight_16b_a3b, "kimi_k2": Config.kimi_k2}


def load_config(spec: str) -> Config:
    """A preset name (see _PRESETS), a config.json, or a checkpoint directory holding one."""
    if spec in _PRESETS:
        return _PRESETS[spec]()
    if os.path.exists(spec):
        return Config.from_json(spec)
    raise SystemExit(f"dsv3: --config must be one of {sorted(_PRESETS)} or a path to a "
                     f"config.json / checkpoint directory; {spec!r} is neither")


INT64_MAX = 2**63 - 1


def _int_in(lo: int, hi: int = INT64_MAX):
    """argparse type: an integer in [lo, hi] (hi defaults to int64's maximum: a count beyond
    it cannot be meant, and would run forever)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(
                f"{text} is out of range: must be an integer in [{lo}, "
                f"{'int64 max ' if hi == INT64_MAX else ''}{hi}]")
        return v
    parse.__name__ = "integer"
    return parse


def _float_in(lo: float, hi: float = float("inf"), lo_open: bool = False):
    """argparse type: a finite number in [lo, hi] (``lo_open``: (lo, hi])."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi):
            raise argparse.ArgumentTypeError(
                f"{text} is out of range: must be a finite number in {'(' if lo_open else '['}"
                f"{lo:g}, {hi:g}{')' if math.isinf(hi) else ']'}")
        return v
    parse.__name__ = "number"
    return parse


def _fmt_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3f}{unit}"
    return str(n)


def _resident_rows(cfg: Config, stored):
    """({fmt: {mapped, anonymous, total, fits}}, own format or None, available bytes or None):
    the resident weights per format of a checkpoint's tensors ``stored`` (resident.inspect),
    or, with ``stored`` None (a preset / config.json), of a checkpoint stored in each format."""
    from . import _memory, resident
    if stored is not None:
        per = {f: stored for f in resident.FORMATS}
        own = resident.own_format(stored)
    else:
        names = {"fp8": "fp8", "bf16": "bfloat16", "fp32": "float32"}
        per = {f: resident.layout_stored(cfg, names[f]) for f in resident.FORMATS}
        own = None
    have = _memory.available()
    rows = {}
    for fmt, tensors in per.items():
        p = resident.plan(cfg, tensors, fmt)
        total = p.mapped_bytes + p.anonymous_bytes
        rows[fmt] = {"mapped": p.mapped_bytes, "anonymous": p.anonymous_bytes, "total": total,
                     "fits": None if have is None else total + p.transient_bytes <= have[0]}
    return rows, own, None if have is None else have[0]


def _fmt_bytes(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= div:
            return f"{n / div:8.2f} {unit}"
    return f"{n / 2**10:8.2f} KiB"


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import is_checkpoint_dir
    stored = None
    if args.path is not None and os.path.isdir(args.path) and is_checkpoint_dir(args.path):
        from . import resident
        cfg, stored = resident.inspect(args.path)  # the headers, checked as loading does
    else:
        cfg = load_config(args.config if args.path is None else args.path)
    total = cfg.num_parameters()
    active = cfg.num_parameters(active=True)
    with_mtp = cfg.num_parameters(mtp=True)
    gqa_heads = min(8, cfg.num_attention_heads)  # what-if baseline: GQA with 8 kv heads
    rows = [
        ("MLA (latent + shared rope key)", cfg.kv_cache_bytes_per_token("bfloat16", "mla")),
        ("MHA (decompressed keys/values)", cfg.kv_cache_bytes_per_token("bfloat16", "mha")),
        (f"GQA ({gqa_heads} kv heads x {cfg.v_head_dim})",
         cfg.kv_cache_bytes_per_token("bfloat16", "gqa", gqa_heads, cfg.v_head_dim)),
    ]
    latent = {d: cfg.kv_cache_bytes_per_token(d, "mla") for d in ("float32", "bfloat16")}
    res, own, have = _resident_rows(cfg, stored)
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), "parameters": {
            "total": total, "active": active, "mtp": with_mtp - total},
            "kv_cache_bytes_per_token_bf16": {name: b for name, b in rows},
            "kv_cache_bytes_per_token_latent": latent,
            "resident_bytes": res, "checkpoint_format": own, "available_bytes": have,
            "build": build_info()}, indent=2, sort_keys=True))
        return 0
    print(f"dsv3 {build_info()['version']}  {cfg!r}")
    print("\nParameters")
    print(f"  total (main model)      {total:>18,}  ({_fmt_count(total)})")
    print(f"  activated per token     {active:>18,}  ({_fmt_count(active)})")
    print(f"  MTP modules (own)       {with_mtp - total:>18,}  ({_fmt_count(with_mtp - total)})")
    print(f"\nKV cache per token, bf16, {cfg.num_hidden_layers} layers")
    mla = rows[0][1]
    for name, b in rows:
        print(f"  {name:<34} {b:>12,} B  ({b / mla:6.1f}x MLA)")
    if cfg.attention_type == "mla":
        print(f"\nMLA latent cache per token ((kv_lora_rank + qk_rope_head_dim) x "
              f"{cfg.num_hidden_layers} layers)")
        for d, b in latent.items():
            print(f"  {d:<10} {b:>12,} B")
    where = (f"this checkpoint ({own}; mapped = views of its files)" if own is not None
             else "a checkpoint stored in each format")
    avail = "unknown" if have is None else f"{have / 2**30:.1f} GiB"
    print(f"\nResident weights, loaded from {where}; available RAM {avail}")
    for fmt, r in res.items():
        fits = "?" if r["fits"] is None else ("fits" if r["fits"] else "does NOT fit")
        print(f"  {fmt:<5} mapped {_fmt_bytes(r['mapped'])}  anonymous "
              f"{_fmt_bytes(r['anonymous'])}  total {_fmt_bytes(r['total'])}  {fits}"
              f"{'  (own format)' if fmt == own else ''}")
    print("\nBuild")
    for k, v in build_info().items():
        print(f"  {k:<14} {v}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run bench/bench_<suite>.py's main() from a source checkout (bench/ is not installed)."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench",
                        f"bench_{args.suite}.py")
    if not os.path.exists(path):
        raise SystemExit(f"dsv3: {os.path.normpath(path)} not found (benchmarks run from a "
                         "source checkout)")
    spec = importlib.util.spec_from_file_location(f"bench_{args.suite}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(args.options)


def _tokenizer(directory: str, cfg: Config):
    """The checkpoint's tokenizer.json (Hugging Face, through the tokenizers package), else
    the byte tokenizer, which needs a byte vocabulary (vocab_size >= 256, as Config.small())."""
    from .tokenizer import Tokenizer
    try:
        tok = Tokenizer.from_pretrained(directory, bos_token_id=cfg.bos_token_id)
    except (ImportError, ValueError) as e:
        raise SystemExit(f"dsv3: {e}")
    if tok.kind == "byte" and cfg.vocab_size < 256:
        raise SystemExit(f"dsv3: this checkpoint's vocabulary ({cfg.vocab_size}) is not a byte "
                         "vocabulary and it has no tokenizer.json; give --prompt-ids instead")
    return tok


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np
    from .model import Model
    if not os.path.isdir(args.checkpoint):
        raise SystemExit(f"dsv3: checkpoint directory {args.checkpoint!r} not found")
    model = Model.from_pretrained(args.checkpoint, weights=args.weights)
    cfg = model.config
    tok = None
    if args.prompt_ids is not None:
        prompt = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
    else:
        tok = _tokenizer(args.checkpoint, cfg)
        prompt = tok.encode(args.prompt).tolist()
    eos = cfg.eos_token_id if args.eos_token_id is None else args.eos_token_id
    eos = None if eos is not None and eos < 0 else eos
    try:
        kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                  speculative=args.speculative, eos_token_id=eos,
                  num_draft_tokens=args.num_draft_tokens, cache_dtype=args.cache_dtype)
        from .tokenizer import TextStream
        stream = TextStream(tok, sys.stdout) if args.stream and tok is not None else None
        out = model.generate(np.array(prompt, np.int64), callback=stream, **kw)
        if stream is not None:
            stream.finish()
            print()
        else:
            print(tok.decode(out.tokens) if tok is not None else " ".join(map(str, out.tokens)))
    except (ValueError, IndexError, TypeError) as e:
        raise SystemExit(f"dsv3: {e}")
    if args.stats:
        s = out.stats
        print(f"\n[stats] new tokens {s['new_tokens']}, decode {s['tokens_per_second']:.1f} tok/s, "
              f"prompt {s['prompt_tokens']} tokens at {s['prompt_tokens_per_second']:.1f} tok/s, "
              f"main forwards {s['main_forwards']}, proposed {s['proposed']}, accepted "
              f"{s['accepted']}, acceptance rate {s['acceptance_rate']:.3f}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a model on the default corpus (or --data), save it, report validation loss."""
    import numpy as np
    from . import data as data_mod
    from .model import Model
    from .train import TrainConfig, Trainer
    if args.threads:
        from . import set_num_threads
        set_num_threads(args.threads)
    from .checkpoint import check_target
    par = _parallel(args)
    main = par is None or par.is_main
    check_target(args.out, "train --out")  # refuse a file / foreign directory before training
    cfg = load_config(args.config)
    tok = data_mod.ByteTokenizer()
    if cfg.vocab_size < tok.vocab_size:
        raise SystemExit(f"dsv3: the byte tokenizer needs vocab_size >= {tok.vocab_size}, "
                         f"config has {cfg.vocab_size}")
    ds = data_mod.load(args.data, seed=args.seed)
    # an EP rank builds only its routed experts (the same values as the full model's)
    model = Model(cfg, seed=args.seed, expert_shard=par.expert_shard if par else None)
    tc = TrainConfig(lr=args.lr, warmup_steps=min(args.warmup, max(0, args.steps - 1)),
                     schedule=args.schedule, precision=args.precision, batch_size=args.batch,
                     seq_len=args.seq, balance=args.balance, total_steps=max(1, args.steps),
                     eval_interval=args.eval_interval,
                     log_path=args.log or os.path.join(os.path.abspath(args.out) + ".log.jsonl"))
    trainer = Trainer(model, tc, parallel=par)
    if main:
        print(f"dsv3 train: {model.num_parameters():,} parameters, {len(ds):,} tokens "
              f"({'default corpus' if args.data is None else args.data}), precision "
              f"{args.precision}, {args.steps} steps of {args.batch}x{args.seq}"
              + (f", {par.size} processes (dp={par.dp}, ep={par.ep})" if par else ""),
              flush=True)
    try:
        trainer.fit(ds, args.steps, progress=not args.no_progress, checkpoint_dir=args.out,
                    checkpoint_interval=args.save_every)
        val = trainer.evaluate(ds, batches=8)
    except BaseException:
        if par is not None and par.size > 1:  # the others may wait for this rank: end them
            import traceback
            traceback.print_exc()
            _core_abort()
        raise
    base = ds.unigram_entropy()
    if main:
        print(f"saved to {args.out}\nvalidation loss {val:.4f} nats/token "
              f"(unigram baseline {base:.4f}, {val / base:.1%} of it)")
        if par is not None and par.ep > 1:
            st = trainer.expert_parallel_stats()
            print(f"expert parallel: {st['ranks_per_token']:.2f} ranks per token (rank 0), "
                  f"dispatch {st['dispatch_bytes']:,} B, combine {st['combine_bytes']:,} B sent")
    return 0


def _core_abort() -> None:
    from . import _core
    sys.stderr.flush()
    _core.mpi_abort(1)


def _launched_ranks() -> int:
    """Processes of this job as the MPI launcher announces them (1 outside mpirun)."""
    for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        if os.environ.get(k, "").isdigit():
            return int(os.environ[k])
    return 1


def _parallel(args: argparse.Namespace):
    """The parallel layout of --parallel (None: one process). Under mpirun without --parallel
    every rank would train the same model into the same --out: refused."""
    if args.parallel is None:
        n = _launched_ranks()
        if n > 1:
            raise ValueError(f"started as {n} MPI processes: pass --parallel (e.g. "
                             f"--parallel dp={n}) or run a single process")
        if args.fp8_dispatch:
            raise ValueError("--fp8-dispatch needs --parallel with ep > 1")
        return None
    from . import distributed
    par = distributed.init(args.parallel, fp8_dispatch=args.fp8_dispatch)
    if args.fp8_dispatch and par.ep == 1:
        raise ValueError("--fp8-dispatch needs ep > 1 in --parallel")
    return par


def main(argv: Optional[List[str]] = None) -> int:
    parser = _Parser(prog="python -m dsv3",
                                     description="dsv3: DeepSeek-V3 on the CPU")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="parameter counts, KV-cache sizes and build info")
    p.add_argument("path", nargs="?", default=None,
                   help="a config.json or checkpoint directory (overrides --config)")
    p.add_argument("--config", default="deepseek_v3",
                   help=f"preset ({', '.join(sorted(_PRESETS))}) or a path "
                        "(default: deepseek_v3)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("train", help="train a model (default: Config.small() on the Python "
                                     "standard library sources) and save it")
    p.add_argument("--config", default="small", help="preset or config.json (default: small)")
    p.add_argument("--steps", type=_int_in(0), default=300)
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp8"), default="fp32")
    p.add_argument("--balance", choices=("aux_free", "aux_loss", "none"), default="aux_free")
    p.add_argument("--batch", type=_int_in(1), default=8)
    p.add_argument("--seq", type=_int_in(1), default=256)
    p.add_argument("--lr", type=_float_in(0, lo_open=True), default=2e-3)
    p.add_argument("--warmup", type=_int_in(0), default=20)
    p.add_argument("--schedule", choices=("cosine", "constant", "linear"), default="cosine")
    p.add_argument("--data", default=None, help="a text file or directory (default: the Python "
                                                "standard library sources)")
    p.add_argument("--seed", type=_int_in(0), default=0)
    p.add_argument("--eval-interval", type=_int_in(0), default=100,
                   help="evaluate every N steps (0: only at the end)")
    p.add_argument("--save-every", type=_int_in(1), default=None,
                   help="also save every N steps (default: at the end only)")
    p.add_argument("--log", default=None, help="JSON-lines log (default: OUT.log.jsonl)")
    p.add_argument("--threads", type=_int_in(0), default=0, help="0: the default")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--parallel", default=None, metavar="dp=N,ep=M",
                   help="data/expert-parallel layout under mpirun (dp*ep = processes); "
                        "--batch stays the global batch, rank 0 writes")
    p.add_argument("--fp8-dispatch", action="store_true",
                   help="expert parallel: dispatch activations as FP8 E4M3 (1x128 tiles)")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("bench", help="run a benchmark suite from bench/ (e.g. fp8)")
    p.add_argument("suite", help="suite name: bench/bench_<suite>.py")
    p.add_argument("options", nargs=argparse.REMAINDER, help="passed to the suite")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("generate", help="generate text from a checkpoint (its tokenizer.json, "
                                        "else the byte vocabulary)")
    p.add_argument("checkpoint", help="a checkpoint directory (save_pretrained)")
    p.add_argument("--prompt", default="", help="prompt text (encoded with the checkpoint's "
                                                "tokenizer.json, else as UTF-8 bytes after BOS)")
    p.add_argument("--prompt-ids", default=None, help="prompt as token ids '1,2,3' instead")
    p.add_argument("--weights", choices=("auto", "fp8", "bf16", "fp32"), default="auto",
                   help="resident weight format (default auto: the checkpoint's own, so an "
                        "FP8 checkpoint runs FP8-resident, memory-mapped)")
    p.add_argument("--max-new-tokens", type=_int_in(0), default=64)
    p.add_argument("--temperature", type=_float_in(0), default=0.0,
                   help="0 = greedy (default)")
    p.add_argument("--top-k", type=_int_in(0), default=0, help="0 = off")
    p.add_argument("--top-p", type=_float_in(0, 1, lo_open=True), default=1.0)
    p.add_argument("--seed", type=_int_in(0), default=0)
    p.add_argument("--speculative", choices=["mtp"], default=None,
                   help="MTP speculative decoding")
    p.add_argument("--num-draft-tokens", type=_int_in(1), default=1)
    p.add_argument("--cache-dtype", choices=CACHE_DTYPES, default="float32",
                   help="KV cache storage (bfloat16: half the bytes, rows rounded to bf16)")
    p.add_argument("--eos-token-id", type=_int_in(-1), default=None,
                   help="stop token (default: the config's; -1 = none)")
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument("--no-stats", dest="stats", action="store_false",
                   help="do not print the stats line (stderr)")
    p.set_defaults(func=cmd_generate)
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return rc
    except BrokenPipeError:  # the reader went away (`... | head -1`): stop quietly
        _silence_stdout()
        return 128 + 13  # as a process killed by SIGPIPE
    except KeyboardInterrupt:
        print("dsv3: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, MemoryError, OverflowError, RuntimeError) as e:
        # a user error (bad argument, file, config): one line, no traceback
        print(f"dsv3: {_one_line(e)}", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so flushing what is left at exit cannot fail again."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError):
        pass


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    return msg


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``dsv3: <message> (see --help)``, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"dsv3: {self.prog}: {message} (see --help)\n")


if __name__ == "__main__":
    sys.exit(main())
