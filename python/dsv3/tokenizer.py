"""Text <-> token ids for a checkpoint: its Hugging Face ``tokenizer.json`` when it has one
(through the optional ``tokenizers`` package), else dsv3's byte tokenizer.

``Tokenizer.from_pretrained(dir)`` picks the right one. ``encode(text)`` gives the ids a model
expects for a prompt (the BOS the checkpoint's tokenizer adds: its ``tokenizer.json``
post-processor, or ``add_bos_token`` of ``tokenizer_config.json``; for byte checkpoints the
config's ``bos_token_id``); ``decode(ids)`` drops special tokens.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional, Union

import numpy as np

from ._files import open_regular

PathLike = Union[str, os.PathLike]


class Tokenizer:
    """``Tokenizer.from_pretrained(dir)``, or ``Tokenizer.byte(bos_token_id)``."""

    def __init__(self, backend, kind: str, bos_token_id: Optional[int] = None,
                 add_bos: bool = False):
        self._backend, self.kind = backend, kind
        self.bos_token_id, self._add_bos = bos_token_id, add_bos

    @classmethod
    def byte(cls, bos_token_id: Optional[int] = None) -> "Tokenizer":
        """UTF-8 bytes as tokens 0..255 (dsv3's own small models), ``bos_token_id`` first."""
        from .data import ByteTokenizer
        return cls(ByteTokenizer(), "byte", bos_token_id, bos_token_id is not None)

    @classmethod
    def from_pretrained(cls, directory: PathLike,
                        bos_token_id: Optional[int] = None) -> "Tokenizer":
        """The checkpoint's ``tokenizer.json`` (needs ``pip install tokenizers``), else the
        byte tokenizer with ``bos_token_id`` (default: config.json's)."""
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"[Tokenizer.from_pretrained] directory {directory!r} is "
                                    "not a directory")
        cfg = _read_json(os.path.join(directory, "config.json"))
        if bos_token_id is None:
            bos_token_id = cfg.get("bos_token_id")
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.exists(path):
            return cls.byte(bos_token_id)
        try:
            import tokenizers
        except ImportError:
            raise ImportError(f"[Tokenizer] {path}: a Hugging Face tokenizer needs the "
                              "'tokenizers' package (pip install tokenizers)") from None
        with open_regular(path, "Tokenizer") as f:  # a FIFO would block the Rust reader
            text = f.read()
        try:
            tok = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust parser's own error types
            raise ValueError(f"[Tokenizer] {path} is not a valid tokenizer.json: {e}") from None
        tcfg = _read_json(os.path.join(directory, "tokenizer_config.json"))
        bos = tcfg.get("bos_token")
        if isinstance(bos, dict):
            bos = bos.get("content")
        if isinstance(bos, str) and tok.token_to_id(bos) is not None:
            bos_token_id = tok.token_to_id(bos)
        return cls(tok, "huggingface", bos_token_id, bool(tcfg.get("add_bos_token", False)))

    @property
    def vocab_size(self) -> int:
        if self.kind == "byte":
            return self._backend.vocab_size
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        """int64 ids of a prompt (1-D), BOS first when the tokenizer adds one."""
        if not isinstance(text, str):
            raise TypeError(f"[Tokenizer.encode] text must be a str, got {type(text).__name__}")
        if self.kind == "byte":
            ids = self._backend.encode(text).tolist()
        else:
            ids = self._backend.encode(text, add_special_tokens=True).ids
        if self._add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return np.asarray(ids, np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; special tokens dropped."""
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"[Tokenizer.decode] ids must be integer token ids, got "
                            f"{type(ids).__name__}")
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        if arr.size and (arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(f"[Tokenizer.decode] ids must be integer token ids, got dtype "
                            f"{arr.dtype}")
        ids = [int(t) for t in arr.ravel()]
        if any(t < 0 for t in ids):
            raise ValueError(f"[Tokenizer.decode] ids must be >= 0, got {min(ids)}")
        if ids and max(ids) >= self.vocab_size:  # the byte path would drop them silently
            raise ValueError(f"[Tokenizer.decode] ids must be < vocab_size {self.vocab_size}, "
                             f"got {max(ids)}")
        if self.kind == "byte":
            return self._backend.decode([t for t in ids if t < 256])
        return self._backend.decode(ids, skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"dsv3.Tokenizer({self.kind}, vocab_size={self.vocab_size})"


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open_regular(path, "Tokenizer") as f:  # a FIFO or device raises, never blocks
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"[Tokenizer] {path} is not valid JSON: {e}") from None
    return d if isinstance(d, dict) else {}


class TextStream:
    """Prints the text of tokens as they come: decodes everything so far and writes the new
    suffix (a multi-token character appears once it is complete). ``finish()`` writes what is
    still held back, so the streamed text equals ``decode`` of all the tokens; when the
    decoder revised text already written (not prefix-stable), it writes a newline and the
    whole text instead."""

    def __init__(self, tokenizer: Tokenizer, out):
        self._tok, self._out, self._ids, self._shown = tokenizer, out, [], ""

    def __call__(self, _prompt_index: int, new: List[int]) -> None:
        self._ids.extend(int(t) for t in new)
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return
        self._write(text)

    def _write(self, text: str) -> None:
        if text.startswith(self._shown):  # else: held back until it extends again
            self._out.write(text[len(self._shown):])
            self._out.flush()
            self._shown = text

    def finish(self) -> None:
        text = self._tok.decode(self._ids)
        if not text.startswith(self._shown):
            self._shown = ""
            self._out.write("\n")
        self._write(text)
