"""Causal attention core: forward vs a float64 reference (explicit masked softmax), backward
vs PyTorch float64 autograd and finite differences; offsets (cached decoding), GQA, odd sizes."""
import numpy as np
import pytest

from dsv3 import ops
from conftest import assert_close, fd_check, get_torch, noncontig, randn


def ref_attention(q, k, v, scale, start_pos):
    """q (B,Tq,H,Dk), k (B,Tk,Hkv,Dk), v (B,Tk,Hkv,Dv); float64; returns (out, lse)."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    B, Tq, H, _ = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    k = np.repeat(k, H // Hkv, axis=2)
    v = np.repeat(v, H // Hkv, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    mask = np.arange(Tk)[None, :] > (start_pos + np.arange(Tq))[:, None]
    s = np.where(mask, -np.inf, s)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    lse = (m + np.log(p.sum(-1, keepdims=True)))[..., 0]
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v), lse


CASES = [  # B, Tq, Tk, H, Hkv, Dk, Dv, start_pos
    (1, 1, 1, 1, 1, 1, 1, 0),
    (2, 31, 31, 3, 3, 24, 16, 0),
    (1, 33, 33, 4, 2, 8, 8, 0),        # GQA
    (2, 129, 129, 2, 1, 12, 20, 0),    # MQA-like, more than two query blocks
    (1, 1, 200, 4, 4, 16, 8, 199),     # one decode step against a long cache
    (2, 1, 90, 8, 2, 24, 16, 60),      # a GQA decode step (a group's heads in one product)
    (2, 7, 50, 2, 2, 8, 8, 43),        # chunked prefill / speculative verify
    (1, 5, 64, 2, 2, 8, 8, 30),        # Tk longer than start_pos + Tq: extra keys masked
    (1, 20, 100, 4, 2, 64, 96, 50),    # the same with transposed keys (Tq >= 16); 6x64 and
                                       # 4x96 tiles of the dK/dV products
    (2, 70, 70, 2, 2, 192, 128, 0),    # head dims of V3 (qk 192, v 128), several query blocks
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}Tq{}Tk{}H{}kv{}Dk{}Dv{}s{}".format(*c))
def test_attention_forward_backward(rng, case):
    B, Tq, Tk, H, Hkv, Dk, Dv, sp = case
    q, k, v = randn(rng, B, Tq, H, Dk), randn(rng, B, Tk, Hkv, Dk), randn(rng, B, Tk, Hkv, Dv)
    scale = Dk ** -0.5 * 1.3
    out, lse = ops.attention(q, k, v, scale, sp)
    ro, rl = ref_attention(q, k, v, scale, sp)
    assert_close("attention out", out, ro, "fp32_reduce")
    assert_close("attention lse", lse, rl, "fp32_reduce")

    torch = get_torch()
    qt, kt, vt = (torch.tensor(a.astype(np.float64), requires_grad=True) for a in (q, k, v))
    kr = kt.repeat_interleave(H // Hkv, dim=2)
    vr = vt.repeat_interleave(H // Hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qt, kr) * scale
    mask = torch.arange(Tk)[None, :] > (sp + torch.arange(Tq))[:, None]
    p = torch.softmax(s.masked_fill(mask, float("-inf")), -1)
    ot = torch.einsum("bhqk,bkhd->bqhd", p, vr)
    d_out = randn(rng, *out.shape)
    ot.backward(torch.tensor(d_out.astype(np.float64)))
    dq, dk, dv = ops.attention_backward(d_out, q, k, v, out, lse, scale, sp)
    assert_close("attention dq", dq, qt.grad.numpy(), "fp32_reduce")
    assert_close("attention dk", dk, kt.grad.numpy(), "fp32_reduce")
    assert_close("attention dv", dv, vt.grad.numpy(), "fp32_reduce")
    if B * Tq * Tk <= 2000:
        loss = lambda q_, k_, v_: float(np.sum(ops.attention(q_, k_, v_, scale, sp)[0]
                                               .astype(np.float64) * d_out))
        fd_check("attention", loss, [q, k, v], [dq, dk, dv], rng)


def test_attention_unbatched_noncontig(rng):
    q, k, v = randn(rng, 6, 2, 8), randn(rng, 6, 2, 8), randn(rng, 6, 2, 4)
    out, lse = ops.attention(noncontig(q), k, noncontig(v), 0.3)
    ro, rl = ref_attention(q[None], k[None], v[None], 0.3, 0)
    assert out.shape == (6, 2, 4) and lse.shape == (2, 6)
    assert_close("attention unbatched", out, ro[0], "fp32_reduce")


def test_prefill_then_decode_equals_full(rng):
    """Rows computed one at a time against the growing key set equal the full causal pass."""
    T, H, D = 20, 2, 8
    q, k, v = randn(rng, 1, T, H, D), randn(rng, 1, T, H, D), randn(rng, 1, T, H, D)
    full, _ = ops.attention(q, k, v, 0.25)
    p, _ = ops.attention(q[:, :12], k[:, :12], v[:, :12], 0.25, 0)
    rows = [p]
    for t in range(12, T):
        o, _ = ops.attention(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], 0.25, t)
        rows.append(o)
    assert_close("prefill+decode", np.concatenate(rows, 1), full, "fp32_reduce")


def test_attention_deterministic(rng):
    q, k, v = randn(rng, 2, 70, 4, 16), randn(rng, 2, 70, 2, 16), randn(rng, 2, 70, 2, 16)
    a = ops.attention(q, k, v, 0.25)
    b = ops.attention(q, k, v, 0.25)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    d = randn(rng, 2, 70, 4, 16)
    g1 = ops.attention_backward(d, q, k, v, a[0], a[1], 0.25)
    g2 = ops.attention_backward(d, q, k, v, a[0], a[1], 0.25)
    assert all(np.array_equal(x, y) for x, y in zip(g1, g2))


def test_attention_errors(rng):
    q, k, v = randn(rng, 1, 4, 4, 8), randn(rng, 1, 4, 2, 8), randn(rng, 1, 4, 2, 8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        ops.attention(q, randn(rng, 1, 4, 3, 8), randn(rng, 1, 4, 3, 8), 1.0)
    with pytest.raises(ValueError, match="start_pos \\+ Tq = 5"):
        ops.attention(q, k, v, 1.0, start_pos=1)
    with pytest.raises(ValueError, match="k head dim"):
        ops.attention(q, randn(rng, 1, 4, 2, 7), v, 1.0)
    with pytest.raises(ValueError, match="same rank"):
        ops.attention(q, k[0], v, 1.0)
    with pytest.raises(ValueError, match=r"start_pos must be an integer in \[0, "):
        ops.attention(q, k, v, 1.0, start_pos=-1)
    with pytest.raises(TypeError, match="v must be a float32"):
        ops.attention(q, k, v.astype(np.float64), 1.0)
    out, lse = ops.attention(q, k, v, 1.0)
    with pytest.raises(ValueError, match="lse must have shape"):
        ops.attention_backward(out, q, k, v, out, lse[:, :1], 1.0)
