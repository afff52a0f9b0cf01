"""Hardening of checkpoints, files and the CLI: duplicate tensor names, shard indexes pointing
outside the checkpoint, non-finite weights and scales, FIFOs as inputs, saves that must not
replace user files, one-line CLI errors, in-place bindings, and concurrent saves."""
import json
import os
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest

import dsv3
from dsv3 import _core, checkpoint, safetensors_io as st


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "dsv3", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def model():
    return dsv3.Model(dsv3.Config.tiny(), seed=3)


def hidden(path):
    return sorted(f for f in os.listdir(path) if f.startswith("."))


# ---------------------------------------------------------------- 7. in-place bindings
def adamw_args(n=8, m_dtype=np.float32):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    return w, g, np.zeros(n, m_dtype), np.zeros(n, m_dtype)


@pytest.mark.parametrize("arg", [0, 2, 3])
@pytest.mark.parametrize("bad", ["noncontig", "float64", "readonly", "list"])
def test_adamw_refuses_arrays_it_cannot_update_in_place(arg, bad):
    args = list(adamw_args())
    x = args[arg]
    if bad == "noncontig":
        big = np.zeros(2 * x.size, np.float32)
        big[::2] = x
        x = big[::2]
    elif bad == "float64":
        x = x.astype(np.float64)
    elif bad == "readonly":
        x = x.copy()
        x.flags.writeable = False
    else:
        x = x.tolist()
    args[arg] = x
    name = "wgmv"[arg]
    with pytest.raises((TypeError, ValueError), match=f"{name} is updated in place"):
        _core.adamw_update(*args, 1e-3, 0.9, 0.95, 1e-8, 0.0, 1)


def test_adamw_bf16_moments_must_both_be_uint16():
    w, g, m, _ = adamw_args(m_dtype=np.uint16)
    with pytest.raises(TypeError, match="v is updated in place"):
        _core.adamw_update(w, g, m, np.zeros(8, np.float32), 1e-3, 0.9, 0.95, 1e-8, 0.0, 1)


def test_adamw_noncontiguous_gradient_is_fine():
    w, g, m, v = adamw_args()
    w2, m2, v2 = w.copy(), m.copy(), v.copy()
    big = np.zeros(16, np.float32)
    big[::2] = g
    _core.adamw_update(w, big[::2], m, v, 1e-3, 0.9, 0.95, 1e-8, 0.0, 1)
    _core.adamw_update(w2, g, m2, v2, 1e-3, 0.9, 0.95, 1e-8, 0.0, 1)
    assert np.array_equal(w, w2) and np.array_equal(m, m2) and not np.array_equal(w, g)
