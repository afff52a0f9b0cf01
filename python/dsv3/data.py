"""Training data: a byte tokenizer, token datasets with random contiguous windows, and the
default corpus (the Python standard library sources on this machine, so training works offline
everywhere).

``TokenDataset`` keeps its tokens in a uint16 memory map (or array), holds out the last
``val_fraction`` of them for evaluation, and draws training windows from a seeded
``numpy.random.Generator`` whose state is part of ``state_dict()`` so a resumed run draws exactly
the batches an uninterrupted run would have drawn.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from ._files import open_regular

PathLike = Union[str, os.PathLike]

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class ByteTokenizer:
    """Bytes 0..255 are tokens 0..255; specials follow: bos=256, eos=257, pad=258 (ids up to
    263 are reserved), ``vocab_size`` = 264, matching ``Config.small()``."""

    vocab_size = 264
    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258

    def encode(self, text: Union[str, bytes], add_bos: bool = False,
               add_eos: bool = False) -> np.ndarray:
        """int64 ids of the UTF-8 bytes of ``text`` (1-D)."""
        b = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ids = np.frombuffer(b, dtype=np.uint8).astype(np.int64)
        parts = ([np.array([self.bos_token_id])] if add_bos else []) + [ids] + \
                ([np.array([self.eos_token_id])] if add_eos else [])
        return np.concatenate(parts).astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of the byte tokens (specials dropped; invalid UTF-8 replaced)."""
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).ravel()
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"[ByteTokenizer.decode] ids must be in [0, {self.vocab_size})")
        return bytes(arr[arr < 256].astype(np.uint8).tolist()).decode("utf-8", errors="replace")


def default_corpus() -> List[str]:
    """The ``*.py`` files of the Python standard library on this machine (sorted paths;
    site-packages excluded)."""
    return text_files(sysconfig.get_paths()["stdlib"], suffixes=(".py",))


