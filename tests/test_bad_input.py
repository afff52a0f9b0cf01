"""The bad-input matrix: every public entry-point family (ops, fp8, model, checkpoint I/O,
trainer, generate, config, CLI) answers wrong dtypes, ranks, empty arrays, huge sizes, NaN/Inf,
out-of-range ids and invalid configs with the documented exception and a message naming the
argument, and stays usable afterwards."""
import json
import subprocess
import sys

import numpy as np
import pytest

import dsv3
from dsv3 import fp8, ops

CFG = dsv3.Config.tiny()
D = CFG.hidden_size
F32 = np.float32


@pytest.fixture(scope="module")
def model():
    return dsv3.Model(CFG, seed=0)


def z(*shape, dtype=F32):
    return np.zeros(shape, dtype)


# (family, case, call(model), exception, message fragment)
MATRIX = [
    ("ops", "dtype", lambda m: ops.linear(z(2, 4, dtype=np.float64), z(3, 4)), TypeError, "x must be a float32"),
    ("ops", "list", lambda m: ops.rmsnorm([[1.0]], z(1)), TypeError, "x must be a float32"),
    ("ops", "rank", lambda m: ops.attention(z(4, 8), z(4, 8), z(4, 8), 1.0), ValueError, "dimensions"),
    ("ops", "shape", lambda m: ops.swiglu(z(3), z(4)), ValueError, "up must have the shape of gate"),
    ("ops", "id", lambda m: ops.embedding(np.array([5]), z(5, 2)), IndexError, "token id 5"),
    ("ops", "negative id", lambda m: ops.cross_entropy(z(2, 3), np.array([0, -7])), IndexError, "target -7"),
    ("ops", "positions", lambda m: ops.rope(z(3, 1, 4), np.array([0, -1, 2])), ValueError, "positions must be >= 0"),
    ("ops", "NaN gate", lambda m: ops.moe_gate(np.full((2, D), np.nan, F32), z(8, D), z(8), CFG), ValueError, "x must be finite"),
    ("ops", "bias length", lambda m: ops.moe_gate(z(2, D), z(8, D), z(7), CFG), ValueError, "bias"),
    ("fp8", "dtype", lambda m: fp8.cast(z(3, dtype=np.int32)), TypeError, "x must be a float32"),
    ("fp8", "codes dtype", lambda m: fp8.decode(z(3)), TypeError, "codes must be a uint8"),
    ("fp8", "NaN", lambda m: fp8.quantize(np.full((1, 4), np.nan, F32)), ValueError, "x must be finite"),
    ("fp8", "block", lambda m: fp8.quantize(z(2, 4), block=(0, 4)), ValueError, "block"),
    ("fp8", "format", lambda m: fp8.quantize(z(2, 4), fmt="e3m4"), ValueError, "fmt must be one of"),
    ("model", "empty", lambda m: m.forward(z(1, 0, dtype=np.int64)), ValueError, "tokens must hold at least"),
    ("model", "dtype", lambda m: m.forward(z(1, 3)), TypeError, "tokens must be an integer"),
    ("model", "rank", lambda m: m.forward(z(1, 1, 1, dtype=np.int64)), ValueError, "dimensions"),
    ("model", "id", lambda m: m.forward(np.array([[0, 64]])), IndexError, "token id 64"),
    ("model", "short loss", lambda m: m.loss(np.array([[1]])), ValueError, "at least 2 token"),
    ("model", "huge cache", lambda m: m.new_cache(1 << 20, 1 << 20), ValueError, "needs [0-9]+ bytes"),  # dsv3._memory's refusal
    ("model", "zero cache", lambda m: m.new_cache(0, 10), ValueError, r"batch must be an integer in \[1, "),
    ("model", "state shape", lambda m: m.load_state_dict({"lm_head.weight": z(2, 2)}, strict=False), ValueError, "must have shape"),
    ("checkpoint", "missing", lambda m: dsv3.Model.from_pretrained("/nonexistent/dsv3"), FileNotFoundError, "not a directory"),
    ("checkpoint", "dtype", lambda m: m.save_pretrained("/tmp/dsv3-never", dtype="int4"), ValueError, "dtype must be one of"),
    ("generate", "empty", lambda m: m.generate(z(0, dtype=np.int64)), ValueError, "prompt is empty"),
    ("generate", "temperature", lambda m: m.generate(np.array([1]), temperature=-1), ValueError, "temperature"),
    ("generate", "top_p", lambda m: m.generate(np.array([1]), top_p=0), ValueError, "top_p"),
    ("generate", "top_k", lambda m: m.generate(np.array([1]), top_k=-1), ValueError, "top_k"),
    ("generate", "id", lambda m: m.generate(np.array([999])), IndexError, "999"),
    ("trainer", "short batch", lambda m: dsv3.Trainer(m, dsv3.TrainConfig(schedule="constant")).step(z(2, 1, dtype=np.int64)), ValueError, "at least 2 tokens"),
    ("trainer", "id", lambda m: dsv3.Trainer(m, dsv3.TrainConfig(schedule="constant")).step(np.full((2, 5), 999)), (ValueError, IndexError), "999"),
    ("trainer", "lr", lambda m: dsv3.TrainConfig(lr=-1), ValueError, "lr"),
    ("trainer", "precision", lambda m: dsv3.TrainConfig(precision="fp4"), ValueError, "precision"),
    ("config", "combination", lambda m: CFG.replace(topk_group=9), ValueError, "topk_group"),
    ("config", "type", lambda m: CFG.replace(hidden_size="big"), ValueError, "hidden_size"),
    ("config", "not a dict", lambda m: dsv3.Config.from_dict([1]), TypeError, "expected a dict"),
]


