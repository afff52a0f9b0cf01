"""Hugging Face-style checkpoints: ``config.json`` + safetensors (sharded above a size limit).

``save(model, dir, dtype)`` writes float32, bfloat16, or DeepSeek-V3's FP8 layout: the linear
weights (attention projections, dense MLP, experts, shared experts, eh_proj) as E4M3 codes
with a float32 ``<name>_scale_inv`` per 128x128 block (``w = q * scale_inv``), everything else
(embedding, head, router gate, norms, eh_proj) in bfloat16 and the gates' correction biases
in float32, as in the released checkpoint. ``load(dir)`` reads any of these, and DeepSeek-V3's own files (the copies of the
embedding and head that its MTP layer carries are accepted and ignored: dsv3 shares them).

Hugging Face fidelity: ``config.json`` always carries ``model_type`` / ``architectures`` and one
storage-dtype key, so ``transformers.AutoModelForCausalLM`` opens what dsv3 writes. With
``rope_interleave: false`` the q/k rope rows in the files hold halves ``(x_i, x_{i+d/2})``;
they are permuted to dsv3's adjacent pairs when loading and back when saving (q_pe and k_pe
get the same permutation, so every score is unchanged). ``quantization_config.scale_fmt:
"ue8m0"`` (DeepSeek-V3.1) means power-of-two weight scales: checked when loading, produced when
saving FP8. A config declaring MTP layers whose tensors are all absent (transformers saves
none) loads with MTP disabled and a warning, unless ``strict=True``.

Crash safety: everything is written into a fresh temporary directory next to the target
(``.<name>.tmp-<pid>-<hex>``; a trainer's ``.<name>.trainer.tmp-<pid>-<hex>``), fsync'ed, then
swapped in with one atomic rename (``renameat2(RENAME_EXCHANGE)`` on Linux when the target
exists; without it two renames, the previous checkpoint moved aside as
``.<name>.dsv3-old-<pid>-<hex>`` in between). An interrupted save leaves the previous
checkpoint intact under the final name and never a partial one; the temporaries of saves
whose process died are swept by the next save into the same target (a moved-aside previous
checkpoint is put back when the target is missing), and only those names, of dead pids.

Concurrency: publishing into a target holds an exclusive ``fcntl.flock`` on
``<parent>/.<name>.dsv3-lock`` (:func:`publish_lock`; a waiter gives up with RuntimeError
after LOCK_TIMEOUT = 60 s; the holder deletes the file before releasing it), so concurrent
saves (threads or processes) publish one at a time and the last one wins whole. Readers take
no lock: :func:`read_snapshot` opens the directory once and every file relative to that
descriptor, so they read one checkpoint or the other, never a mix; when a save deletes the
directory being read before every file was opened (:class:`ChangedWhileReading`), reading
starts again on the new one, up to LOAD_ATTEMPTS = 3 times, then raises it.
``Model.from_pretrained`` and ``Trainer.load`` both read this way.

Refusals (``ValueError``): saving over a file or a non-empty directory that is not a dsv3
checkpoint (:func:`check_target`, before anything is written); loading NaN / Inf in any
weight, FP8 scale or FP8 code (checked once per decoded tensor: the model would otherwise
propagate NaN into every logit), duplicate tensor names, shard files outside the directory.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import re
import shutil
import time
import warnings
from typing import Dict, Optional, Tuple

import numpy as np

from . import hf_keys
from . import safetensors_io as st
from ._files import ChangedWhileReading, dir_replaced, open_dir, open_regular, temp_name
from .config import Config

DTYPES = ("float32", "bfloat16", "fp8")
DEFAULT_SHARD_BYTES = 4 << 30
FP8_BLOCK = (128, 128)


def is_fp8_linear(name: str, shape: Tuple[int, ...]) -> bool:
    """The tensors DeepSeek's FP8 checkpoint quantizes: the 2-D projection weights of the
    attention, dense MLPs and experts. Not the embedding, the output head, the router gate or
    the MTP module's eh_proj (a plain linear layer in the engines that load the release)."""
    if len(shape) != 2 or not name.endswith(".weight"):
        return False
    if name.endswith("mlp.gate.weight"):
        return False
    return ".self_attn." in name or ".mlp." in name


