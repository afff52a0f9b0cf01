"""embedding, linear, rmsnorm, swiglu, cross-entropy: forward vs float64 references (numpy
formulas / PyTorch float64 autograd), backward vs autograd and finite differences, odd sizes,
non-contiguous and read-only inputs, and the error cases."""
import numpy as np
import pytest

from dsv3 import ops
from conftest import (SIZES_ODD, assert_close, fd_check, get_torch, noncontig, randn, readonly)


def f64(x):
    return np.asarray(x, dtype=np.float64)


# ------------------------------------------------------------------ embedding
@pytest.mark.parametrize("R", SIZES_ODD)
def test_embedding_forward_backward(rng, R):
    V, D = 37, 33
    w = randn(rng, V, D)
    ids = rng.integers(0, V, size=(R,))
    ids[0] = V - 1
    assert_close(f"embedding R={R}", ops.embedding(ids, w), w[ids])
    d_out = randn(rng, R, D)
    want = np.zeros((V, D))
    np.add.at(want, ids, f64(d_out))  # repeated ids accumulate
    assert_close(f"embedding_backward R={R}", ops.embedding_backward(d_out, ids, V), want)


def test_embedding_batched_and_int32(rng):
    w = randn(rng, 11, 5)
    ids = rng.integers(0, 11, size=(2, 3)).astype(np.int32)
    out = ops.embedding(ids, w)
    assert out.shape == (2, 3, 5) and out.dtype == np.float32
    assert_close("embedding batched", out, w[ids])


def test_embedding_errors(rng):
    w = randn(rng, 10, 4)
    with pytest.raises(IndexError, match="token id 10"):
        ops.embedding(np.array([1, 10]), w)
    with pytest.raises(IndexError, match="token id -1"):
        ops.embedding(np.array([-1]), w)
    with pytest.raises(TypeError, match="ids must be an integer"):
        ops.embedding(np.array([1.0]), w)
    with pytest.raises(TypeError, match="weight must be a float32"):
        ops.embedding(np.array([1]), w.astype(np.float64))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        ops.embedding(np.array([1]), w[0])


# ------------------------------------------------------------------ linear
@pytest.mark.parametrize("R,K,O", [(1, 1, 1), (31, 33, 129), (129, 64, 31), (4, 127, 5)])
def test_linear_forward_backward(rng, R, K, O):
    x, w, dy = randn(rng, R, K), randn(rng, O, K), randn(rng, R, O)
    assert_close(f"linear {R}x{K}x{O}", ops.linear(x, w), f64(x) @ f64(w).T, "fp32_grad")
    dx, dw = ops.linear_backward(dy, x, w)
    assert_close("linear dx", dx, f64(dy) @ f64(w), "fp32_grad")
    assert_close("linear dw", dw, f64(dy).T @ f64(x), "fp32_grad")
    loss = lambda x_, w_: float(np.sum(f64(ops.linear(x_, w_)) * f64(dy)))
    fd_check("linear", loss, [x, w], [dx, dw], rng)


def test_linear_leading_dims_noncontig_readonly(rng):
    x, w = randn(rng, 2, 3, 8), randn(rng, 6, 8)
    want = f64(x) @ f64(w).T
    y = ops.linear(noncontig(x), readonly(w))
    assert y.shape == (2, 3, 6)
    assert_close("linear noncontig", y, want, "fp32_grad")
    wt = np.ascontiguousarray(w.T).T  # a transposed (F-ordered) view
    assert_close("linear F-order weight", ops.linear(x, wt), want, "fp32_grad")


def test_linear_errors(rng):
    x, w = randn(rng, 4, 8), randn(rng, 6, 8)
    with pytest.raises(ValueError, match=r"x must have last dimension in_features"):
        ops.linear(randn(rng, 4, 7), w)
    with pytest.raises(TypeError, match="x must be a float32"):
        ops.linear(x.astype(np.float16), w)
    with pytest.raises(TypeError, match="x must be a float32"):
        ops.linear([[1.0] * 8], w)
    with pytest.raises(ValueError, match="dy must have shape"):
        ops.linear_backward(randn(rng, 4, 5), x, w)


# ------------------------------------------------------------------ rmsnorm
def rmsnorm_ref(x, w, eps):
    x = f64(x)
    return f64(w) * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


@pytest.mark.parametrize("R,D", [(1, 1), (31, 33), (129, 16), (3, 2048), (5, 129)])
def test_rmsnorm_forward_backward(rng, R, D):
    eps = 1e-6
    x, w, dy = randn(rng, R, D), randn(rng, D) + 1, randn(rng, R, D)
    assert_close(f"rmsnorm {R}x{D}", ops.rmsnorm(x, w, eps), rmsnorm_ref(x, w, eps))
    torch = get_torch()
    xt = torch.tensor(f64(x), requires_grad=True)
    wt = torch.tensor(f64(w), requires_grad=True)
    yt = wt * xt / torch.sqrt((xt * xt).mean(-1, keepdim=True) + eps)
    yt.backward(torch.tensor(f64(dy)))
    dx, dw = ops.rmsnorm_backward(dy, x, w, eps)
    assert_close("rmsnorm dx", dx, xt.grad.numpy(), "fp32_grad")
    assert_close("rmsnorm dw", dw, wt.grad.numpy(), "fp32_grad")
    loss = lambda x_, w_: float(np.sum(f64(ops.rmsnorm(x_, w_, eps)) * f64(dy)))
    fd_check("rmsnorm", loss, [x, w], [dx, dw], rng)