def text_files(path: PathLike, suffixes: Optional[Sequence[str]] = None) -> List[str]:
    """``path`` itself if it is a regular file, else the regular files below it (sorted;
    optionally only those ending in one of ``suffixes``). A FIFO, device or socket given as
    ``path`` raises ValueError; below a directory such entries are skipped."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"[data] {path} is not a regular file or a directory (a FIFO, device "
                         "or socket cannot be read as a corpus)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"[data] {path} is neither a file nor a directory")
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for f in sorted(files):
            # only regular files: a FIFO or device below the directory would block the reader
            if (suffixes is None or f.endswith(tuple(suffixes))) and \
                    os.path.isfile(os.path.join(root, f)):
                out.append(os.path.join(root, f))
    return out


def tokenize_files(files: Sequence[PathLike], out_path: PathLike,
                   tokenizer: Optional[ByteTokenizer] = None) -> int:
    """Write the byte tokens of ``files`` (each followed by eos) as uint16 to ``out_path``
    (atomically: a temporary file, then rename). Returns the number of tokens."""
    tok = tokenizer or ByteTokenizer()
    out_path = os.fspath(out_path)
    if os.path.exists(out_path) and any(os.path.samefile(out_path, p) for p in files
                                        if os.path.exists(p)):
        raise ValueError(f"[data] out_path {out_path} is one of the input files (it would be "
                         "replaced by its own tokens)")
    tmp = f"{out_path}.tmp-{os.getpid()}"
    n = 0
    try:
        with open(tmp, "wb") as f:
            for p in files:
                with open_regular(os.fspath(p), "data", binary=True) as src:
                    b = np.frombuffer(src.read(), dtype=np.uint8).astype(np.uint16)
                f.write(b.tobytes())
                f.write(np.array([tok.eos_token_id], dtype=np.uint16).tobytes())
                n += b.size + 1
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


class TokenDataset:
    """Token ids (uint16 memory map or array) split into train / held-out parts.

    ``batch(B, T)`` -> int64 (B, T+1): B random contiguous windows of the training part, from
    the dataset's seeded generator. ``val_batches(B, T, n)``: n fixed, evenly spaced batches
    of the held-out part (the same every call). ``state_dict()`` / ``load_state_dict()`` save
    and restore the generator."""

    def __init__(self, tokens: Union[np.ndarray, PathLike], seed: int = 0,
                 val_fraction: float = 0.05, vocab_size: Optional[int] = None):
        if isinstance(tokens, (str, os.PathLike)):
            self.path: Optional[str] = os.fspath(tokens)
            with open_regular(self.path, "TokenDataset", binary=True) as f:  # a FIFO: no hang
                tokens = np.memmap(f, dtype=np.uint16, mode="r")
        else:
            self.path = None
            tokens = np.asarray(tokens)
            if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
                raise ValueError("[TokenDataset] tokens must be a 1-D integer array")
            if tokens.size and int(tokens.min()) < 0:
                raise ValueError(f"[TokenDataset] token ids must be >= 0, got {int(tokens.min())}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"[TokenDataset] val_fraction must be in [0, 1), got {val_fraction}")
        if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
            raise ValueError(f"[TokenDataset] token id {int(tokens.max())} >= vocab_size "
                             f"{vocab_size}")
        self.tokens = tokens
        n_val = int(len(tokens) * val_fraction)
        self.train = tokens[:len(tokens) - n_val]
        self.val = tokens[len(tokens) - n_val:]
        self.seed = int(seed)
        self.rng = np.random.Generator(np.random.PCG64(self.seed))

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def _windows(part: np.ndarray, starts: np.ndarray, T: int) -> np.ndarray:
        return np.stack([np.asarray(part[s:s + T + 1], dtype=np.int64) for s in starts])

    def batch(self, batch_size: int, seq_len: int) -> np.ndarray:
        """int64 (batch_size, seq_len + 1) windows of the training part."""
        hi = len(self.train) - seq_len - 1
        if hi < 0:
            raise ValueError(f"[TokenDataset.batch] the training split ({len(self.train)} "
                             f"tokens) is shorter than seq_len + 1 = {seq_len + 1}")
        return self._windows(self.train, self.rng.integers(0, hi + 1, size=batch_size), seq_len)

    def val_batches(self, batch_size: int, seq_len: int, n: int = 4) -> List[np.ndarray]:
        hi = len(self.val) - seq_len - 1
        if hi < 0:
            return []
        starts = np.linspace(0, hi, num=n * batch_size).astype(np.int64)
        return [self._windows(self.val, starts[i * batch_size:(i + 1) * batch_size], seq_len)
                for i in range(n)]

    def unigram_entropy(self) -> float:
        """Cross-entropy (nats/token) of the held-out part under the training part's unigram
        distribution (add-one smoothed): the baseline a model must beat."""
        counts = np.bincount(np.asarray(self.train), minlength=int(self.tokens.max()) + 1) + 1.0
        p = counts / counts.sum()
        val = np.asarray(self.val if len(self.val) else self.train)
        return float(-np.log(p[val]).mean())

    def state_dict(self) -> Dict:
        return {"seed": self.seed, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: Dict) -> None:
        self.seed = int(state["seed"])
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        self.rng.bit_generator.state = state["rng"]


def load(paths: Optional[Union[PathLike, Sequence[PathLike]]] = None, seed: int = 0,
         val_fraction: float = 0.05, cache_dir: Optional[PathLike] = None) -> TokenDataset:
    """A TokenDataset of byte tokens from ``paths`` (files or directories; directories give
    every file below them) or, when None, of :func:`default_corpus`. The tokens are cached in
    ``cache_dir`` (default: the system temp dir) under a name derived from the file list."""
    if paths is None:
        files = default_corpus()
    else:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        files = [f for p in paths for f in text_files(p)]
    if not files:
        raise ValueError("[data.load] no input files")
    key = hashlib.sha1("\n".join(f"{f}:{os.path.getsize(f)}:{os.path.getmtime(f)}"
                                 for f in files).encode()).hexdigest()[:16]
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else tempfile.gettempdir()
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"dsv3-tokens-{key}.u16")
    if not os.path.exists(path):
        tokenize_files(files, path)
    return TokenDataset(path, seed=seed, val_fraction=val_fraction)
