"""Test helpers for generation: a tiny model trained briefly (numpy Adam over
Model.loss_and_grad) on a repetitive corpus, so its MTP module drafts well."""
from __future__ import annotations

import numpy as np

import dsv3

PERIOD = (5, 9, 14, 20, 27, 33, 41, 50)  # the repeated phrase (token ids of Config.tiny())


def repetitive_batch(rng: np.random.Generator, batch: int, n: int) -> np.ndarray:
    """Sequences of the phrase PERIOD repeated, each starting at a random offset."""
    ph = np.array(PERIOD, np.int64)
    starts = rng.integers(0, len(ph), batch)
    idx = (starts[:, None] + np.arange(n)[None]) % len(ph)
    return ph[idx]


def train_tiny(steps: int = 60, seed: int = 0, lr: float = 1e-2, cfg: dsv3.Config = None):
    """A Config.tiny() model after `steps` Adam steps on repetitive_batch (main + MTP loss)."""
    cfg = cfg or dsv3.Config.tiny()
    m = dsv3.Model(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    state = m.state_dict()
    mom = {k: np.zeros_like(v) for k, v in state.items()}
    vel = {k: np.zeros_like(v) for k, v in state.items()}
    b1, b2 = 0.9, 0.99
    for t in range(1, steps + 1):
        _, grads = m.loss_and_grad(repetitive_batch(rng, 8, 24), mtp_weight=1.0)
        for k, g in grads.items():
            mom[k] = b1 * mom[k] + (1 - b1) * g
            vel[k] = b2 * vel[k] + (1 - b2) * g * g
            step = lr * (mom[k] / (1 - b1 ** t)) / (np.sqrt(vel[k] / (1 - b2 ** t)) + 1e-8)
            state[k] = (state[k] - step).astype(np.float32)
        m.load_state_dict(state)
    return m
