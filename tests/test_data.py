"""dsv3.data: byte tokenizer, token datasets (windows, split, resumable RNG), corpora."""
import os

import numpy as np
import pytest

import dsv3
from dsv3 import data


def test_byte_tokenizer_roundtrip_and_specials():
    tok = data.ByteTokenizer()
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id) == (264, 256, 257)
    cfg = dsv3.Config.small()
    assert cfg.vocab_size == tok.vocab_size
    assert (cfg.bos_token_id, cfg.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    text = "héllo, wörld ✓\n"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids.dtype == np.int64
    assert ids[0] == 256 and ids[-1] == 257
    assert list(ids[1:-1]) == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="ids"):
        tok.decode([300])


def test_windows_are_contiguous_deterministic_and_from_train_split():
    toks = np.arange(1000) % 250
    a = data.TokenDataset(toks.astype(np.uint16), seed=3, val_fraction=0.2)
    b = data.TokenDataset(toks.astype(np.uint16), seed=3, val_fraction=0.2)
    assert len(a.train) == 800 and len(a.val) == 200
    x = a.batch(5, 16)
    assert x.shape == (5, 17) and x.dtype == np.int64
    np.testing.assert_array_equal(x, b.batch(5, 16))
    for row in x:  # contiguous windows of the training part
        start = int(np.flatnonzero(toks[:800 - 16] == row[0])[0])
        np.testing.assert_array_equal(row, toks[start:start + 17])
        assert start + 17 <= 800
    c = data.TokenDataset(toks.astype(np.uint16), seed=4, val_fraction=0.2)
    assert not np.array_equal(c.batch(5, 16), data.TokenDataset(toks, seed=3).batch(5, 16))
    v1, v2 = a.val_batches(2, 16, 3), a.val_batches(2, 16, 3)
    assert len(v1) == 3 and all(np.array_equal(p, q) for p, q in zip(v1, v2))
    for vb in v1:  # held-out windows only
        assert np.isin(vb, toks[800:]).all()


def test_rng_state_resumes():
    toks = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint16)
    a = data.TokenDataset(toks, seed=1)
    a.batch(4, 32)
    state = a.state_dict()
    want = [a.batch(4, 32) for _ in range(3)]
    b = data.TokenDataset(toks, seed=99)
    b.load_state_dict(state)
    for w in want:
        np.testing.assert_array_equal(b.batch(4, 32), w)


def test_load_directory_and_memmap(tmp_path):
    (tmp_path / "a.txt").write_text("abc" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_bytes(bytes(range(200)))
    ds = data.load(tmp_path, cache_dir=tmp_path / "cache", val_fraction=0.1)
    assert isinstance(ds.tokens, np.memmap)
    # files in sorted order, each followed by eos
    want = list(b"abc" * 100) + [257] + list(range(200)) + [257]
    np.testing.assert_array_equal(np.asarray(ds.tokens), want)
    assert data.load(tmp_path / "a.txt", cache_dir=tmp_path / "cache").tokens.size == 301
    with pytest.raises(FileNotFoundError):
        data.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="shorter"):
        data.TokenDataset(np.arange(10), val_fraction=0.5).batch(1, 8)
    with pytest.raises(ValueError, match="vocab_size"):
        data.TokenDataset(np.array([1, 2, 300]), vocab_size=264)


def test_default_corpus_is_stdlib_python():
    files = data.default_corpus()
    assert len(files) > 100
    assert all(f.endswith(".py") and os.path.isfile(f) for f in files[:50])
    assert not any("site-packages" in f for f in files)
    assert any(f.endswith(os.sep + "os.py") for f in files)


def test_unigram_baseline():
    toks = np.array([0, 0, 0, 1] * 250, np.uint16)
    ds = data.TokenDataset(toks, val_fraction=0.2)
    # train part (first 800): 600 zeros, 200 ones; add-one smoothing over the 2 symbols
    p0, p1 = (600 + 1) / 802, (200 + 1) / 802
    want = -(150 * np.log(p0) + 50 * np.log(p1)) / 200
    assert ds.unigram_entropy() == pytest.approx(want, rel=1e-9)