def stored_dtype(name: str, shape: Tuple[int, ...], dtype: str) -> str:
    """The safetensors dtype a save of ``dtype`` gives tensor ``name``: "F32", "BF16" or
    "F8_E4M3" (with a ``<name>_scale_inv`` F32 beside it)."""
    if dtype == "float32" or name.endswith("e_score_correction_bias"):
        # the correction bias moves in steps of gamma = 1e-3, finer than bf16 resolves
        # near 1, so it is kept in float32 in every dtype (as in DeepSeek's release)
        return "F32"
    if dtype == "bfloat16" or not is_fp8_linear(name, shape):
        return "BF16"
    return "F8_E4M3"


def encode_state(state: Dict[str, np.ndarray], dtype: str,
                 pow2_scale: bool = False) -> Dict[str, Tuple[str, np.ndarray]]:
    """{name: float32} -> {stored name: (safetensors dtype, stored array)}; ``pow2_scale``:
    FP8 block scales rounded up to powers of two (UE8M0)."""
    if dtype not in DTYPES:
        raise ValueError(f"[save_pretrained] dtype must be one of {DTYPES}, got {dtype!r}")
    out: Dict[str, Tuple[str, np.ndarray]] = {}
    for name, w in state.items():
        stored = stored_dtype(name, w.shape, dtype)
        if stored == "F32":
            out[name] = ("F32", w)
        elif stored == "BF16":
            out[name] = ("BF16", st.bf16_bits(w))
        else:
            from . import fp8
            codes, scales = fp8.quantize(w, "e4m3", block=FP8_BLOCK, pow2_scale=pow2_scale)
            out[name] = ("F8_E4M3", codes)
            out[name + "_scale_inv"] = ("F32", scales)
    return out