def test_rmsnorm_threads_deterministic(rng):
    import dsv3
    x, w, dy = randn(rng, 257, 96), randn(rng, 96), randn(rng, 257, 96)
    a = ops.rmsnorm_backward(dy, x, w)
    b = ops.rmsnorm_backward(dy, x, w)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    n = dsv3.get_num_threads()
    try:
        dsv3.set_num_threads(1)
        c = ops.rmsnorm_backward(dy, x, w)
    finally:
        dsv3.set_num_threads(n)
    assert_close("rmsnorm dw 1 thread vs n", c[1], a[1])


def test_rmsnorm_errors(rng):
    x, w = randn(rng, 4, 8), randn(rng, 8)
    with pytest.raises(ValueError, match="weight.shape"):
        ops.rmsnorm(x, randn(rng, 7))
    with pytest.raises(ValueError, match="eps"):
        ops.rmsnorm(x, w, -1.0)
    with pytest.raises(ValueError, match="dy must have the shape of x"):
        ops.rmsnorm_backward(randn(rng, 4, 7), x, w)


# ------------------------------------------------------------------ swiglu
@pytest.mark.parametrize("n", SIZES_ODD + (100_003,))
def test_swiglu_forward_backward(rng, n):
    g, u, dh = randn(rng, n, scale=3), randn(rng, n), randn(rng, n)
    gd = f64(g)
    s = 1 / (1 + np.exp(-gd))
    assert_close(f"swiglu n={n}", ops.swiglu(g, u), gd * s * f64(u))
    dg, du = ops.swiglu_backward(dh, g, u)
    assert_close("swiglu dg", dg, f64(dh) * f64(u) * s * (1 + gd * (1 - s)))
    assert_close("swiglu du", du, f64(dh) * gd * s)
    if n < 1000:
        loss = lambda g_, u_: float(np.sum(f64(ops.swiglu(g_, u_)) * f64(dh)))
        fd_check("swiglu", loss, [g, u], [dg, du], rng)


def test_swiglu_extremes():
    g = np.array([-1000, -100, -88, -20, 0, 20, 88, 100, 1000, np.inf, -np.inf, np.nan],
                 dtype=np.float32)
    u = np.ones_like(g)
    with np.errstate(over="ignore", invalid="ignore"):
        gd = f64(g)
        want = gd / (1 + np.exp(-gd))
    got = ops.swiglu(g, u)
    finite = np.isfinite(gd)
    assert_close("swiglu extremes", got[finite], want[finite])
    assert got[np.isposinf(g)][0] == np.inf and np.isnan(got[np.isnan(g)][0])


def test_swiglu_errors(rng):
    with pytest.raises(ValueError, match="up must have the shape of gate"):
        ops.swiglu(randn(rng, 4), randn(rng, 5))


# ------------------------------------------------------------------ cross-entropy
@pytest.mark.parametrize("R,V", [(1, 1), (31, 33), (129, 7), (8, 1000)])
def test_cross_entropy(rng, R, V):
    x = randn(rng, R, V, scale=4)
    t = rng.integers(0, V, size=R)
    if R > 2:
        t[1] = -100
    torch = get_torch()
    xt = torch.tensor(f64(x), requires_grad=True)
    lt = torch.nn.functional.cross_entropy(xt, torch.tensor(t), ignore_index=-100)
    lt.backward()
    loss, lse, count = ops.cross_entropy(x, t)
    assert count == int(np.sum(t != -100))
    assert_close("ce loss", loss, lt.item(), "fp32_reduce")
    xd = f64(x)
    m = xd.max(-1)
    assert_close("ce lse", lse, m + np.log(np.exp(xd - m[:, None]).sum(-1)), "fp32_reduce")
    d = ops.cross_entropy_backward(x, t, lse, d_loss=1.0)
    assert_close("ce grad", d, xt.grad.numpy(), "fp32_grad")
    if V > 1:
        loss_fn = lambda x_: ops.cross_entropy(x_, t)[0]
        fd_check("cross_entropy", loss_fn, [x], [d], rng)


def test_cross_entropy_all_ignored_and_errors(rng):
    x = randn(rng, 3, 5)
    loss, _, count = ops.cross_entropy(x, np.full(3, -1), ignore_index=-1)
    assert count == 0 and np.isnan(loss)  # PyTorch's mean over no targets
    _, lse, _ = ops.cross_entropy(x, np.full(3, -1), ignore_index=-1)
    assert not ops.cross_entropy_backward(x, np.full(3, -1), lse, ignore_index=-1).any()
    with pytest.raises(IndexError, match="target 5"):
        ops.cross_entropy(x, np.array([0, 5, 1]))
    with pytest.raises(ValueError, match="targets must have shape"):
        ops.cross_entropy(x, np.array([0, 1]))
    with pytest.raises(TypeError, match="targets must be an integer"):
        ops.cross_entropy(x, np.zeros(3, dtype=np.float32))


def test_cross_entropy_batched_leading_dims(rng):
    x = randn(rng, 2, 5, 11)
    t = rng.integers(0, 11, size=(2, 5))
    loss, lse, count = ops.cross_entropy(noncontig(x), t)
    xd = f64(x).reshape(-1, 11)
    ref = np.mean(np.log(np.exp(xd).sum(-1)) - xd[np.arange(10), t.reshape(-1)])
    assert count == 10 and lse.shape == (2, 5)
    assert_close("ce batched", loss, ref, "fp32_reduce")
