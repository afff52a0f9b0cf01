"""Repeated calls keep memory flat: RSS after a warm-up stays within a bound over hundreds of
forward / loss_and_grad / cached decoding / checkpoint round trips."""
import gc
import os

import numpy as np
import pytest

import dsv3


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
@pytest.mark.skipif(os.environ.get("DSV3_SANITIZED") == "1", reason="ASan keeps freed memory")
def test_rss_flat(tmp_path):
    cfg = dsv3.Config.small()  # buffers of >= 64 KB per call: a per-call leak shows
    m = dsv3.Model(cfg, seed=0)
    tok = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 17))

    def one_round(i):
        m.forward(tok)
        m.loss_and_grad(tok)
        cache = m.new_cache(batch=2, max_len=40)
        m.forward(tok[:, :8], cache=cache)
        for t in range(8, 12):
            m.forward(tok[:, t:t + 1], cache=cache, start_pos=t)
        if i % 50 == 0:
            m.save_pretrained(tmp_path / "ck")
            dsv3.Model.from_pretrained(tmp_path / "ck")
        try:
            m.forward(np.array([[cfg.vocab_size]]))  # the error path must not leak either
        except IndexError:
            pass

    for i in range(20):
        one_round(i)
    gc.collect()
    start = rss_mb()
    for i in range(100):
        one_round(i)
    gc.collect()
    growth = rss_mb() - start
    # every call allocates activations of >= 2*17*256*4 B = 34 KB; leaking one of them per
    # call (x 7 calls x 100 rounds = 24 MB) would exceed the bound; allocator noise stays < 8 MB
    assert growth < 8, f"RSS grew by {growth:.1f} MB over 100 rounds"
