"""Readers in data.py and tokenizer.py open only regular files: a FIFO (no writer) given as a
token file, a corpus file or a tokenizer's config.json / tokenizer.json raises ValueError
naming it instead of blocking forever (found by tests/hostile)."""
import os
import threading
import time

import numpy as np
import pytest

import dsv3


def _unblock_readers(path, stop):
    """After 2 s, open each FIFO's write end whenever a reader waits on it and close it again
    (the reader sees EOF): without the fix the test then fails instead of hanging."""
    time.sleep(2)
    while not stop.is_set():
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # ENXIO: no reader yet
            pass
        time.sleep(0.05)


def make_fifo(path, request):
    os.mkfifo(path)
    stop = threading.Event()
    threading.Thread(target=_unblock_readers, args=(str(path), stop), daemon=True).start()
    request.addfinalizer(stop.set)
    return str(path)


@pytest.fixture
def fifo(tmp_path, request):
    return make_fifo(tmp_path / "fifo", request)


def test_token_dataset_fifo(fifo):
    with pytest.raises(ValueError, match="not a regular file"):
        dsv3.data.TokenDataset(fifo)


def test_tokenize_files_fifo(fifo, tmp_path):
    with pytest.raises(ValueError, match="not a regular file"):
        dsv3.data.tokenize_files([fifo], tmp_path / "out.u16")
    assert not os.path.exists(tmp_path / "out.u16")


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json"])
def test_tokenizer_files_fifo(tmp_path, name, request):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text("{}")
    if name != "config.json":
        pytest.importorskip("tokenizers")
        if name == "tokenizer_config.json":
            _write_tokenizer(d / "tokenizer.json")
    else:
        os.remove(d / "config.json")
    make_fifo(d / name, request)
    with pytest.raises(ValueError, match="not a regular file"):
        dsv3.Tokenizer.from_pretrained(d)


def _write_tokenizer(path):
    import tokenizers
    from tokenizers.models import WordLevel
    tokenizers.Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path))


def test_token_file_still_memory_mapped(tmp_path):
    p = tmp_path / "t.u16"
    np.arange(100, dtype=np.uint16).tofile(p)
    d = dsv3.data.TokenDataset(str(p), val_fraction=0.1)
    assert isinstance(d.tokens, np.memmap) and len(d) == 100 and d.train[-1] == 89


def test_hf_tokenizer_still_loads(tmp_path):
    pytest.importorskip("tokenizers")
    (tmp_path / "config.json").write_text("{}")
    _write_tokenizer(tmp_path / "tokenizer.json")
    t = dsv3.Tokenizer.from_pretrained(tmp_path)
    assert t.kind == "huggingface" and list(t.encode("a")) == [0]
