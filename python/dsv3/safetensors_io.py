"""Reading and writing the safetensors format (what Hugging Face checkpoints use), with numpy.

Format: 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the raw little-endian tensor bytes (offsets relative to the end of the header).

dsv3 reads F32, F16, BF16, F8_E4M3 / F8_E5M2 (returned as uint8 codes), and the integer types;
BF16 is widened to float32 exactly. Every structural error (truncated file, header larger than
the file, overlapping or out-of-range offsets, size not matching dtype x shape, bad JSON, a
tensor name given twice, a shard index naming a file outside the checkpoint directory) raises
``ValueError`` naming the file and the tensor. Writes go to a temporary file in the
same directory, are fsync'ed, then renamed over the final name: an interrupted write never
leaves a partial file under the final name.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Dict, Iterable, Mapping, Optional, Tuple

import numpy as np

from ._files import ChangedWhileReading, dir_replaced, open_dir, open_regular, temp_name

# safetensors dtype name -> (numpy dtype of the stored element, itemsize)
_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"), "F8_E4M3": np.dtype("u1"), "F8_E5M2": np.dtype("u1"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_FROM_NUMPY = {np.dtype("float64"): "F64", np.dtype("float32"): "F32",
               np.dtype("float16"): "F16", np.dtype("int64"): "I64", np.dtype("int32"): "I32",
               np.dtype("int16"): "I16", np.dtype("int8"): "I8", np.dtype("uint8"): "U8",
               np.dtype("bool"): "BOOL"}
MAX_HEADER = 100 << 20


def _unique_keys(pairs):
    """json object_pairs_hook: a JSON object naming one key twice is an error (json.loads
    would keep the last silently, e.g. a second lm_head.weight replacing the real one)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def loads_strict(text: str):
    """json.loads that refuses duplicate keys (ValueError naming the key)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN (the
    engine's one rounding, csrc/core/bf16.h)."""
    from . import _core
    return _core.bf16_bits(np.asarray(x, dtype=np.float32))


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


class Tensor:
    """A stored tensor: ``dtype`` (safetensors name), ``shape`` and the raw ``data`` (numpy
    array of the stored element type, a view into the memory-mapped file)."""
    __slots__ = ("dtype", "shape", "data")

    def __init__(self, dtype: str, shape: Tuple[int, ...], data: np.ndarray):
        self.dtype, self.shape, self.data = dtype, shape, data

    def to_float32(self) -> np.ndarray:
        if self.dtype == "BF16":
            return bf16_to_f32(self.data)
        if self.dtype in ("F32", "F16", "F64"):
            return self.data.astype(np.float32)
        raise ValueError(f"tensor of dtype {self.dtype} has no direct float32 value "
                         "(FP8 codes need their scales)")


def read(path: str, dir_fd: Optional[int] = None,
         shown: Optional[str] = None) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """All tensors of one .safetensors file (memory-mapped) and its metadata. The file is
    opened once (it must be a regular file) and the header and the mapping both come from that
    descriptor, so a concurrent rename over ``path`` cannot pair one file's header with
    another's data; the mapping keeps the data readable even if the file is deleted later.
    ``dir_fd``: ``path`` is relative to that open directory; ``shown``: the name in messages."""
    path = os.fspath(path)
    shown = path if shown is None else shown
    with open_regular(path, "safetensors", binary=True, dir_fd=dir_fd, shown=shown) as f:
        return _read_open(f, shown)