def decode_tensors(tensors: Dict[str, st.Tensor], directory: str,
                   block: Tuple[int, int] = FP8_BLOCK,
                   pow2_scale: bool = False) -> Dict[str, np.ndarray]:
    """Stored tensors -> {name: float32}, dequantizing FP8 weights with their scale_inv per
    ``block`` (the config's weight_block_size); ``pow2_scale``: every scale must be a power of
    two (quantization_config.scale_fmt "ue8m0")."""
    from . import fp8
    block = tuple(block)
    out: Dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            if name[:-len("_scale_inv")] not in tensors:
                raise ValueError(f"[from_pretrained] {directory}: '{name}' has no weight")
            continue
        if t.dtype in ("F8_E4M3", "F8_E5M2"):
            sname = name + "_scale_inv"
            if sname not in tensors:
                raise ValueError(f"[from_pretrained] {directory}: FP8 tensor '{name}' has no "
                                 f"'{sname}'")
            codes = np.ascontiguousarray(t.data)
            scales = tensors[sname].to_float32()
            want = tuple(-(-d // b) for d, b in zip(codes.shape, block))
            if codes.ndim != 2 or scales.shape != want:
                raise ValueError(f"[from_pretrained] {directory}: '{sname}' has shape "
                                 f"{scales.shape}, expected {want} for {block[0]}x{block[1]} "
                                 f"blocks of '{name}' {codes.shape}")
            if pow2_scale and not np.all(np.frexp(scales)[0] == 0.5):
                raise ValueError(f"[from_pretrained] {directory}: '{sname}' holds scales that "
                                 "are not powers of two, but quantization_config.scale_fmt is "
                                 "'ue8m0'")
            _require_finite(scales, sname, directory)
            fmt = "e4m3" if t.dtype == "F8_E4M3" else "e5m2"
            out[name] = fp8.dequantize(codes, scales, block, fmt=fmt)
        elif t.dtype in ("F32", "F16", "BF16", "F64"):
            out[name] = t.to_float32()
        else:
            raise ValueError(f"[from_pretrained] {directory}: tensor '{name}' has dtype "
                             f"{t.dtype}, expected a float type")
        _require_finite(out[name], name, directory)
    return out


def _require_finite(x: np.ndarray, name: str, directory: str) -> None:
    """Loading refuses NaN / Inf weights and scales (they would propagate into every logit and
    generate would emit token 0 forever): one vectorised pass over the decoded float32."""
    if not np.isfinite(x).all():
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        raise ValueError(f"[from_pretrained] {directory}: tensor '{name}' holds {bad} NaN or "
                         "infinite value(s); refusing to load it")


def rope_rows(cfg: Config) -> Dict[str, np.ndarray]:
    """{tensor name suffix: row indices of its rope part, (n_heads, d)}: the q_pe rows of every
    head of q_b_proj / q_proj, the k_pe rows of kv_a_proj_with_mqa (MLA) or of every kv head
    of k_proj (mha / gqa baselines)."""
    dqk, dn, dr = cfg.qk_head_dim, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    heads = lambda n: np.arange(n)[:, None] * dqk + dn + np.arange(dr)[None, :]
    q = "q_b_proj" if cfg.uses_q_lora and cfg.attention_type == "mla" else "q_proj"
    rows = {f"self_attn.{q}.weight": heads(cfg.num_attention_heads)}
    if cfg.attention_type == "mla":
        rows["self_attn.kv_a_proj_with_mqa.weight"] = cfg.kv_lora_rank + np.arange(dr)[None, :]
    else:
        rows["self_attn.k_proj.weight"] = heads(cfg.kv_heads)
    return rows


def permute_rope(state: Dict[str, np.ndarray], cfg: Config, to_pairs: bool) -> Dict[str, np.ndarray]:
    """Reorder the rope rows of every layer between halves ``(x_i, x_{i+d/2})`` (a
    ``rope_interleave: false`` checkpoint) and dsv3's adjacent pairs ``(x_2i, x_2i+1)``.
    ``to_pairs``: halves -> pairs (loading), else pairs -> halves (saving). Returns a new dict;
    the arrays it changes are copies."""
    d = cfg.qk_rope_head_dim
    perm = np.arange(d).reshape(2, d // 2).T.ravel()  # pairs[k] = halves[perm[k]]
    if not to_pairs:
        perm = np.argsort(perm)
    out = dict(state)
    for suffix, rows in rope_rows(cfg).items():
        for name, w in state.items():
            if name.endswith("." + suffix):
                w = w.copy()
                w[rows.ravel()] = state[name][rows[:, perm].ravel()]
                out[name] = w
    return out


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str) -> None:
    """fsync every file of a directory and the directory itself (before publishing it)."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(directory)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def is_checkpoint_dir(directory: str) -> bool:
    """A dsv3 (Hugging Face layout) checkpoint: config.json and the model's safetensors."""
    has = lambda f: os.path.isfile(os.path.join(directory, f))
    return has("config.json") and (has("model.safetensors") or
                                   has("model.safetensors.index.json"))


def check_target(directory: str, who: str) -> None:
    """Saving may replace only a checkpoint: ``directory`` must be absent, an empty
    directory, or a dsv3 checkpoint. A file or any other non-empty directory raises
    ValueError before anything is written (no user data is ever replaced or deleted). So does
    a symlink, even to a checkpoint: publishing renames over the name, which would replace
    the link rather than write where it points; save to its target instead.

    A concurrent dsv3 save can be mid-publish while we look (between the two renames of the
    fallback path the name is briefly absent, and the old directory is being deleted), so a
    failing first look is repeated under :func:`publish_lock`, where no dsv3 publish of this
    directory is in progress; only that second answer raises."""
    if _target_problem(directory) is None:
        return
    try:
        with publish_lock(directory):
            problem = _target_problem(directory)
    except OSError:  # the lock cannot be taken (read-only parent, ...): the first answer
        problem = _target_problem(directory)
    if problem is not None:
        raise ValueError(f"[{who}] {directory} {problem}")


def _target_problem(directory: str):
    """Why ``directory`` may not be replaced by a save (the end of a sentence), or None."""
    try:
        if not os.path.lexists(directory):
            return None
        if os.path.islink(directory):
            return (f"is a symlink (to {os.readlink(directory)}); refusing to save through it: "
                    "save to the directory it names instead")
        if not os.path.isdir(directory):
            return "exists and is not a directory; refusing to replace it"
        if os.listdir(directory) and not is_checkpoint_dir(directory):
            return ("is a non-empty directory that is not a dsv3 checkpoint (no config.json + "
                    "model.safetensors); refusing to replace it")
    except FileNotFoundError:  # it vanished while we looked: a concurrent publish
        return None
    return None


LOCK_TIMEOUT = 60.0  # seconds a save waits for another save's publish into the same target


@contextlib.contextmanager
def publish_lock(directory: str):
    """Hold the exclusive lock of ``directory``'s publishes: ``fcntl.flock`` on
    ``<parent>/.<name>.dsv3-lock``, so concurrent savers (threads or processes) publish one at
    a time. Blocks up to LOCK_TIMEOUT seconds, then RuntimeError. The holder deletes the lock
    file before releasing it (nothing is left behind); a waiter that then acquires the
    deleted file notices (it is no longer the file at the path) and tries again."""
    parent = os.path.dirname(os.path.abspath(directory))
    path = os.path.join(parent, f".{os.path.basename(os.path.abspath(directory))}.dsv3-lock")
    deadline = time.monotonic() + LOCK_TIMEOUT
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() > deadline:
                raise RuntimeError(f"[save] another save into {directory} is in progress (its "
                                   f"lock {path} is held for over {LOCK_TIMEOUT:.0f} s)") from None
            time.sleep(0.005)
            continue
        mine = os.fstat(fd)
        try:
            now = os.stat(path)
            if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # we locked a file the previous holder had already deleted
    try:
        yield
    finally:
        os.unlink(path)
        os.close(fd)


def publish_dir(tmp: str, directory: str) -> None:
    """Make the finished directory ``tmp`` appear at ``directory`` in one atomic step, under
    :func:`publish_lock`. Concurrent publishers of one directory take turns (the last one
    wins); a reader sees one complete checkpoint or the other."""
    with publish_lock(directory):
        _sweep_old(directory)
        _publish_locked(tmp, directory)


def _publish_locked(tmp: str, directory: str) -> None:
    parent = os.path.dirname(os.path.abspath(directory))
    try:
        os.rename(tmp, directory)  # succeeds when `directory` is absent (or an empty dir)
        _fsync_dir(parent)
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if _exchange(tmp, directory):  # tmp now holds what was at `directory`
        if not _replaceable(tmp):
            if _exchange(tmp, directory):  # put it back; the saver then deletes our tmp
                raise _not_replaced(directory)
            kept = f"{directory}.kept-by-dsv3-{os.getpid()}"  # never deleted
            os.rename(tmp, kept)
            raise ValueError(f"[save] {directory} became a directory that is not a dsv3 "
                             f"checkpoint while saving; it was moved to {kept}")
        shutil.rmtree(tmp)
    else:  # no atomic exchange: two renames (a crash between them leaves OLD_KIND behind,
        # which the next save into `directory` restores or deletes: _sweep_old)
        old = temp_name(os.path.join(parent, "." + os.path.basename(os.path.abspath(directory))),
                        OLD_KIND)
        os.rename(directory, old)
        if not _replaceable(old):
            os.rename(old, directory)
            raise _not_replaced(directory)
        try:
            os.rename(tmp, directory)
        except BaseException:
            os.rename(old, directory)  # the previous checkpoint stays where it was
            raise
        shutil.rmtree(old)
    _fsync_dir(parent)


def _replaceable(old: str) -> bool:
    """What a publish took from the target may be deleted only if it is a checkpoint or an
    empty directory: :func:`check_target` ran before the save, and anything could have been
    put there since (no user data is ever deleted)."""
    return os.path.isdir(old) and not os.path.islink(old) and \
        (is_checkpoint_dir(old) or not os.listdir(old))


def _not_replaced(directory: str) -> ValueError:
    return ValueError(f"[save] {directory} became a non-empty directory that is not a dsv3 "
                      "checkpoint while saving (another program wrote there); left it as it "
                      "is, nothing was replaced")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead(pid: str) -> bool:
    """``pid`` (the text of a temporary's name) names a process that no longer runs."""
    return pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid))


