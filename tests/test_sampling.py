"""Sampling (semantics §3): temperature 0 = argmax, top-k / top-p masks vs an independent
reference, seeds, and chi-square tests that samples follow softmax(logits / T) -- for plain
sampling and for MTP speculative sampling (whose output distribution must be the model's).

Chi-square tests use fixed seeds and reject at p < 1e-3: a correct sampler fails one of them
with probability ~1e-3 per test over the choice of seeds (the seeds here pass); a sampler off
by a few percent of mass on a likely token fails (see test_chi_square_detects_a_biased_sampler)."""
import itertools

import numpy as np
import pytest

import dsv3
from dsv3.generate import draw, probs
from conftest import get_torch

P_REJECT = 1e-3


def ref_probs(logits, T, top_k, top_p):
    """Independent: sort once descending (ties by id), cut to top_k, then to the shortest
    prefix whose mass >= top_p, renormalise."""
    l = np.asarray(logits, np.float64) / T
    order = sorted(range(len(l)), key=lambda i: (-l[i], i))
    if top_k:
        order = order[:top_k]
    w = np.exp(l[order] - l[order[0]])
    w /= w.sum()
    keep, mass = [], 0.0
    for i, wi in zip(order, w):
        keep.append(i)
        mass += wi
        if mass >= top_p - 1e-12:
            break
    p = np.zeros(len(l))
    p[keep] = np.exp(l[keep] - l[order[0]])
    return p / p.sum()


def chi_square_p(counts, expected_probs):
    """p-value of counts vs expected probabilities; cells with expected count < 5 are pooled."""
    counts = np.asarray(counts, float)
    exp = np.asarray(expected_probs, float) * counts.sum()
    assert np.all(counts[exp == 0] == 0), "a sample hit a zero-probability outcome"
    small = exp < 5
    c = np.append(counts[~small], counts[small].sum())
    e = np.append(exp[~small], exp[small].sum())
    if e[-1] == 0:
        c, e = c[:-1], e[:-1]
    stat = float(np.sum((c - e) ** 2 / e))
    return chi2_sf(stat, len(c) - 1)


def chi2_sf(x, dof):
    """P(X >= x) for a chi-square variable with dof degrees of freedom: the regularized upper
    incomplete gamma Q(dof/2, x/2) (PyTorch's gammaincc, the test oracle already installed)."""
    torch = get_torch()
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                         torch.tensor(x / 2.0, dtype=torch.float64)))


def test_temperature_zero_is_argmax():
    l = np.array([0.1, 2.0, 2.0, -1.0])
    np.testing.assert_array_equal(probs(l, 0.0), [0, 1, 0, 0])  # lowest id among ties
    assert draw(probs(l, 0.0), np.random.default_rng(0), greedy=True) == 1


@pytest.mark.parametrize("T,top_k,top_p", [(1.0, 0, 1.0), (0.5, 3, 1.0), (1.3, 0, 0.7),
                                           (0.9, 5, 0.5), (1.0, 1, 1.0), (2.0, 0, 1e-6),
                                           (1.0, 100, 0.999)])
def test_top_k_top_p_masks_vs_reference(T, top_k, top_p):
    rng = np.random.default_rng(7)
    for _ in range(20):
        l = rng.standard_normal(31) * 2
        p = probs(l, T, top_k, top_p)
        np.testing.assert_allclose(p, ref_probs(l, T, top_k, top_p), rtol=1e-12, atol=1e-15)
        assert abs(p.sum() - 1) < 1e-12
        if top_k:
            assert np.count_nonzero(p) <= top_k
            assert set(np.flatnonzero(p)) <= set(np.argsort(-l, kind="stable")[:top_k])


def test_draw_matches_softmax_chi_square():
    l = np.array([1.0, 0.2, -0.5, 2.0, 0.0])
    for T in (1.0, 0.5, 3.0):
        p = probs(l, T)
        rng = np.random.default_rng(11)
        counts = np.bincount([draw(p, rng, False) for _ in range(20000)], minlength=5)
        assert chi_square_p(counts, p) > P_REJECT, (T, counts)


def test_chi_square_detects_a_biased_sampler():
    p = probs(np.array([1.0, 0.2, -0.5, 2.0, 0.0]), 1.0)
    q = p.copy()
    q[3] -= 0.03
    q[0] += 0.03
    rng = np.random.default_rng(11)
    counts = np.bincount([draw(q, rng, False) for _ in range(20000)], minlength=5)
    assert chi_square_p(counts, p) < P_REJECT


@pytest.fixture(scope="module")
def peaky():
    """vocab 8, larger init: distributions far from uniform, and an MTP module (untrained)
    whose drafts are accepted ~30% of the time, so both branches of the acceptance run."""
    cfg = dsv3.Config.tiny().replace(vocab_size=8, bos_token_id=0, eos_token_id=1,
                                     initializer_range=0.3)
    threads = dsv3.get_num_threads()
    dsv3.set_num_threads(1)  # thousands of tiny calls: threads only add contention
    yield dsv3.Model(cfg, seed=2)
    dsv3.set_num_threads(threads)


def exact_joint(m, prompt, n, T, top_k, top_p):
    """P(t_1..t_n | prompt) for every continuation, from full forwards."""
    V = m.config.vocab_size
    out = {}
    for cont in itertools.product(range(V), repeat=n - 1):
        seq = np.array(list(prompt) + list(cont))
        logits = m.forward(seq)
        pr = 1.0
        for j, t in enumerate(cont):
            pr *= probs(logits[len(prompt) - 1 + j], T, top_k, top_p)[t]
        last = probs(logits[-1], T, top_k, top_p)
        for t in range(V):
            out[cont + (t,)] = pr * last[t]
    return out


@pytest.mark.parametrize("spec,draft,n,T,top_k,top_p", [
    (None, 1, 2, 1.0, 0, 1.0),
    ("mtp", 1, 2, 1.0, 0, 1.0),
    ("mtp", 2, 3, 0.8, 5, 0.95),
])
def test_sampled_sequences_follow_the_model(peaky, spec, draft, n, T, top_k, top_p):
    prompt = [3, 5, 2]
    joint = exact_joint(peaky, prompt, n, T, top_k, top_p)
    keys = list(joint)
    index = {k: i for i, k in enumerate(keys)}
    counts = np.zeros(len(keys))
    acc = prop = 0
    for s in range(4000):
        o = peaky.generate(np.array(prompt), max_new_tokens=n, temperature=T, top_k=top_k,
                           top_p=top_p, seed=s, speculative=spec, num_draft_tokens=draft)
        counts[index[tuple(int(t) for t in o.tokens)]] += 1
        acc += o.stats["accepted"]
        prop += o.stats["proposed"]
    if spec:
        assert 0.05 < acc / prop < 0.95, acc / prop  # both acceptance branches exercised
    pv = chi_square_p(counts, [joint[k] for k in keys])
    assert pv > P_REJECT, f"p-value {pv:.2e}"


def test_fixed_seed_reproduces(peaky):
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9)
    for spec in (None, "mtp"):
        a = peaky.generate(np.array([3, 4]), seed=5, speculative=spec, **kw).tokens
        b = peaky.generate(np.array([3, 4]), seed=5, speculative=spec, **kw).tokens
        c = peaky.generate(np.array([3, 4]), seed=6, speculative=spec, **kw).tokens
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
