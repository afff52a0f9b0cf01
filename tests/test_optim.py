"""AdamW, schedules and clipping vs float64 references written here from the formulas."""
import math

import numpy as np
import pytest

import dsv3
from dsv3 import _core


def bf16_round(x):
    """float64 -> the nearest bf16 value (RNE on the fp32 bits), as float64."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def ref_adamw(w, g, m, v, lr, b1, b2, eps, wd, t, moments_bf16=False):
    w = w * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    if moments_bf16:
        m, v = bf16_round(m), bf16_round(v)
    w = w - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return w, m, v


@pytest.mark.parametrize("moments", ["float32", "bfloat16"])
def test_adamw_vs_float64_reference(rng, moments):
    n = 1031  # odd size
    w = rng.standard_normal(n).astype(np.float32)
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.95, 1e-8, 0.1
    bf = moments == "bfloat16"
    m = np.zeros(n, np.uint16 if bf else np.float32)
    v = np.zeros_like(m)
    W, M, Vv = w.astype(np.float64), np.zeros(n), np.zeros(n)
    for t in range(1, 6):
        g = (rng.standard_normal(n) * 10.0 ** rng.integers(-4, 1, n)).astype(np.float32)
        _core.adamw_update(w, g, m, v, lr, b1, b2, eps, wd, t)
        W, M, Vv = ref_adamw(W, g.astype(np.float64), M, Vv, lr, b1, b2, eps, wd, t, bf)
        # fp32: ~3 roundings of a |w| ~ 1 value per step (ulp 1.2e-7), 5 steps -> 2e-6.
        # bf16 moments: the reference rounds the float64 moments, the kernel the fp32 ones;
        # they can land one bf16 ulp (2^-7 relative) apart, which moves m/sqrt(v) (<= ~3 after
        # bias correction) by <= ~1.2% of lr per step.
        tol = 2e-6 + 3e-6 * np.abs(W) + (2e-2 * lr * t if bf else 0.0)
        err = np.abs(w - W)
        assert (err <= tol).all(), f"{moments} step {t}: max err {err.max():.3g}"
    if bf:
        got = (m.astype(np.uint32) << 16).view(np.float32)
        assert np.allclose(got, M, rtol=2 ** -7, atol=0), "bf16 first moment"
    else:
        # the moments mix g of magnitudes 1e-4..1: errors are relative to the largest term
        assert np.allclose(m, M, rtol=1e-5, atol=1e-6 * np.abs(M).max())
        assert np.allclose(v, Vv, rtol=1e-5, atol=1e-6 * np.abs(Vv).max())


def test_adamw_bad_arguments():
    w = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="step"):
        _core.adamw_update(w, w.copy(), w.copy(), w.copy(), 1e-3, 0.9, 0.95, 1e-8, 0.0, 0)
    with pytest.raises(ValueError, match="same size"):
        _core.adamw_update(w, np.zeros(3, np.float32), w.copy(), w.copy(), 1e-3, 0.9, 0.95,
                           1e-8, 0.0, 1)


def test_schedules():
    c = dsv3.TrainConfig(lr=1e-3, warmup_steps=10, schedule="cosine", total_steps=110,
                         min_lr=1e-4)
    assert c.lr_at(0) == pytest.approx(1e-4)
    assert c.lr_at(4) == pytest.approx(5e-4)
    assert c.lr_at(9) == pytest.approx(1e-3)
    assert c.lr_at(10) == pytest.approx(1e-3)
    assert c.lr_at(60) == pytest.approx(1e-4 + 0.5 * 9e-4)              # half way: cos = 0
    assert c.lr_at(35) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi / 4)))
    assert c.lr_at(110) == pytest.approx(1e-4) and c.lr_at(500) == pytest.approx(1e-4)
    lin = dsv3.TrainConfig(lr=1e-3, warmup_steps=0, schedule="linear", total_steps=100)
    assert lin.lr_at(0) == pytest.approx(1e-3) and lin.lr_at(25) == pytest.approx(7.5e-4)
    const = dsv3.TrainConfig(lr=2e-3, warmup_steps=4, schedule="constant")
    assert [const.lr_at(i) for i in (0, 3, 4, 1000)] == pytest.approx([5e-4, 2e-3, 2e-3, 2e-3])
    with pytest.raises(ValueError, match="total_steps"):
        dsv3.TrainConfig(schedule="cosine").lr_at(0)


@pytest.mark.parametrize("field,value", [("lr", 0.0), ("schedule", "step"), ("betas", (0.9, 1.0)),
                                         ("precision", "fp16"), ("balance", "aux"),
                                         ("moment_dtype", "float16"), ("grad_accum", 0)])
def test_train_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        dsv3.TrainConfig(**{field: value})


def test_grad_norm_and_clipping(rng):
    """grad_norm = the float64 norm of the model's gradient; with clipping active the update
    of a parameter with Adam's first step (m/sqrt(v) = g/|g| elementwise) is unchanged in
    direction, so check clipping on the moments: m = (1-b1) * clipped g."""
    cfg = dsv3.Config.tiny()
    b = rng.integers(0, cfg.vocab_size, size=(2, 9))
    _, grads = dsv3.Model(cfg, seed=1).loss_and_grad(b)
    norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    m = dsv3.Model(cfg, seed=1)
    t = dsv3.Trainer(m, dsv3.TrainConfig(lr=1e-3, schedule="constant", grad_clip=norm / 4,
                                         balance="aux_loss"))
    st = t.step(b)
    assert st["grad_norm"] == pytest.approx(norm, rel=1e-5)
    m1, _ = t.moments()
    assert set(m1) == set(grads)
    for name, g in grads.items():
        want = 0.1 * g.astype(np.float64) * (norm / 4) / (norm + 1e-6)
        np.testing.assert_allclose(m1[name], want, rtol=1e-5, atol=1e-7 * np.abs(want).max(),
                                   err_msg=name)
