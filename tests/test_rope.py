"""RoPE with YaRN (semantics §2.2) vs a float64 numpy reference written here from the formulas."""
import math

import numpy as np
import pytest

from dsv3 import Config, ops
from conftest import assert_close, fd_check, noncontig, randn
from dsv3.reference.nn import ref_inv_freq

V3_YARN = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
           "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"}


def ref_rope(x, pos, theta, rs):
    """Adjacent pairs (x[2i], x[2i+1]) rotated by pos * f_i; x (..., T, H, d)."""
    d = x.shape[-1]
    f, mult, _, _ = ref_inv_freq(d, theta, rs)
    ang = np.asarray(pos, dtype=np.float64)[..., None] * f          # (..., T, d/2)
    c, s = np.cos(ang)[..., None, :] * mult, np.sin(ang)[..., None, :] * mult
    x = np.asarray(x, dtype=np.float64)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


def test_v3_yarn_numbers():
    t = ops.rope_table(64, 10000.0, V3_YARN)
    assert (t["low"], t["high"]) == (10, 23)             # semantics §2.2: V3 gives low 10, high 23
    assert t["attn_factor"] == 1.0                       # mscale == mscale_all_dim
    assert round(Config.deepseek_v3().softmax_scale, 6) == 0.135234
    f, _, low, high = ref_inv_freq(64, 10000.0, V3_YARN)
    assert (low, high) == (10, 23)
    assert_close("V3 yarn inv_freq", t["inv_freq"], f, rtol=1e-14, atol=0)


def test_v2_lite_mscale_factor():
    rs = dict(V3_YARN, mscale=0.707, mscale_all_dim=0.707)
    assert ops.rope_table(64, 10000.0, rs)["attn_factor"] == pytest.approx(1.0)
    rs = dict(V3_YARN, mscale=1.0, mscale_all_dim=0.0)
    assert ops.rope_table(64, 10000.0, rs)["attn_factor"] == pytest.approx(
        0.1 * math.log(40) + 1)


@pytest.mark.parametrize("rs", [None, V3_YARN, dict(V3_YARN, factor=4, mscale=0.9,
                                                     mscale_all_dim=0.5, beta_fast=8)])
@pytest.mark.parametrize("shape", [(1, 1, 2), (33, 3, 8), (2, 31, 1, 64), (129, 2, 16)])
def test_rope_forward_backward(rng, rs, shape):
    x = randn(rng, *shape)
    T = shape[-3]
    pos = rng.integers(0, 200_000, size=shape[:-2])
    pos.reshape(-1)[0] = 0
    theta = 10000.0
    want = ref_rope(x, pos, theta, rs)
    assert_close(f"rope {shape}", ops.rope(x, pos, theta, rs), want)
    if len(shape) == 4:  # shared positions (T,) across the batch
        assert_close("rope shared pos", ops.rope(x, pos[0], theta, rs),
                     ref_rope(x, np.broadcast_to(pos[0], (shape[0], T)), theta, rs))
    dy = randn(rng, *shape)
    dx = ops.rope_backward(dy, pos, theta, rs)
    # the map is linear: dL/dx = J^T dy; check by <J v, dy> == <v, J^T dy>
    v = randn(rng, *shape)
    assert_close("rope adjoint", np.sum(ref_rope(v, pos, theta, rs) * dy),
                 np.sum(v.astype(np.float64) * dx), "fp32_reduce")
    loss = lambda x_: float(np.sum(ops.rope(x_, pos, theta, rs).astype(np.float64) * dy))
    fd_check("rope", loss, [x], [dx], rng)


def test_rope_long_positions_exact(rng):
    """Angles are formed in double: position 150k must be as exact as position 1."""
    x = randn(rng, 4, 2, 64)
    pos = np.array([1, 4097, 65_537, 163_839])
    assert_close("rope long positions", ops.rope(x, pos, 10000.0, V3_YARN),
                 ref_rope(x, pos, 10000.0, V3_YARN))


def test_rope_matches_halves_layout_scores(rng):
    """semantics §2.2: Hugging Face permutes to halves first and gets the same scores q.k."""
    d, T = 16, 9
    q, k = randn(rng, T, 1, d), randn(rng, T, 1, d)
    pos = np.arange(T)
    s_adj = np.einsum("thd,shd->ts", ops.rope(q, pos), ops.rope(k, pos)).astype(np.float64)
    perm = np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])
    f = 10000.0 ** (-np.arange(0, d, 2) / d)
    ang = pos[:, None] * np.concatenate([f, f])[None, :]
    rot_half = lambda x: np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    qh, kh = q[:, 0, perm].astype(np.float64), k[:, 0, perm].astype(np.float64)
    qh = qh * np.cos(ang) + rot_half(qh) * np.sin(ang)
    kh = kh * np.cos(ang) + rot_half(kh) * np.sin(ang)
    assert_close("adjacent vs halves scores", s_adj, qh @ kh.T, "fp32_reduce")


def test_rope_noncontig_and_errors(rng):
    x = randn(rng, 5, 2, 8)
    pos = np.arange(5)
    assert_close("rope noncontig", ops.rope(noncontig(x), pos), ref_rope(x, pos, 1e4, None))
    with pytest.raises(ValueError, match="even"):
        ops.rope(randn(rng, 5, 2, 7), pos)
    with pytest.raises(ValueError, match="positions must have shape"):
        ops.rope(x, np.arange(4))
    with pytest.raises(ValueError, match="positions must be >= 0"):
        ops.rope(x, np.array([0, 1, -2, 3, 4]))
    with pytest.raises(ValueError, match="must have 3 to 4 dimensions"):
        ops.rope(randn(rng, 5, 8), pos)
    with pytest.raises(ValueError, match="yarn"):
        ops.rope(x, pos, rope_scaling={"type": "linear", "factor": 2})
    with pytest.raises(ValueError, match="factor must be > 0"):
        ops.rope(x, pos, rope_scaling=dict(V3_YARN, factor=-1))
    with pytest.raises(TypeError, match="positions must be an integer"):
        ops.rope(x, pos.astype(np.float32))
