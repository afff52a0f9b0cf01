"""dsv3.Trainer: DeepSeek-V3's training recipe at small scale (semantics §2.4, §2.6, §3).

``Trainer.step`` runs the whole step in C++ with the GIL released (``csrc/model/train.h``):
forward + backward over ``grad_accum`` micro-batches, global-norm clipping, AdamW (decoupled
weight decay on matrices only, fp32 master weights, fp32 or bf16 moments), then the
aux-loss-free bias update. The linear layers' GEMMs run in ``precision``:

* ``"fp32"``  plain fp32.
* ``"bf16"``  GEMM operands rounded to bf16 (RNE), fp32 accumulation.
* ``"fp8"``   semantics §2.6: each linear layer's forward, input-grad and weight-grad GEMMs on E4M3
  operands tiled along that GEMM's inner dimension (1x128 activations/gradients, 128x128
  weights), fp32 promotion. Embedding, lm_head, router gate, norms and the attention core stay
  fp32 (they do not go through the linear layers' GEMMs).

Balancing (``TrainConfig.balance``):

* ``"aux_free"`` (DeepSeek-V3): bias updates with gamma = ``config.bias_update_speed`` AND the
  complementary sequence-wise balance loss with alpha = ``config.seq_aux_loss_alpha``, as the
  report uses both.
* ``"aux_loss"``: the sequence-wise loss only (alpha = ``TrainConfig.aux_loss_alpha`` or
  ``config.seq_aux_loss_alpha``); biases untouched.
* ``"none"``: neither.

MTP lambda is ``config.mtp_loss_weight`` (0 disables the MTP modules in training).

Parallel training (``Trainer(..., parallel=dsv3.distributed.init("dp=2,ep=2"))`` under
mpirun, :mod:`dsv3.distributed`): ``batch_size`` stays the GLOBAL batch; each rank steps on its
rows, the C++ step sums gradients and statistics over the world; rank 0 writes logs and
checkpoints. With ``ep > 1`` the Trainer makes its model an expert shard (:mod:`dsv3.model`:
only this EP rank's routed experts, their gradients and moments are held); ``save``,
``save_pretrained`` and ``full_state_dict`` gather the experts of the EP group (every rank
calls them) and write / return the ordinary full layout. The saves gather on rank 0 only, so
no other rank ever holds the whole model; ``full_state_dict`` returns it on every rank.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import _core, _memory
from ._args import integer, real
from ._files import temp_name
from .model import Model

SCHEDULES = ("cosine", "constant", "linear")
PRECISIONS = ("fp32", "bf16", "fp8")
BALANCES = ("aux_free", "aux_loss", "none")
MOMENT_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass
class TrainConfig:
    """Hyperparameters of a training run (everything :meth:`Trainer.save` needs to resume).

    ``lr`` is the peak learning rate: linear warmup over ``warmup_steps`` from lr/warmup to lr,
    then ``schedule`` down to ``min_lr`` at ``total_steps`` (cosine / linear; ``fit`` sets
    ``total_steps`` when it is None)."""
    lr: float = 1e-3
    warmup_steps: int = 0
    schedule: str = "cosine"
    betas: Tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    moment_dtype: str = "float32"
    precision: str = "fp32"
    balance: str = "aux_free"
    min_lr: float = 0.0
    total_steps: Optional[int] = None
    grad_accum: int = 1
    aux_loss_alpha: Optional[float] = None  # None: config.seq_aux_loss_alpha
    batch_size: int = 8
    seq_len: int = 256
    eval_interval: int = 100
    eval_batches: int = 4
    log_path: Optional[str] = None  # JSON lines, one per step (and per evaluation)

    def __post_init__(self) -> None:
        def bad(name, msg):
            raise ValueError(f"[TrainConfig] {name} {msg}, got {getattr(self, name)!r}")
        op = "TrainConfig"
        # numbers (numpy scalars too) -> float / int by _args' rules: finite, in range, ints
        # never floats (warmup_steps=2.5 is refused, not truncated)
        self.lr = real(self.lr, "lr", op, lo=0.0, lo_open=True)
        self.min_lr = real(self.min_lr, "min_lr", op, lo=0.0, hi=self.lr)
        self.eps = real(self.eps, "eps", op, lo=0.0, lo_open=True)
        self.weight_decay = real(self.weight_decay, "weight_decay", op, lo=0.0)
        self.grad_clip = real(self.grad_clip, "grad_clip (0: no clipping)", op, lo=0.0)
        if self.aux_loss_alpha is not None:
            self.aux_loss_alpha = real(self.aux_loss_alpha, "aux_loss_alpha", op, lo=0.0)
        if isinstance(self.betas, (str, bytes)) or not hasattr(self.betas, "__len__") \
                or len(self.betas) != 2:
            bad("betas", "must be two numbers in [0, 1)")
        self.betas = tuple(real(b, f"betas[{i}]", op, lo=0.0, hi=1.0, hi_open=True)
                           for i, b in enumerate(self.betas))
        self.warmup_steps = integer(self.warmup_steps, "warmup_steps", op)
        for name in ("grad_accum", "batch_size", "seq_len"):
            setattr(self, name, integer(getattr(self, name), name, op, lo=1))
        self.eval_interval = integer(self.eval_interval, "eval_interval (0: never)", op)
        self.eval_batches = integer(self.eval_batches, "eval_batches", op)
        if self.total_steps is not None:
            self.total_steps = integer(self.total_steps, "total_steps (or None)", op, lo=1)
        if self.schedule not in SCHEDULES:
            bad("schedule", f"must be one of {SCHEDULES}")
        if self.moment_dtype not in MOMENT_DTYPES:
            bad("moment_dtype", f"must be one of {MOMENT_DTYPES}")
        if self.precision not in PRECISIONS:
            bad("precision", f"must be one of {PRECISIONS}")
        if self.balance not in BALANCES:
            bad("balance", f"must be one of {BALANCES}")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        if self.total_steps is None:
            raise ValueError(f"[TrainConfig] schedule {self.schedule!r} needs total_steps "
                             "(Trainer.fit sets it)")
        span = max(1, self.total_steps - self.warmup_steps)
        p = min(1.0, (step - self.warmup_steps) / span)
        if self.schedule == "linear":
            return self.lr - (self.lr - self.min_lr) * p
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * p))

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


class Trainer:
    """``Trainer(model, TrainConfig(...))``; ``step(batch)``, ``fit(data, steps)``,
    ``save(dir)``, ``Trainer.load(dir)``."""

    def __init__(self, model: Model, config: Optional[TrainConfig] = None, parallel=None):
        if not isinstance(model, Model):
            raise TypeError(f"[Trainer] model must be a dsv3.Model, got {type(model).__name__}")
        self.model = model
        self.config = config if config is not None else TrainConfig()
        if not isinstance(self.config, TrainConfig):
            raise TypeError("[Trainer] config must be a dsv3.TrainConfig")
        model._refuse_training("Trainer")
        self.parallel = parallel
        if parallel is not None:  # every check before anything changes
            from .distributed import Parallel
            if not isinstance(parallel, Parallel):
                raise TypeError("[Trainer] parallel must come from dsv3.distributed.init(), got "
                                f"{type(parallel).__name__}")
            E = model.config.n_routed_experts or 0
            if parallel.ep > 1 and (E == 0 or E % parallel.ep):
                raise ValueError(f"[Trainer] ep={parallel.ep} must divide n_routed_experts "
                                 f"({E})")
            if self.config.batch_size % (parallel.size * self.config.grad_accum):
                raise ValueError(f"[Trainer] batch_size ({self.config.batch_size}, the global "
                                 f"batch) must be divisible by processes x grad_accum = "
                                 f"{parallel.size} x {self.config.grad_accum}")
        want, shard = getattr(parallel, "expert_shard", None), model.expert_shard
        if shard is not None and want != shard:
            raise ValueError(f"[Trainer] the model is an expert shard (routed experts of EP rank "
                             f"{shard[1]} of ep={shard[0]}): it trains only with a parallel "
                             f"layout putting this process at that EP rank, got "
                             f"{parallel!r}")
        _memory.trainer(model.config, self.config.moment_dtype == "bfloat16",
                        (want or shard or (1, 0))[0])  # moments of the shard an EP rank keeps
        if want is not None and shard is None:
            # an EP rank keeps only its routed experts, before any moment is allocated
            model._m.shard_experts(*want)
            model._set_info()
        self._t = _core.Trainer(model._m, self.config.moment_dtype == "bfloat16")
        if parallel is not None:
            _core.trainer_set_parallel(self._t, parallel._g, parallel.fp8_dispatch)
        self._data_state: Optional[Dict] = None  # restored into the dataset by fit()
        self.history: List[Dict[str, Any]] = []

    @property
    def step_count(self) -> int:
        """Optimizer steps applied so far."""
        return int(self._t.steps_done)

    def _options(self, lr: float) -> Dict[str, Any]:
        c, mc = self.config, self.model.config
        alpha = c.aux_loss_alpha if c.aux_loss_alpha is not None else mc.seq_aux_loss_alpha
        return dict(lr=lr, beta1=c.betas[0], beta2=c.betas[1], eps=c.eps,
                    weight_decay=c.weight_decay, grad_clip=c.grad_clip, grad_accum=c.grad_accum,
                    alpha=0.0 if c.balance == "none" else float(alpha),
                    mtp_weight=float(mc.mtp_loss_weight),
                    gamma=float(mc.bias_update_speed) if c.balance == "aux_free" else 0.0,
                    precision=c.precision)

    def step(self, batch: np.ndarray) -> Dict[str, Any]:
        """One optimizer step on int tokens (B, T+1). Returns loss, main, mtp, balance,
        grad_norm (before clipping), lr, expert_load int64 [moe blocks (main MoE layers, then
        MTP), n_routed], max_violation (mean over MoE blocks of max_i load_i/mean(load) - 1),
        tokens_per_second (B*T / wall time) and step (1-based). In parallel training ``batch``
        is the global batch (this rank trains on its rows) and ``time_split`` gives the
        step's seconds in compute, all-reduce and dispatch/combine (the collectives' time
        includes waiting for the slowest rank) and the bytes this rank sent. A non-finite loss or gradient
        raises FloatingPointError naming the step and leaves the model untouched."""
        arr = np.asarray(batch)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"[Trainer.step] batch must be an int array (B, T+1), got "
                             f"{arr.dtype} {arr.shape}")
        if arr.shape[1] < 2:
            raise ValueError(f"[Trainer.step] batch must hold at least 2 tokens per sequence "
                             f"(T+1 >= 2), got shape {arr.shape}")
        V = self.model.config.vocab_size
        if arr.size and (arr.min() < 0 or arr.max() >= V):
            bad = arr.max() if arr.max() >= V else arr.min()
            raise ValueError(f"[Trainer.step] token id {int(bad)} is out of range "
                             f"[0, vocab_size={V})")
        global_rows = arr.shape[0]
        par = self.parallel
        if par is not None:  # every rank checked the whole global batch above: all agree
            par.check_batch(global_rows, self.config.grad_accum, "Trainer.step")
            arr = arr[par.local_rows(global_rows)]
        _memory.activations("Trainer.step", self.model.config, arr, "grad", self.config.grad_accum)
        n = self.step_count
        lr = self.config.lr_at(n)
        comm0 = par.stats() if par is not None else None
        t0 = time.perf_counter()
        try:
            st = self._t.step(np.ascontiguousarray(arr, dtype=np.int64), self._options(lr), n)
        except _core.NonFiniteError as e:  # a kernel's finiteness check (e.g. the MoE input)
            raise FloatingPointError(f"[Trainer.step] non-finite values at step {n + 1}: {e}; "
                                     "the update was not applied") from e
        dt = time.perf_counter() - t0
        ar, ar_wait = st.pop("allreduce_seconds"), st.pop("allreduce_wait_seconds")
        disp = st.pop("dispatch_seconds")
        if not st.pop("finite"):
            raise FloatingPointError(
                f"[Trainer.step] non-finite loss or gradient at step {n + 1} (loss={st['loss']},"
                f" grad_norm={st['grad_norm']}); the update was not applied")
        if comm0 is not None:  # this step's time split (seconds)
            comm = {k: v - comm0[k] for k, v in par.stats().items()}
            # the gradient all-reduce runs on the communication thread, mostly during the
            # backward: only the time the step waited for it is off the compute path; the
            # layers' dispatch/combine time includes queueing behind those all-reduces
            st["time_split"] = {
                "step": dt, "all_reduce": ar, "all_reduce_waited": ar_wait,
                "all_reduce_hidden_fraction": max(0.0, 1 - ar_wait / ar) if ar > 0 else 0.0,
                "dispatch_combine": disp,
                "compute": dt - ar_wait - disp,
                "all_reduce_bytes": comm["allreduce_bytes"],
                "dispatch_combine_bytes": comm["alltoall_bytes"]}
        load = st["expert_load"]
        vios = [float(r.max() / r.mean() - 1) for r in load if r.mean() > 0]
        st.update(lr=lr, step=n + 1, tokens_per_second=global_rows * (arr.shape[1] - 1) / dt,
                  max_violation=float(np.mean(vios)) if vios else 0.0)
        return st

    @property
    def is_main(self) -> bool:
        """True on the process that writes logs and checkpoints (rank 0, or no parallel)."""
        return self.parallel is None or self.parallel.is_main

    def expert_parallel_stats(self) -> Dict[str, float]:
        """Expert-parallel statistics of this rank since the start: tokens routed, mean
        distinct owner ranks per token, dispatch / combine bytes sent to other ranks."""
        d = dict(_core.trainer_ep_stats(self._t))
        d["ranks_per_token"] = d["rank_visits"] / d["tokens"] if d["tokens"] else 0.0
        return d

    def moments(self) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
        """AdamW's (m, v) by parameter name, as float32 (decoded from bf16 when stored so);
        an expert shard's own parameters only (``save`` writes the gathered full moments)."""
        m, v = self._t.moments()
        if m.dtype == np.uint16:
            m, v = [(a.astype(np.uint32) << 16).view(np.float32) for a in (m, v)]
        shapes = self.model.parameter_shapes()
        out, trainable = ({}, {}), set(self.model.trainable_names())
        for name, off, size in self._t.entries():
            if name in trainable:
                for d, a in zip(out, (m, v)):
                    d[name] = a[off:off + size].reshape(shapes[name])
        return out

    # ------------------------------------------------------------------ evaluation and fit
    def evaluate(self, data, batches: Optional[int] = None) -> float:
        """Mean main (next-token) loss over the dataset's held-out batches."""
        c = self.config
        vb = data.val_batches(c.batch_size, c.seq_len, batches or c.eval_batches)
        if not vb:
            return float("nan")
        if self.model.expert_shard is not None:  # through the EP group (every rank evaluates)
            return float(np.mean([self._t.eval_loss(np.ascontiguousarray(b, dtype=np.int64),
                                                    0.0, 0.0)["main"] for b in vb]))
        return float(np.mean([self.model.loss(b, alpha=0.0, mtp_weight=0.0)["main"]
                              for b in vb]))

    def fit(self, data, steps: int, progress: bool = True,
            checkpoint_dir: Optional[str] = None, checkpoint_interval: Optional[int] = None,
            log_path: Optional[str] = None) -> List[Dict[str, Any]]:
        """Train ``steps`` more steps on ``data`` (a :class:`dsv3.data.TokenDataset`) with
        batches of ``config.batch_size`` x (``config.seq_len`` + 1). Evaluates on the held-out
        split every ``config.eval_interval`` steps and at the end, logs every step as a JSON
        line to ``log_path`` (or ``config.log_path``), saves to ``checkpoint_dir`` every
        ``checkpoint_interval`` steps and at the end. Ctrl-C stops cleanly after saving a
        checkpoint (when ``checkpoint_dir`` is given). Returns this call's records."""
        c = self.config
        if steps < 0:
            raise ValueError(f"[Trainer.fit] steps must be >= 0, got {steps}")
        if checkpoint_dir:  # refuse a file / foreign directory before training, not after
            from . import checkpoint
            checkpoint.check_target(os.fspath(checkpoint_dir), "Trainer.fit")
        if c.total_steps is None:
            c.total_steps = max(1, self.step_count + steps)
        if self._data_state is not None:
            data.load_state_dict(self._data_state)
            self._data_state = None
        self._data = data
        log_path = (log_path or c.log_path) if self.is_main else None
        progress = progress and self.is_main
        if log_path:
            os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        log = open(log_path, "a", encoding="utf-8") if log_path else None
        bar = _progress(steps, progress)
        records: List[Dict[str, Any]] = []
        try:
            for _ in range(steps):
                st = self.step(data.batch(c.batch_size, c.seq_len))
                rec = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in st.items()}
                if c.eval_interval and st["step"] % c.eval_interval == 0:
                    rec["val_loss"] = self.evaluate(data)
                records.append(rec)
                if log:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                if bar is not None:  # postfix without a redraw: update() redraws at its interval
                    bar.set_postfix(loss=f"{st['loss']:.3f}", tok_s=f"{st['tokens_per_second']:.0f}",
                                    refresh=False)
                    bar.update(1)
                if checkpoint_dir and checkpoint_interval and st["step"] % checkpoint_interval == 0:
                    self.save(checkpoint_dir)
        except KeyboardInterrupt:
            if self.parallel is not None and self.parallel.size > 1:
                # each rank is interrupted at its own point (possibly inside a step's
                # collectives): a save now would pair mismatched collectives, so the job ends
                # (the uncaught interrupt aborts it); the last periodic checkpoint stays
                raise
            if checkpoint_dir:
                self.save(checkpoint_dir)
            print(f"\ninterrupted at step {self.step_count}"
                  + (f"; checkpoint saved to {checkpoint_dir}" if checkpoint_dir else ""),
                  file=sys.stderr)
            records.append({"interrupted": True, "step": self.step_count})
            self.history.extend(records)
            return records
        finally:
            if bar is not None:
                bar.close()
            if log:
                log.close()
        if checkpoint_dir:
            self.save(checkpoint_dir)
        self.history.extend(records)
        return records

    # ------------------------------------------------------------------ checkpoints
    def full_state_dict(self) -> Dict[str, np.ndarray]:
        """The whole model's ``{name: float32}`` (an expert shard gathers the other EP ranks'
        experts: every rank must call it; else ``model.state_dict()``)."""
        if self.model.expert_shard is None:
            return self.model.state_dict()
        return _core.trainer_full_state(self._t)

    def save_pretrained(self, directory: str, dtype: str = "float32", **kw) -> None:
        """``Model.save_pretrained`` of the whole model from any parallel layout: every rank
        calls it, rank 0 writes the ordinary Hugging Face layout."""
        from . import checkpoint
        # an expert shard's experts are gathered on rank 0 only (the others send theirs)
        state = (_core.trainer_full_state(self._t, to_main=True)
                 if self.model.expert_shard is not None else None)
        self._on_main(lambda: checkpoint.save(
            _Frozen(self.model.config, state) if state is not None else self.model,
            directory, dtype, **kw), directory, "Trainer.save_pretrained")

    def _on_main(self, write, directory: str, op: str) -> None:
        """write() on rank 0; its success is told to every rank (an error raises on all)."""
        if self.parallel is None:
            write()
            return
        error = None
        if self.parallel.is_main:
            try:
                write()
            except BaseException as e:  # told to every rank below, then raised here
                error = e
        ok = np.array([int(self.parallel.is_main and error is None)], dtype=np.int64)
        self.parallel.allreduce_sum(ok)  # also the barrier: rank 0 has finished
        if error is not None:
            raise error
        if ok[0] != 1:
            raise OSError(f"[{op}] rank 0 failed to save {directory!r} (its error is on its "
                          "stderr)")

    def save(self, directory: str) -> None:
        """Write model (``save_pretrained`` float32 files at the top level, so
        ``Model.from_pretrained(directory)`` works), optimizer moments, step, train config and
        the data generator state. Atomic: everything goes to a temporary directory that
        replaces ``directory`` in one step (:func:`dsv3.checkpoint.publish_dir`). Weights,
        moments and step count are copied at one moment (no step of another thread in
        between: a step running at that moment raises RuntimeError here)."""
        # rank 0 writes (the replicas are identical); an expert shard's snapshot gathers the
        # EP group's experts and moments on rank 0 (every rank takes part; only rank 0 ever
        # holds the whole model)
        snap = self._t.snapshot(True) if self.model.expert_shard is not None else None
        self._on_main(lambda: self._save(directory, snap), directory, "Trainer.save")

    def _save(self, directory: str, snap=None) -> None:
        from . import checkpoint
        directory = os.fspath(directory)
        parent = os.path.dirname(os.path.abspath(directory))
        checkpoint.check_target(directory, "Trainer.save")
        os.makedirs(parent, exist_ok=True)
        stem = f".{os.path.basename(os.path.abspath(directory))}.trainer"
        checkpoint.sweep_temps(directory)  # left by saves killed midway
        tmp = temp_name(os.path.join(parent, stem))
        try:
            inner = os.path.join(tmp, "model")
            os.makedirs(tmp)
            params, m, v, step = snap if snap is not None else self._t.snapshot()
            checkpoint.save(_Frozen(self.model.config, params), inner, "float32")
            for f in os.listdir(inner):
                os.rename(os.path.join(inner, f), os.path.join(tmp, f))
            os.rmdir(inner)
            np.save(os.path.join(tmp, "optimizer_m.npy"), m)
            np.save(os.path.join(tmp, "optimizer_v.npy"), v)
            data = getattr(self, "_data", None)
            state = {"format": "dsv3.trainer/1", "step": step,
                     "train_config": self.config.to_dict(),
                     "data_state": _jsonable(data.state_dict()) if data is not None
                     else self._data_state}
            with open(os.path.join(tmp, "trainer.json"), "w", encoding="utf-8") as f:
                json.dump(state, f, indent=2)
            checkpoint.fsync_tree(tmp)
            checkpoint.publish_dir(tmp, directory)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, directory: str, parallel=None) -> "Trainer":
        """A Trainer restored from :meth:`save`: continuing it gives bit-identically the run
        that was never interrupted (pass the same dataset to ``fit``; its generator state is
        restored)."""
        from . import checkpoint
        directory = os.fspath(directory)
        state, cfg, stored, moments = checkpoint.read_snapshot(
            directory, "Trainer.load", lambda fd: _read_trainer_at(directory, fd))
        shard = getattr(parallel, "expert_shard", None)  # an EP rank takes only its experts
        model = checkpoint.build(cfg, stored, directory, Model, strict=False, expert_shard=shard)
        t = cls(model, TrainConfig(**state["train_config"]), parallel=parallel)
        t._t.set_moments(*moments)
        t._t.steps_done = int(state["step"])
        t._data_state = state.get("data_state")
        return t