@pytest.mark.parametrize("family,case,call,exc,msg", MATRIX, ids=[f"{f}-{c}" for f, c, *_ in MATRIX])
def test_bad_input_raises_and_object_stays_usable(model, family, case, call, exc, msg):
    tokens = np.arange(10).reshape(1, 10) % CFG.vocab_size
    before = model.forward(tokens)
    with pytest.raises(exc, match=msg):
        call(model)
    assert np.array_equal(model.forward(tokens), before), "the model changed after a failed call"


def test_noncontiguous_and_readonly_inputs_work(model):
    t = np.arange(20).reshape(2, 10) % CFG.vocab_size
    ro = t.copy()
    ro.flags.writeable = False
    nc = np.repeat(t, 2, axis=1)[:, ::2]
    assert not nc.flags.c_contiguous
    want = model.forward(t)
    assert np.array_equal(model.forward(ro), want) and np.array_equal(model.forward(nc), want)
    x = np.asfortranarray(np.random.default_rng(0).standard_normal((5, 8)).astype(F32))
    x.flags.writeable = False
    assert np.array_equal(fp8.cast(x), fp8.cast(np.ascontiguousarray(x)))


def test_inf_in_model_weights_is_reported(model):
    sd = model.state_dict()
    bad = dict(sd)
    bad["model.embed_tokens.weight"] = np.full_like(sd["model.embed_tokens.weight"], np.inf)
    model.load_state_dict(bad)
    try:
        with pytest.raises((ValueError, FloatingPointError), match="finite|NaN|nan"):
            model.loss(np.arange(12).reshape(1, 12) % CFG.vocab_size)
    finally:
        model.load_state_dict(sd)


@pytest.mark.parametrize("args,msg", [
    (["info", "--config", "nope"], "nope"),
    (["generate", "/nonexistent/ckpt", "--prompt", "x"], "not found"),
    (["train", "--config", "tiny", "--steps", "1", "--out", "/tmp/dsv3-cli-bad"], "vocab_size"),
    (["frobnicate"], "invalid choice"),
])
def test_cli_bad_input(args, msg):
    r = subprocess.run([sys.executable, "-m", "dsv3", *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and msg in r.stderr + r.stdout, r.stderr[-500:]
    assert "Traceback" not in r.stderr, r.stderr[-800:]