def remove_stale_temps(parent: str, prefix: str) -> None:
    """Delete temporary directories left by saves whose process died (kill -9, power loss)."""
    for name in os.listdir(parent):
        if name.startswith(prefix):
            pid = name[len(prefix):].split("-")[0]  # temp_name: <prefix><pid>-<random>
            if _dead(pid):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def sweep_temps(directory: str) -> None:
    """The temporaries that saves (model or trainer) into ``directory`` left when their
    process died: :func:`remove_stale_temps` of both name patterns."""
    parent = os.path.dirname(os.path.abspath(directory))
    base = os.path.basename(os.path.abspath(directory))
    for prefix in (f".{base}.tmp-", f".{base}.trainer.tmp-"):
        remove_stale_temps(parent, prefix)


OLD_KIND = "dsv3-old"  # temp_name kind of what the two-rename publish moved aside


def _sweep_old(directory: str) -> None:
    """Under the publish lock: the previous checkpoints that two-rename publishes of
    ``directory`` moved aside (``.<name>.dsv3-old-<pid>-<hex>``; ``<name>.old.tmp-<pid>-<hex>``
    from earlier versions) and whose process died before deleting them. When ``directory``
    is absent (the process died between its two renames) the newest is put back there;
    the others are deleted. Only dsv3's own names of dead processes, and only checkpoints or
    empty directories, are touched."""
    parent = os.path.dirname(os.path.abspath(directory))
    base = re.escape(os.path.basename(os.path.abspath(directory)))
    pattern = re.compile(rf"\.{base}\.{OLD_KIND}-(\d+)-[0-9a-f]{{8}}"
                         rf"|{base}\.old\.tmp-(\d+)-[0-9a-f]{{8}}")
    found = []
    for name in os.listdir(parent):
        m = pattern.fullmatch(name)
        path = os.path.join(parent, name)
        if m and _dead(m.group(1) or m.group(2)) and _replaceable(path):
            found.append((os.stat(path).st_mtime, path))
    for _, path in sorted(found, reverse=True):
        if not os.path.lexists(directory) and is_checkpoint_dir(path):
            os.rename(path, directory)
        else:
            shutil.rmtree(path, ignore_errors=True)


