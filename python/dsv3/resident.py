"""Resident checkpoint loading: weights kept in their storage format, memory-mapped when they can.

``resident_tensors(directory, weights, mmap)`` reads a checkpoint (``config.json`` + one
``model.safetensors`` or shards named by ``model.safetensors.index.json``) into the weight dict
of ``Model._from_resident``: a projection matrix (q_a/q_b/q/kv_a/o_proj, MHA q/k/v/o, dense,
shared and routed experts' gate/up/down_proj, eh_proj, lm_head, embed_tokens) becomes a tuple
``(fmt, data, scale_inv)``; every other tensor (norms, biases, the router gate, kv_b_proj) a
float32 array, except a kv_b_proj stored in the resident format (E4M3 for fp8, BF16 for bf16)
and mapped: that one is a tuple too (the engine dequantizes it into float32 and keeps the
view for decoding).

Formats (``weights``):

=======  ===========================================================================
fp8      DeepSeek-V3's layout: the linear weights (checkpoint.is_fp8_linear) as E4M3 codes
         uint8 [O, K] + float32 scale_inv [ceil(O/128), ceil(K/128)], w = e4m3(q) * s;
         embed_tokens, lm_head and eh_proj (bf16 in the release) as bf16
bf16     uint16 bf16 bit patterns [O, K]
fp32     float32 [O, K]
None     the checkpoint's own: fp8 if it holds F8_E4M3 projections, else bf16 if it holds
         BF16 (or F8_E5M2) ones, else fp32
=======  ===========================================================================

Zero-copy: with ``mmap=True`` a tensor stored in its resident format (E4M3 codes and float32
scales for fp8, BF16 for bf16, F32 for fp32) is a read-only view of a private read-only map
of its shard (no anonymous memory; the pages are the file's page cache). Every other tensor
is converted into anonymous memory while streaming, in bands of 128 rows: at most one band
of fp32 exists at a time, never the model. Conversions: fp32 -> bf16 rounds to nearest even
(the engine's bf16 rounding); FP8 -> bf16 / fp32 dequantizes exactly (``e4m3(q) * s`` in
fp32), then rounds to bf16 (so fp8 -> bf16 is not exact where the product needs more than 8
bits); bf16 / fp32 -> fp8 quantizes each 128x128 block with the project's quantizer
(:func:`dsv3.fp8.quantize`: scale = max(amax, 1e-4) / 448, codes = RNE(w / scale)
saturated; power-of-two scales when quantization_config.scale_fmt is "ue8m0"), the same codes
as quantizing the whole tensor. F8_E5M2 checkpoints are dequantized to the requested format
(resident fp8 is E4M3 only, so weights="fp8" requantizes them). ``mmap=False``: every tensor
is a copy (the shards are still read through a temporary map).

Checks, before any view is created: every shard's header (safetensors_io.parse_header:
dtype, shape, offsets and length of every tensor against the file size, no overlaps), every
mapped view aligned to its element size, the index and the shards naming the same tensors
in the same files, the names and shapes those of the config's layout (``_core.param_layout``;
MTP layers the files do not hold are dropped with a warning as in checkpoint.load), FP8
scale shapes against quantization_config.weight_block_size. Then, while converting or
scanning band by band: NaN / Inf in weights, scales and codes (as checkpoint.decode_tensors),
power-of-two scales for ue8m0. Each failure raises ValueError naming the file and the tensor.
The scan reads every mapped page once (a 15 GiB checkpoint: seconds to tens of seconds, from
the disk when not cached); the pages then stay in the page cache, not in anonymous memory.
``rope_interleave: false`` checkpoints get their q/k rope rows permuted to adjacent pairs
(checkpoint.permute_rope's permutation); for resident fp8 codes that is a row copy, valid only
when every row stays in its 128-row scale block (true for DeepSeek's dims), else ValueError.

Memory: :func:`plan` computes, from the headers alone, the resident bytes of every tensor,
mapped vs anonymous, and the largest conversion transient; loading refuses with
``_memory.MemoryBudgetError`` when the anonymous part does not fit ``_memory.available()``
(mapped bytes are reclaimable page cache and are not refused; ``python -m dsv3 info`` says
whether they fit the RAM).

Mapped files changing on disk: a live mapping keeps the inode it mapped. dsv3's own
``save_pretrained`` (and the trainer's saves) write a new directory and publish it by rename
(checkpoint.publish_dir), deleting the old directory's names but never rewriting its files,
so saving over a directory that a resident model has mapped is safe: that model keeps
computing with the old weights (tests/test_resident_load.py proves it). A program that
truncates or rewrites a mapped shard IN PLACE changes or removes the pages under the model:
reading a truncated page raises SIGBUS and kills the process. Do not edit mapped shards in
place; copy or publish by rename instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np

from . import _memory
from . import checkpoint as ck
from . import safetensors_io as st
from .config import Config

FORMATS = ("fp8", "bf16", "fp32")
BAND = 128  # rows converted at a time (one FP8 scale block)
OP = "from_pretrained"

# the projection matrices: resident in their format (everything else becomes float32)
_PROJECTIONS = ("q_a_proj", "q_b_proj", "q_proj", "k_proj", "v_proj", "kv_a_proj_with_mqa",
                "o_proj", "gate_proj", "up_proj", "down_proj", "eh_proj")
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64") + _FP8_DTYPES


def is_projection(name: str) -> bool:
    """A matrix that may stay resident in a low-precision format (the engine's WeightView)."""
    if name in ("lm_head.weight", "model.embed_tokens.weight"):
        return True
    return name.endswith(".weight") and name.split(".")[-2] in _PROJECTIONS


def resident_format(name: str, shape, weights: str) -> str:
    """The resident format of a tensor: fp8 / bf16 / fp32 for projections, float32 else."""
    if not is_projection(name):
        return "float32"
    if weights == "fp8" and not ck.is_fp8_linear(name, tuple(shape)):
        return "bf16"  # the embedding, the head and eh_proj stay bf16 (DeepSeek's layout)
    return weights


def format_bytes(fmt: str, shape) -> int:
    """Resident bytes of one tensor in ``fmt`` (fp8 includes its 128x128 scale_inv)."""
    n = int(np.prod(shape, dtype=np.int64))
    if fmt == "fp8":
        O, K = shape
        return n + 4 * (-(-O // 128)) * (-(-K // 128))
    return n * (2 if fmt == "bf16" else 4)


def check_weights(weights, who: str = OP) -> Optional[str]:
    if weights is not None and weights not in FORMATS:
        raise ValueError(f"[{who}] weights must be one of {FORMATS} or None (the checkpoint's "
                         f"own format), got {weights!r}")
    return weights


# ---------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """What loading creates: per tensor (resident format, mapped?, bytes), the totals, and the
    largest conversion transient (fp32 bands)."""
    weights: str
    mmap: bool
    tensors: Dict[str, Tuple[str, bool, int]] = field(default_factory=dict)
    transient_bytes: int = 0
    dequantized_bytes: int = 0  # mapped kv_b_proj views the engine also holds in float32

    @property
    def mapped_bytes(self) -> int:
        return sum(b for _, m, b in self.tensors.values() if m)

    @property
    def anonymous_bytes(self) -> int:
        """The tensors made in memory, and the float32 copy of a mapped kv_b_proj."""
        return sum(b for _, m, b in self.tensors.values() if not m) + self.dequantized_bytes

    def by_format(self) -> Dict[str, Dict[str, int]]:
        out: Dict[str, Dict[str, int]] = {}
        for fmt, mapped, b in self.tensors.values():
            d = out.setdefault(fmt, {"mapped": 0, "anonymous": 0})
            d["mapped" if mapped else "anonymous"] += b
        return out

    @property
    def float32_bytes(self) -> int:
        """The float32 tensors, which Model._from_resident copies into its slab."""
        return sum(b for f, _, b in self.tensors.values() if f == "float32")

    def require(self) -> None:
        """MemoryBudgetError when the anonymous part does not fit: the arrays made here, the
        largest conversion transient, and the engine's copy of the float32 tensors."""
        _memory.require(OP, f"the {self.weights}-resident weights ({self.anonymous_bytes} "
                            f"anonymous bytes + {self.transient_bytes} conversion transient + "
                            f"{self.float32_bytes} copied into the model; {self.mapped_bytes} "
                            "bytes mapped from the files)",
                        self.anonymous_bytes + self.transient_bytes + self.float32_bytes)


def own_format(stored: Dict[str, Tuple[str, Tuple[int, ...]]]) -> str:
    """The checkpoint's own resident format, from the stored dtypes of its projections."""
    dtypes = {d for n, (d, s) in stored.items() if is_projection(n)}
    if "F8_E4M3" in dtypes:
        return "fp8"
    if "BF16" in dtypes or "F8_E5M2" in dtypes:
        return "bf16"
    return "fp32"


def _needs_perm(cfg: Config, name: str) -> bool:
    return not cfg.rope_interleave and any(name.endswith("." + s) for s in ck.rope_rows(cfg))


def zero_copy(cfg: Config, name: str, dtype: str, fmt: str, mmap: bool, block) -> bool:
    """A stored tensor that can be a view of the map: stored in its resident format."""
    if not mmap or _needs_perm(cfg, name):
        return False
    return ((fmt == "fp8" and dtype == "F8_E4M3" and tuple(block) == (128, 128))
            or (fmt == "bf16" and dtype == "BF16") or (fmt == "fp32" and dtype == "F32"))


def plan(cfg: Config, stored: Dict[str, Tuple[str, Tuple[int, ...]]],
         weights: Optional[str], mmap: bool = True) -> Plan:
    """The plan of loading ``stored`` ({name: (safetensors dtype, shape)} of the weights the
    model takes, scale_inv tensors included) resident in ``weights`` (None: own format)."""
    weights = own_format(stored) if weights is None else check_weights(weights)
    block = tuple((cfg.quantization_config or {}).get("weight_block_size", ck.FP8_BLOCK))
    p = Plan(weights, mmap)
    for name, (dtype, shape) in stored.items():
        if name.endswith("_scale_inv"):
            continue
        fmt = resident_format(name, shape, weights)
        mapped = zero_copy(cfg, name, dtype, fmt, mmap, block)
        kv_b = _kv_b_as_stored(cfg, name, dtype, weights, mmap, block)
        if kv_b is not None:  # a view; the engine also dequantizes it into its float32 slab
            fmt, mapped = kv_b, True
            p.dequantized_bytes += 4 * int(np.prod(shape, dtype=np.int64))
        p.tensors[name] = (fmt, mapped, format_bytes(fmt, shape) if fmt != "float32"
                           else 4 * int(np.prod(shape, dtype=np.int64)))
        if fmt != "float32" and not mapped:
            p.transient_bytes = max(p.transient_bytes, 3 * 4 * BAND * int(shape[-1]))
    return p


def layout_stored(cfg: Config, dtype: str) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """{name: (safetensors dtype, shape)} of the checkpoint ``save_pretrained(dtype)`` writes
    for ``cfg`` (scale_inv included), from the engine's layout, without allocating a model."""
    from . import _core
    out: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
    for name, shape in _core.param_layout(cfg):
        d = ck.stored_dtype(name, tuple(shape), dtype)
        out[name] = (d, tuple(shape))
        if d == "F8_E4M3":
            out[name + "_scale_inv"] = ("F32", tuple(-(-s // 128) for s in shape))
    return out


# ---------------------------------------------------------------------- reading headers
@dataclass
class _Stored:
    file: str           # the shard's path (in messages)
    dtype: str
    shape: Tuple[int, ...]
    begin: int          # absolute byte offsets in the file
    end: int
    shard: int          # index into the shard list


def _read_headers(directory: str, dir_fd: int):
    """(Config, {name: _Stored}, [open shard files]) of the checkpoint open as ``dir_fd``."""
    with ck.open_member(directory, dir_fd, "config.json", OP) as f:
        cfg = Config.from_json_text(f.read(), os.path.join(directory, "config.json"))
    index = "model.safetensors.index.json"
    shown_index = os.path.join(directory, index)
    try:
        f = ck.open_member(directory, dir_fd, index, OP)
    except FileNotFoundError:
        weight_map = None
        names = ["model.safetensors"]
    else:
        try:
            with f:
                weight_map = st.loads_strict(f.read())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
            names = sorted(set(weight_map.values()), key=str)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"[safetensors] {shown_index}: not a valid index ({e})") from None
    files, tensors = [], {}
    try:
        for i, fname in enumerate(names):
            if weight_map is not None:
                st._check_shard_name(shown_index, fname)
            shown = os.path.join(directory, fname)
            try:
                fh = ck.open_member(directory, dir_fd, fname, OP, binary=True)
            except FileNotFoundError:
                if weight_map is None:
                    raise FileNotFoundError(f"[safetensors] {directory} has neither "
                                            f"model.safetensors nor {index}") from None
                first = sorted(n for n, v in weight_map.items() if v == fname)[0]
                raise ValueError(f"[safetensors] {shown_index} names shard {fname} (for "
                                 f"tensor '{first}' ...), which is missing") from None
            files.append(fh)
        for i, (fname, fh) in enumerate(zip(names, files)):  # every shard exists: read them
            shown = os.path.join(directory, fname)
            entries, _, start, _ = st.parse_header(fh, shown)
            for name, (dtype, shape, b, e) in entries.items():
                if name in tensors:
                    raise ValueError(f"[safetensors] tensor '{name}' is in both "
                                     f"{tensors[name].file} and {shown}")
                if weight_map is not None and weight_map.get(name) != fname:
                    raise ValueError(f"[safetensors] {shown}: tensor '{name}' is not indexed "
                                     f"to this shard in {shown_index} (index: "
                                     f"{weight_map.get(name)!r})")
                tensors[name] = _Stored(shown, dtype, shape, start + b, start + e, i)
        if weight_map is not None:
            missing = sorted(n for n in weight_map if n not in tensors)
            if missing:
                raise ValueError(f"[safetensors] {shown_index}: tensors listed but not found "
                                 f"in their shards: {missing[:5]}"
                                 f"{' ...' if len(missing) > 5 else ''} (e.g. '{missing[0]}' "
                                 f"in {weight_map[missing[0]]})")
    except BaseException:
        for fh in files:
            fh.close()
        raise
    return cfg, tensors, files


def _select(cfg: Config, tensors: Dict[str, _Stored], directory: str, strict: bool):
    """(config, the tensors the model takes): MTP absence, shared copies, names, shapes,
    dtypes, FP8 scale pairing and shapes, alignment; all before any byte is mapped."""
    cfg = ck._without_absent_mtp(cfg, tensors, directory, strict)
    from . import _core
    layout = {n: tuple(s) for n, s in _core.param_layout(cfg)}
    drop = {n for n in tensors if n not in layout and (
        n.endswith(".embed_tokens.weight") or n.endswith(".shared_head.head.weight")
        or n.endswith("rotary_emb.inv_freq"))}
    drop |= {n + "_scale_inv" for n in drop}
    keep = {n: t for n, t in tensors.items() if n not in drop}
    weights = [n for n in keep if not n.endswith("_scale_inv")]
    missing = sorted(set(layout) - set(weights))
    unexpected = sorted(set(weights) - set(layout))
    if missing or unexpected:
        raise KeyError(f"[{OP}] {directory}: missing tensors {missing[:10]}"
                       f"{' ...' if len(missing) > 10 else ''} ({len(missing)}), unexpected "
                       f"tensors {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} "
                       f"({len(unexpected)})")
    block = tuple((cfg.quantization_config or {}).get("weight_block_size", ck.FP8_BLOCK))
    for name, t in sorted(keep.items(), key=lambda kv: kv[0].endswith("_scale_inv")):
        where = f"[{OP}] {t.file}: tensor '{name}'"  # weights first, then their scales
        if name.endswith("_scale_inv"):
            w = name[:-len("_scale_inv")]
            if w not in keep:
                raise ValueError(f"[{OP}] {t.file}: '{name}' has no weight")
            if keep[w].dtype not in _FP8_DTYPES:
                raise ValueError(f"{where}: scale of a {keep[w].dtype} weight '{w}', which is "
                                 "not FP8")
            if t.dtype not in ("F32", "BF16", "F16", "F64"):
                raise ValueError(f"{where}: dtype {t.dtype}, expected a float type")
            continue
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{where}: dtype {t.dtype}, expected a float type")
        if t.shape != layout[name]:
            raise ValueError(f"{where}: shape {t.shape}, the config's layout expects "
                             f"{layout[name]}")
        if t.dtype in _FP8_DTYPES:
            s = keep.get(name + "_scale_inv")
            if s is None:
                raise ValueError(f"{where}: FP8 tensor has no '{name}_scale_inv'")
            want = tuple(-(-d // b) for d, b in zip(t.shape, block))
            if len(t.shape) != 2 or s.shape != want:
                raise ValueError(f"[{OP}] {s.file}: tensor '{name}_scale_inv' has shape "
                                 f"{s.shape}, expected {want} for {block[0]}x{block[1]} "
                                 f"blocks of '{name}' {t.shape}")
    return cfg, keep, block


def _check_aligned(name: str, t: _Stored) -> None:
    size = st.element_dtype(t.dtype).itemsize
    if t.begin % size:
        raise ValueError(f"[{OP}] {t.file}: tensor '{name}' starts at byte {t.begin}, not a "
                         f"multiple of its {t.dtype} element size {size} (misaligned "
                         "offsets): it cannot be mapped; load with mmap=False")


def inspect(directory, strict: bool = False):
    """``(config, {name: (safetensors dtype, shape)})`` of the tensors a checkpoint's model
    takes, from its headers alone (every check of loading but the data scans); for
    :func:`plan` and ``python -m dsv3 info``."""
    directory = os.fspath(directory)
    cfg, tensors, files = ck.read_snapshot(directory, OP,
                                           lambda fd: _read_headers(directory, fd))
    for f in files:
        f.close()
    cfg, keep, _ = _select(cfg, tensors, directory, strict)
    return cfg, {n: (t.dtype, t.shape) for n, t in keep.items()}


# ---------------------------------------------------------------------- loading
def resident_tensors(directory, weights: Optional[str] = None, mmap: bool = True,
                     strict: bool = False):
    """``(config, {name: float32 array | (fmt, data, scale_inv)}, plan)`` of a checkpoint
    directory, for ``Model._from_resident``; see the module docstring. ``weights``: "fp8",
    "bf16", "fp32" or None (the checkpoint's own format)."""
    check_weights(weights)
    directory = os.fspath(directory)
    cfg, tensors, files = ck.read_snapshot(directory, OP,
                                           lambda fd: _read_headers(directory, fd))
    try:
        cfg, keep, block = _select(cfg, tensors, directory, strict)
        p = plan(cfg, {n: (t.dtype, t.shape) for n, t in keep.items()}, weights, mmap)
        for name, t in keep.items():
            if name in p.tensors and p.tensors[name][1]:
                _check_aligned(name, t)
                if t.dtype == "F8_E4M3" and keep[name + "_scale_inv"].dtype == "F32":
                    _check_aligned(name + "_scale_inv", keep[name + "_scale_inv"])
        p.require()
        maps = [np.memmap(f, dtype=np.uint8, mode="r") if os.fstat(f.fileno()).st_size
                else np.zeros(0, np.uint8) for f in files]
    finally:
        for f in files:
            f.close()
    raw = lambda t: maps[t.shard][t.begin:t.end].view(np.ndarray).view(
        st.element_dtype(t.dtype)).reshape(t.shape)
    qc = cfg.quantization_config or {}
    conv = _Converter(cfg, block, qc.get("scale_fmt") == "ue8m0")
    out = {}
    for name, (fmt, mapped, _) in p.tensors.items():
        t = keep[name]
        s = keep.get(name + "_scale_inv")
        scales = None if s is None else conv.scales(raw(s), s.file, name + "_scale_inv")
        out[name] = conv.convert(name, t.file, t.dtype, raw(t), scales, fmt, mapped)
    return cfg, out, p


def _kv_b_as_stored(cfg: Config, name: str, dtype: str, weights: str, mmap: bool, block):
    """"fp8" / "bf16" when kv_b_proj is stored in the resident format itself and can be mapped:
    the model then holds it dequantized in float32 (as always) and also as this view, which
    the absorbed decode reads instead (MlaParams::kv_b_view: a quarter / half of the bytes,
    the same values). None otherwise (kv_b_proj is converted to float32 as before)."""
    if not name.endswith(".kv_b_proj.weight") or weights not in ("fp8", "bf16"):
        return None
    return weights if zero_copy(cfg, name, dtype, weights, mmap, block) else None


class _Converter:
    """Band-wise conversion of one stored tensor into its resident form, with the checks."""

    def __init__(self, cfg: Config, block, pow2: bool):
        self.cfg, self.block, self.pow2 = cfg, tuple(block), pow2

    def scales(self, s: np.ndarray, file: str, name: str) -> np.ndarray:
        f = s if s.dtype == np.float32 else (st.bf16_to_f32(s) if s.dtype == np.uint16
                                            else s.astype(np.float32))
        ck._require_finite(f, name, file)
        if not np.isfinite(f.astype(np.float64) * 448).all():  # e4m3(q) * s could be inf
            raise ValueError(f"[{OP}] {file}: tensor '{name}' holds scales that overflow the "
                             "dequantized weights (infinite values); refusing to load it")
        if self.pow2 and not np.all(np.frexp(f)[0] == 0.5):
            raise ValueError(f"[{OP}] {file}: '{name}' holds scales that are not powers of "
                             "two, but quantization_config.scale_fmt is 'ue8m0'")
        return f

    def _perm(self, name: str, O: int) -> Optional[np.ndarray]:
        """out[r] = src[perm[r]] (rope halves -> pairs), or None."""
        if not _needs_perm(self.cfg, name):
            return None
        d = self.cfg.qk_rope_head_dim
        pair = np.arange(d).reshape(2, d // 2).T.ravel()
        perm = np.arange(O)
        for suffix, rows in ck.rope_rows(self.cfg).items():
            if name.endswith("." + suffix):
                perm[rows.ravel()] = rows[:, pair].ravel()
        return perm

    def _rows_f32(self, dtype: str, data: np.ndarray, scales, rows) -> np.ndarray:
        """Source rows ``rows`` (slice or index array) as float32, FP8 dequantized exactly."""
        if dtype in _FP8_DTYPES:
            from . import fp8
            idx = np.arange(data.shape[0])[rows]
            fmt = "e4m3" if dtype == "F8_E4M3" else "e5m2"
            # 1 x bc tiles with each row's scale row: the products of the br x bc blocks
            return fp8.dequantize(np.ascontiguousarray(data[idx]),
                                  np.ascontiguousarray(scales[idx // self.block[0]]),
                                  (1, self.block[1]), fmt=fmt)
        if dtype == "BF16":
            return st.bf16_to_f32(np.ascontiguousarray(data[rows]))
        return np.ascontiguousarray(data[rows]).astype(np.float32)

    def convert(self, name, file, dtype, data, scales, fmt, mapped):
        if fmt == "float32":
            x = self._rows_f32(dtype, data, scales, slice(None))
            ck._require_finite(x, name, file)
            return x
        O, K = data.shape
        if mapped:
            self._scan(name, file, dtype, data)
            return (fmt, data, scales if fmt == "fp8" else None)
        perm = self._perm(name, O)
        if fmt == "fp8" and dtype == "F8_E4M3":  # a copy (mmap=False) or a row permutation
            if tuple(self.block) != (128, 128):
                raise ValueError(f"[{OP}] {file}: tensor '{name}' has {self.block} FP8 blocks; "
                                 "resident fp8 needs 128x128: load with weights='bf16'")
            if perm is not None and not np.array_equal(perm // 128, np.arange(O) // 128):
                raise ValueError(f"[{OP}] {file}: tensor '{name}': the rope row permutation "
                                 "of rope_interleave=false moves rows across 128-row scale "
                                 "blocks, so its FP8 codes cannot stay resident; load with "
                                 "weights='bf16' or 'fp32'")
            self._scan(name, file, dtype, data)
            codes = np.empty((O, K), np.uint8)
            for r0 in range(0, O, BAND):
                r = slice(r0, min(O, r0 + BAND))
                codes[r] = data[r] if perm is None else data[perm[r]]
            return ("fp8", codes, np.array(scales, np.float32))
        out = np.empty((O, K), {"fp8": np.uint8, "bf16": np.uint16, "fp32": np.float32}[fmt])
        sinv = np.empty((-(-O // 128), -(-K // 128)), np.float32) if fmt == "fp8" else None
        for r0 in range(0, O, BAND):
            r = slice(r0, min(O, r0 + BAND))
            band = self._rows_f32(dtype, data, scales, r if perm is None else perm[r])
            ck._require_finite(band, name, file)
            if fmt == "fp32":
                out[r] = band
            elif fmt == "bf16":
                out[r] = st.bf16_bits(band)
            else:
                from . import fp8
                out[r], sinv[r0 // 128] = fp8.quantize(band, "e4m3", block=(128, 128),
                                                       pow2_scale=self.pow2)
        return (fmt, out, sinv)

    def _scan(self, name, file, dtype, data) -> None:
        """NaN / Inf in a stored tensor, band by band, without decoding it."""
        O = data.shape[0]
        for r0 in range(0, O, BAND):
            band = data[r0:r0 + BAND]
            if dtype == "F8_E4M3":
                bad = np.count_nonzero((band & 0x7F) == 0x7F)
            elif dtype == "BF16":
                bad = np.count_nonzero((band & 0x7F80) == 0x7F80)
            else:
                bad = band.size - np.count_nonzero(np.isfinite(band))
            if bad:
                raise ValueError(f"[{OP}] {file}: tensor '{name}' holds {bad} NaN or infinite "
                                 f"value(s) (rows {r0}..{min(O, r0 + BAND) - 1}); refusing to "
                                 "load it")


def dequantized(weights: Dict[str, object]) -> Dict[str, np.ndarray]:
    """{name: float32} of a resident weight dict (exact dequantization; for tests and
    comparisons: it allocates the whole model in fp32)."""
    from . import fp8
    out = {}
    for name, v in weights.items():
        if isinstance(v, tuple):
            fmt, data, s = v
            out[name] = (fp8.dequantize(np.ascontiguousarray(data), s, (128, 128)) if fmt == "fp8"
                         else st.bf16_to_f32(data) if fmt == "bf16" else np.array(data))
        else:
            out[name] = v
    return out
