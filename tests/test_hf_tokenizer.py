"""dsv3.Tokenizer: a checkpoint's Hugging Face tokenizer.json through the optional
tokenizers package, the byte tokenizer otherwise, and the CLI's generate --prompt with both.
The tokenizer is built here from a word list (nothing downloaded)."""
import json
import subprocess
import sys

import numpy as np
import pytest

import dsv3

tokenizers = pytest.importorskip("tokenizers")
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "fast", "and", "slow", ".", "?"]


def _write_tokenizer(directory):
    from tokenizers import models, pre_tokenizers, processors, decoders
    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(WORDS)})
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                      special_tokens=[("<bos>", 0)])
    tok.add_special_tokens(["<bos>", "<eos>", "<unk>"])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True}))


@pytest.fixture
def checkpoint(tmp_path):
    m = dsv3.Model(dsv3.Config.tiny().replace(vocab_size=len(WORDS) + 3, eos_token_id=None),
                   seed=2)
    m.save_pretrained(tmp_path / "ck")
    _write_tokenizer(tmp_path / "ck")
    return m, tmp_path / "ck"


def test_tokenizer_json_encodes_like_transformers(checkpoint):
    transformers = pytest.importorskip("transformers")
    _, ck = checkpoint
    tok = dsv3.Tokenizer.from_pretrained(ck)
    assert tok.kind == "huggingface" and tok.vocab_size == len(WORDS) + 3
    text = "the cat sat on a mat"
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids[0] == 0  # BOS from the post-processor, once
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ck / "tokenizer.json"))
    assert ids.tolist() == hf(text)["input_ids"]
    assert tok.decode(ids) == text == hf.decode(ids, skip_special_tokens=True)


def test_cli_generate_prompt_uses_tokenizer_json(checkpoint):
    m, ck = checkpoint
    tok = dsv3.Tokenizer.from_pretrained(ck)
    prompt = "the dog ran"
    want = tok.decode(m.generate(tok.encode(prompt), max_new_tokens=6).tokens)
    base = [sys.executable, "-m", "dsv3", "generate", str(ck), "--prompt", prompt,
            "--max-new-tokens", "6", "--no-stats"]
    for extra in ([], ["--stream"]):
        r = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == want.strip() and want.strip()


def test_byte_tokenizer_without_tokenizer_json(tmp_path):
    m = dsv3.Model(dsv3.Config.small().replace(num_hidden_layers=1), seed=0)
    m.save_pretrained(tmp_path / "ck")
    tok = dsv3.Tokenizer.from_pretrained(tmp_path / "ck")
    assert tok.kind == "byte"
    assert tok.encode("hé").tolist() == [256, 104, 195, 169]
    assert tok.decode([256, 104, 195, 169, 257]) == "hé"


def test_missing_tokenizers_package_is_named(checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        dsv3.Tokenizer.from_pretrained(checkpoint[1])


def test_corrupt_tokenizer_json(checkpoint):
    (checkpoint[1] / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        dsv3.Tokenizer.from_pretrained(checkpoint[1])


def test_text_stream_waits_for_complete_characters():
    import io
    from dsv3.tokenizer import TextStream
    out = io.StringIO()
    stream = TextStream(dsv3.Tokenizer.byte(), out)
    seen = []
    for ids in ([104], [195], [169], [33]):  # "h", then "é" in two bytes, then "!"
        stream(0, ids)
        seen.append(out.getvalue())
    assert seen == ["h", "h", "hé", "hé!"]


def test_text_stream_finish_writes_the_rest():
    """Review K3: a trailing incomplete UTF-8 sequence is written at the end (the streamed
    text equals decode of all the tokens), and text a decoder revised is not lost."""
    import io
    from dsv3.tokenizer import TextStream
    tok = dsv3.Tokenizer.byte()
    out = io.StringIO()
    stream = TextStream(tok, out)
    stream(0, [104])
    stream(0, [195])  # the first byte of "é", never completed
    stream.finish()
    assert out.getvalue() == tok.decode([104, 195]) == "h\ufffd"

    class Revising:  # a decoder that is not prefix-stable
        def decode(self, ids):
            return {1: "a", 2: "b c"}[len(ids)]
    out = io.StringIO()
    stream = TextStream(Revising(), out)
    stream(0, [5])
    stream(0, [6])
    stream.finish()
    assert out.getvalue().endswith("b c")


def test_cli_stream_ends_with_partial_character(tmp_path):
    """The CLI's --stream prints what the non-streamed output prints."""
    m = dsv3.Model(dsv3.Config.small().replace(num_hidden_layers=1), seed=0)
    m.save_pretrained(tmp_path / "ck")
    base = [sys.executable, "-m", "dsv3", "generate", str(tmp_path / "ck"), "--prompt", "h",
            "--max-new-tokens", "12", "--no-stats"]
    outs = [subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
            for extra in ([], ["--stream"])]
    assert all(r.returncode == 0 for r in outs), outs
    assert outs[0].stdout == outs[1].stdout


def test_mistyped_directory_is_an_error(tmp_path):
    """Review K1: not the byte tokenizer for a directory that is not there."""
    with pytest.raises(FileNotFoundError, match="directory"):
        dsv3.Tokenizer.from_pretrained(tmp_path / "no-such-dir")


@pytest.mark.parametrize("call, match", [
    (lambda t: t.encode(5), "text must be a str"),
    (lambda t: t.encode(b"abc"), "text must be a str"),
    (lambda t: t.decode("abc"), "ids must be integer"),
    (lambda t: t.decode([1.5, 2.0]), "ids must be integer"),
])
def test_wrong_types_name_the_argument(call, match):
    """Review K2: encode(5) gave five zero bytes, decode("abc") an unrelated error."""
    with pytest.raises(TypeError, match=match):
        call(dsv3.Tokenizer.byte())
