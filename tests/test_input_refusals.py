"""Small refusals found by tests/hostile (each of these was a crash or a silent wrong result):
fp8 blocks far beyond the tensor, non-finite temperature, generating from NaN weights, token ids
outside the vocabulary in decode, negative ids in a TokenDataset, tokenize_files over its input."""
import subprocess
import sys

import numpy as np
import pytest

import dsv3


def test_fp8_block_far_beyond_the_tensor_is_the_whole_tensor():
    # block (2**40, 2**40) reached the engine as is and died of SIGFPE: run it in a child
    code = ("import numpy as np, dsv3\n"
            "x = np.arange(1, 9, dtype=np.float32).reshape(2, 4)\n"
            "for b in [(2**40, 2**40), (2**31, 2**31), (1, 2**40)]:\n"
            "    c, s = dsv3.fp8.quantize(x, block=b)\n"
            "    w = dsv3.fp8.quantize(x, block=(min(b[0], 2), 4))\n"
            "    assert np.array_equal(c, w[0]) and np.array_equal(s, w[1]), b\n"
            "    assert np.array_equal(dsv3.fp8.dequantize(c, s, block=b), dsv3.fp8.dequantize(*w, block=(min(b[0], 2), 4)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])


def test_fp8_block_rows_beyond_a_non_2d_tensor_still_refused():
    with pytest.raises(ValueError, match="2-D"):
        dsv3.fp8.quantize(np.ones((3, 2, 5), np.float32), block=(2**40, 5))


@pytest.mark.parametrize("t", [float("inf"), float("nan"), -1.0])
def test_temperature_must_be_finite(t):
    with pytest.raises(ValueError, match="temperature"):
        dsv3.Model(dsv3.Config.tiny()).generate(np.arange(3), max_new_tokens=2, temperature=t)


def test_generate_refuses_non_finite_logits():
    m = dsv3.Model(dsv3.Config.tiny())
    sd = m.state_dict()
    sd["lm_head.weight"][5, :] = np.nan  # one row: logits NaN at id 5 only
    m.load_state_dict(sd)
    for kw in ({}, {"temperature": 1.0}, {"speculative": "mtp"}):
        with pytest.raises(ValueError, match="non-finite logits"):
            m.generate(np.arange(3), max_new_tokens=4, **kw)


def test_decode_refuses_ids_outside_the_vocabulary():
    t = dsv3.Tokenizer.byte()
    assert t.decode([72, 105, 257]) == "Hi"  # specials are still dropped
    with pytest.raises(ValueError, match="vocab_size 264"):
        t.decode([72, 1065])


def test_token_dataset_refuses_negative_ids():
    with pytest.raises(ValueError, match=">= 0"):
        dsv3.data.TokenDataset(np.array([1, 2, -3, 4]))


def test_tokenize_files_refuses_to_overwrite_its_input(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("precious")
    with pytest.raises(ValueError, match="one of the input files"):
        dsv3.data.tokenize_files([a], a)
    assert a.read_text() == "precious"
    assert dsv3.data.tokenize_files([a], tmp_path / "out.u16") == len("precious") + 1