def parse_header(f, path: str):
    """The checked header of the open binary safetensors file ``f`` (named ``path`` in
    messages), read before any byte of data is mapped: ``(entries, metadata, data_start,
    data_len)`` with ``entries = {name: (dtype, shape, begin, end)}`` (offsets relative to
    ``data_start``). Every tensor's dtype, shape, offsets and length are checked against the
    header and the file size, and no two tensors overlap; any failure raises ValueError naming
    the file and the tensor."""
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise ValueError(f"[safetensors] {path}: file of {size} bytes is too short for a header")
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER or 8 + n > size:
        raise ValueError(f"[safetensors] {path}: header length {n} exceeds the file "
                         f"({size} bytes): truncated or not a safetensors file")
    raw = f.read(n)
    try:
        header = loads_strict(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"[safetensors] {path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"[safetensors] {path}: header must be a JSON object")
    meta = header.pop("__metadata__", {}) or {}
    data_len = size - 8 - n
    spans = []
    entries: Dict[str, Tuple[str, Tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        where = f"[safetensors] {path}: tensor '{name}'"
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: entry must have dtype, shape and data_offsets") from None
        if dtype not in _DTYPES:
            raise ValueError(f"{where}: unsupported dtype {dtype!r}")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(f"{where}: bad shape {list(shape)}")
        if not (isinstance(b, int) and isinstance(e, int) and 0 <= b <= e <= data_len):
            raise ValueError(f"{where}: data_offsets [{b}, {e}] outside the data section "
                             f"({data_len} bytes): truncated or corrupt file")
        count = int(np.prod(shape, dtype=np.int64))
        if e - b != count * _DTYPES[dtype].itemsize:
            raise ValueError(f"{where}: {e - b} bytes do not match dtype {dtype} x shape "
                             f"{list(shape)}")
        spans.append((b, e, name))
        entries[name] = (dtype, shape, b, e)
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ValueError(f"[safetensors] {path}: tensors '{n0}' and '{n1}' overlap")
    return entries, {str(k): str(v) for k, v in meta.items()}, 8 + n, data_len


def element_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of a stored element of safetensors ``dtype`` (F8_*: uint8 codes)."""
    return _DTYPES[dtype]


def _read_open(f, path: str) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """:func:`read` of the open binary file ``f`` (named ``path`` in messages)."""
    entries, meta, start, data_len = parse_header(f, path)
    buf = np.memmap(f, dtype=np.uint8, mode="r", offset=start, shape=(data_len,)) \
        if data_len > 0 else np.zeros(0, np.uint8)
    out: Dict[str, Tensor] = {}
    for name, (dtype, shape, b, e) in entries.items():
        out[name] = Tensor(dtype, shape, buf[b:e].view(_DTYPES[dtype]).reshape(shape))
    return out, meta


def write(path: str, tensors: Mapping[str, Tuple[str, np.ndarray]],
          metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write ``{name: (safetensors dtype, array of the stored element type)}`` atomically."""
    for name, (dtype, arr) in tensors.items():
        if dtype in _DTYPES and arr.dtype.itemsize != _DTYPES[dtype].itemsize:
            raise ValueError(f"[safetensors] tensor '{name}': array of {arr.dtype} cannot be "
                             f"stored as {dtype}")
    write_stream(path, {k: (d, a.shape) for k, (d, a) in tensors.items()},
                 lambda name: tensors[name][1], metadata)


def write_stream(path: str, specs: Mapping[str, Tuple[str, Tuple[int, ...]]], produce,
                 metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write a file of ``specs = {name: (safetensors dtype, shape)}`` atomically, asking
    ``produce(name)`` for each tensor's array (of the stored element type) only when it is
    written: one tensor in memory at a time."""
    path = os.fspath(path)
    header: Dict[str, object] = {}
    offset = 0
    # wider elements first (as the Rust safetensors writer does): with the 8-byte aligned
    # data section every tensor then starts at a multiple of its element size, so memory
    # maps of it are aligned views (dsv3.resident)
    for name, (dtype, _) in specs.items():
        if dtype not in _DTYPES:
            raise ValueError(f"[safetensors] tensor '{name}': unsupported dtype {dtype!r}")
    order = sorted(specs, key=lambda k: (-_DTYPES[specs[k][0]].itemsize, k))
    for name in order:
        dtype, shape = specs[name]
        nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hdr = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hdr += b" " * (-len(hdr) % 8)  # align the data section to 8 bytes
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(hdr)))
            f.write(hdr)
            for name in order:
                dtype, shape = specs[name]
                arr = np.asarray(produce(name))
                if arr.shape != tuple(shape) or arr.dtype.itemsize != _DTYPES[dtype].itemsize:
                    raise ValueError(f"[safetensors] tensor '{name}': produced {arr.dtype} "
                                     f"{arr.shape}, declared {dtype} {tuple(shape)}")
                f.write(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"),
                                                         copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_index(directory: str, weight_map: Mapping[str, str], total: int,
                stem: str = "model") -> str:
    """Write ``{stem}.safetensors.index.json`` atomically; returns its file name."""
    index = {"metadata": {"total_size": int(total)}, "weight_map": dict(weight_map)}
    ipath = os.path.join(directory, f"{stem}.safetensors.index.json")
    tmp = temp_name(ipath)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ipath)
    return os.path.basename(ipath)


def numpy_dtype_name(arr: np.ndarray) -> str:
    if arr.dtype not in _FROM_NUMPY:
        raise TypeError(f"[safetensors] no safetensors dtype for numpy {arr.dtype}")
    return _FROM_NUMPY[arr.dtype]


def write_sharded(directory: str, tensors: Mapping[str, Tuple[str, np.ndarray]],
                  max_shard_bytes: int, metadata: Optional[Mapping[str, str]] = None,
                  stem: str = "model") -> Iterable[str]:
    """One ``{stem}.safetensors`` when everything fits in ``max_shard_bytes``; else shards
    ``{stem}-0000i-of-0000n.safetensors`` plus ``{stem}.safetensors.index.json`` (the Hugging
    Face layout). Returns the file names written."""
    total = sum(a.nbytes for _, a in tensors.values())
    if total <= max_shard_bytes:
        write(os.path.join(directory, f"{stem}.safetensors"), tensors, metadata)
        return [f"{stem}.safetensors"]
    shards, cur, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name][1].nbytes
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = tensors[name]
        size += nbytes
    if cur:
        shards.append(cur)
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write(os.path.join(directory, fname), shard, metadata)
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    return names + [write_index(directory, weight_map, total, stem)]


def _check_shard_name(index: str, fname) -> str:
    """The shard ``fname`` of an index, which must be a plain file name in the checkpoint
    directory: absolute paths, "..", subdirectories and non-strings are refused (an index must
    not make the reader open files the user did not hand it). A symlink placed in the directory
    is followed: Hugging Face's cache snapshots are symlinks into ``../../blobs``."""
    if (not isinstance(fname, str) or not fname or os.path.isabs(fname)
            or os.path.basename(fname) != fname or fname in (".", "..")):
        raise ValueError(f"[safetensors] {index}: weight_map names {fname!r}, expected a file "
                         "name inside the checkpoint directory")
    return fname


def read_dir(directory: str, stem: str = "model",
             dir_fd: Optional[int] = None) -> Dict[str, Tensor]:
    """Every tensor of a checkpoint directory: ``{stem}.safetensors``, or the shards named by
    ``{stem}.safetensors.index.json`` (each shard read once; missing shards are an error).
    Every file is opened relative to one descriptor of the directory (``dir_fd``, else opened
    here), so all come from the same checkpoint even while another process publishes a new
    one at ``directory``; a file deleted meanwhile raises :class:`ChangedWhileReading`."""
    directory = os.fspath(directory)
    if dir_fd is None:
        fd = open_dir(directory, "safetensors")
        try:
            return read_dir(directory, stem, fd)
        finally:
            os.close(fd)
    try:
        return _read_dir_at(directory, stem, dir_fd)
    except FileNotFoundError:
        if dir_replaced(dir_fd, directory):
            raise ChangedWhileReading(f"[safetensors] {directory} changed while reading (a "
                                      "concurrent save replaced it); retry") from None
        raise


def _read_dir_at(directory: str, stem: str, dir_fd: int) -> Dict[str, Tensor]:
    index = f"{stem}.safetensors.index.json"
    shown = os.path.join(directory, index)
    try:
        f = open_regular(index, "safetensors", dir_fd=dir_fd, shown=shown)
    except FileNotFoundError:
        single = f"{stem}.safetensors"
        try:
            return read(single, dir_fd, os.path.join(directory, single))[0]
        except FileNotFoundError:
            raise FileNotFoundError(f"[safetensors] {directory} has neither {single} nor "
                                    f"{index}") from None
    try:
        with f:
            weight_map = loads_strict(f.read())["weight_map"]
        shards = sorted(set(weight_map.values()), key=str)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"[safetensors] {shown}: not a valid index ({e})") from None
    out: Dict[str, Tensor] = {}
    for fname in shards:
        _check_shard_name(shown, fname)
        try:
            tensors, _ = read(fname, dir_fd, os.path.join(directory, fname))
        except FileNotFoundError:
            if dir_replaced(dir_fd, directory):
                raise
            raise ValueError(f"[safetensors] {shown} names shard {fname}, which is "
                             "missing") from None
        out.update(tensors)
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise ValueError(f"[safetensors] {shown}: tensors listed but not found in their "
                         f"shards: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return out