def checkpoint_config(config: Config, dtype: str, rope_format: str = "both") -> Dict:
    """The config.json dict of a checkpoint of ``dtype``: the quantization_config of its FP8
    layout (keeping the model's scale_fmt) or none, and one dtype key."""
    cfg = config.to_dict(rope_format)
    qc = config.quantization_config or {}
    cfg.pop("quantization_config", None)
    if dtype == "fp8":
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                      "quant_method": "fp8",
                                      "weight_block_size": list(FP8_BLOCK)}
        if qc.get("scale_fmt") is not None:
            cfg["quantization_config"]["scale_fmt"] = qc["scale_fmt"]
    hf_keys.write_dtype(cfg, "float32" if dtype == "float32" else "bfloat16", rope_format)
    return cfg


def save(model, directory: str, dtype: str = "float32",
         max_shard_bytes: int = DEFAULT_SHARD_BYTES, rope_format: str = "both") -> None:
    directory = os.fspath(directory)
    if dtype not in DTYPES:
        raise ValueError(f"[save_pretrained] dtype must be one of {DTYPES}, got {dtype!r}")
    check_target(directory, "save_pretrained")
    config = model.config
    cfg = checkpoint_config(config, dtype, rope_format)
    why = hf_keys.transformers_mismatch(config.to_canonical_dict())
    if why is not None:
        warnings.warn(f"[save_pretrained] {directory}: written without model_type / "
                      f"architectures, so transformers' AutoModel refuses it instead of "
                      f"opening a different model ({why}); dsv3 reads it back as is",
                      UserWarning, stacklevel=3)
    state = model.state_dict()
    if not config.rope_interleave:
        state = permute_rope(state, config, to_pairs=False)
    pow2 = cfg.get("quantization_config", {}).get("scale_fmt") == "ue8m0"
    tensors = encode_state(state, dtype, pow2_scale=pow2)
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(os.path.abspath(directory))
    sweep_temps(directory)
    tmp = temp_name(os.path.join(parent, f".{base}"))
    os.makedirs(tmp)
    try:
        st.write_sharded(tmp, tensors, max_shard_bytes, metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        publish_dir(tmp, directory)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _without_absent_mtp(cfg: Config, names, directory: str, strict: bool) -> Config:
    """The config to build: MTP disabled (with a warning) when the config declares MTP layers
    and the files hold none of their tensors (transformers saves none); ``strict`` keeps it,
    so loading then fails naming the missing keys."""
    L, k = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    prefixes = tuple(f"model.layers.{i}." for i in range(L, L + k))
    if strict or not k or any(n.startswith(prefixes) for n in names):
        return cfg
    warnings.warn(f"[from_pretrained] {directory}: config.json declares "
                  f"num_nextn_predict_layers={k} but the checkpoint holds no MTP weights "
                  f"(model.layers.{L}.*): loaded the main model with MTP disabled "
                  "(strict=True raises instead)", UserWarning, stacklevel=5)
    return cfg.replace(num_nextn_predict_layers=0)


LOAD_ATTEMPTS = 3


def read_snapshot(directory: str, who: str, reader):
    """``reader(dir_fd)`` on one open descriptor of ``directory``: every file it opens
    relative to it (:func:`open_member`, ``st.read_dir(dir_fd=)``) comes from the same
    directory, the one that was at ``directory`` when it was opened, even while a concurrent
    save publishes another there. When that save deletes the old directory before every file
    was opened (:class:`ChangedWhileReading`), reading starts again on the new one, up to
    LOAD_ATTEMPTS times."""
    for attempt in range(LOAD_ATTEMPTS):
        fd = open_dir(directory, who)
        try:
            return reader(fd)
        except ChangedWhileReading:
            if attempt == LOAD_ATTEMPTS - 1:
                raise
        finally:
            os.close(fd)


def open_member(directory: str, dir_fd: int, name: str, who: str, binary: bool = False):
    """The regular file ``name`` of the checkpoint open as ``dir_fd`` (see
    :func:`read_snapshot`); FileNotFoundError naming it when absent, ChangedWhileReading
    when the directory was replaced meanwhile."""
    try:
        return open_regular(name, who, binary=binary, dir_fd=dir_fd,
                            shown=os.path.join(directory, name))
    except FileNotFoundError:
        if dir_replaced(dir_fd, directory):
            raise ChangedWhileReading(f"[{who}] {directory} changed while reading (a "
                                      "concurrent save replaced it); retry") from None
        raise FileNotFoundError(f"[{who}] {directory} has no {name}") from None


def load(directory: str, model_cls, strict: bool = False):
    """Read a checkpoint directory into ``model_cls``: config.json, the index and every shard
    from one snapshot of the directory (:func:`read_snapshot`), so a concurrent save into
    ``directory`` cannot mix two checkpoints."""
    directory = os.fspath(directory)
    cfg, stored = read_snapshot(directory, "from_pretrained", lambda fd: read_at(directory, fd))
    return build(cfg, stored, directory, model_cls, strict)


def read_at(directory: str, dir_fd: int):
    """(Config, stored tensors) of the checkpoint open as ``dir_fd``."""
    with open_member(directory, dir_fd, "config.json", "from_pretrained") as f:
        text = f.read()
    return Config.from_json_text(text, os.path.join(directory, "config.json")), \
        st.read_dir(directory, dir_fd=dir_fd)


def build(cfg: Config, stored, directory: str, model_cls, strict: bool, expert_shard=None):
    """The model of a checkpoint's config and stored tensors (decoded, checked, loaded).
    ``expert_shard=(ep, index)``: an expert shard (dsv3.model) that decodes and holds only its
    own routed experts of the full checkpoint."""
    qc = cfg.quantization_config or {}
    cfg = _without_absent_mtp(cfg, stored, directory, strict)
    if expert_shard is not None:
        model = model_cls(cfg, seed=0, expert_shard=expert_shard, _random_init=False)
        stored = {k: v for k, v in stored.items()
                  if not model._other_shard(k[:-len("_scale_inv")] if k.endswith("_scale_inv")
                                            else k)}
    else:
        model = None
    tensors = decode_tensors(stored, directory, tuple(qc.get("weight_block_size", FP8_BLOCK)),
                             pow2_scale=qc.get("scale_fmt") == "ue8m0")
    if not cfg.rope_interleave:
        tensors = permute_rope(tensors, cfg, to_pairs=True)
    if model is None:  # no random draw: load_state_dict(strict=True) below writes every weight
        model = model_cls(cfg, seed=0, _random_init=False)
    names = set(model.parameter_shapes())
    # DeepSeek-V3's MTP layer stores copies of the shared embedding and head: not separate here
    shared_copies = {n for n in tensors if n not in names and
                     (n.endswith(".embed_tokens.weight") or n.endswith(".shared_head.head.weight"))}
    state = {k: v for k, v in tensors.items() if k not in shared_copies
             and not k.endswith("rotary_emb.inv_freq")}
    model.load_state_dict(state, strict=True)
    return model