def _read_trainer_at(directory: str, dir_fd: int):
    """(trainer.json, config, stored tensors, [m, v]) of the trainer checkpoint open as
    ``dir_fd``: every file from that one directory (a save swapping in another one meanwhile
    cannot pair these weights with its moments)."""
    from . import checkpoint
    with checkpoint.open_member(directory, dir_fd, "trainer.json", "Trainer.load") as f:
        state = json.load(f)
    cfg, stored = checkpoint.read_at(directory, dir_fd)
    moments = []
    for name in ("optimizer_m.npy", "optimizer_v.npy"):
        with checkpoint.open_member(directory, dir_fd, name, "Trainer.load", binary=True) as f:
            try:
                moments.append(np.load(f))
            except ValueError as e:  # object arrays (pickles), damaged headers
                raise ValueError(f"[Trainer.load] {name[:-4]} in {directory}: {e}") from None
    return state, cfg, stored, moments


class _Frozen:
    """What :func:`dsv3.checkpoint.save` reads of a model (config, state_dict), from a
    snapshot."""

    def __init__(self, config, params: Dict[str, np.ndarray]):
        self.config, self._params = config, params

    def state_dict(self) -> Dict[str, np.ndarray]:
        return self._params


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (np.integer,)):
        return int(d)
    return d


def _progress(total: int, enabled: bool):
    """A tqdm bar, or None without tqdm. The notebook widget bar only when ipywidgets is there
    (else tqdm.auto warns and falls back anyway); off a terminal (notebooks, logs) the text bar
    refreshes every few seconds so saved outputs stay short."""
    if not enabled:
        return None
    try:
        import tqdm as _tqdm  # noqa: F401  (optional dependency)
    except ImportError:
        return None
    try:
        import ipywidgets  # noqa: F401
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm import tqdm
    interval = 0.1 if sys.stderr.isatty() else 5.0
    return tqdm(total=total, unit="step", dynamic_ncols=True, mininterval=interval)
