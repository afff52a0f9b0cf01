"""Hostile arguments (issue family of docs: bad input raises, never crashes or misleads)."""
import subprocess
import sys

import numpy as np
import pytest

import dsv3


def test_uint64_ids_do_not_crash():
    # ensure() returned a null array for uint64 (numpy refuses the "unsafe" cast): SIGSEGV
    code = ("import numpy as np, dsv3; m = dsv3.Model(dsv3.Config.tiny()); "
            "a = m.forward(np.arange(5, dtype=np.uint64)); b = m.forward(np.arange(5)); "
            "assert np.array_equal(a, b); "
            "dsv3.ops.embedding(np.arange(5, dtype=np.uint64), np.ones((10, 4), np.float32))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    with pytest.raises(IndexError, match="out of range"):
        dsv3.ops.embedding(np.array([2 ** 64 - 1], np.uint64), np.ones((10, 4), np.float32))


@pytest.mark.parametrize("field,value", [("lr", float("inf")), ("lr", float("nan")),
                                         ("grad_clip", -1.0), ("grad_clip", float("nan")),
                                         ("weight_decay", float("inf")), ("eps", float("inf"))])
def test_trainconfig_refuses_nonfinite_and_negative(field, value):
    with pytest.raises(ValueError, match=field):
        dsv3.TrainConfig(**{field: value})


def test_eos_token_id_must_be_an_integer():
    m = dsv3.Model(dsv3.Config.tiny())
    with pytest.raises(TypeError, match="eos_token_id"):
        m.generate(np.arange(3), max_new_tokens=2, eos_token_id=18.5)


@pytest.mark.parametrize("block", [(1.5, 2), (True, 2), (1,), "ab"])
def test_fp8_block_must_be_two_ints(block):
    with pytest.raises(ValueError, match="block"):
        dsv3.fp8.quantize(np.ones((2, 4), np.float32), block=block)


def test_fp8_block_beyond_int64_is_the_whole_tensor():
    x = np.arange(8, dtype=np.float32).reshape(2, 4) + 1
    c, s = dsv3.fp8.quantize(x, block=(1, 2 ** 64))
    c2, s2 = dsv3.fp8.quantize(x, block=(1, 4))
    assert np.array_equal(c, c2) and np.array_equal(s, s2)
