"""Generation and MTP speculative decoding (semantics §2.5, §3): greedy = argmax of the full
forward, speculative greedy == plain greedy, cache rollback, the cached MTP step vs a float64
reference, acceptance on a briefly trained model, streaming, batches, bad input."""
import numpy as np
import pytest

import dsv3
from conftest import assert_close, get_torch
from gen_helpers import PERIOD, train_tiny
from dsv3.reference.nn import t_rmsnorm
from dsv3.reference.model import t_block


@pytest.fixture(scope="module")
def rand_model():
    return dsv3.Model(dsv3.Config.tiny(), seed=3)


@pytest.fixture(scope="module")
def trained():
    return train_tiny(60)


def greedy_by_full_forward(m, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(m.forward(np.array(seq))[-1])))
    return seq[len(prompt):]


def test_greedy_is_argmax_of_full_forward(rand_model):
    prompt = np.array([3, 17, 42, 5])
    out = rand_model.generate(prompt, max_new_tokens=12)
    assert out.tokens.dtype == np.int64 and out.tokens.shape == (12,)
    assert list(out.tokens) == greedy_by_full_forward(rand_model, prompt, 12)
    s = out.stats
    assert s["main_forwards"] == 12 and s["new_tokens"] == 12 and s["proposed"] == 0
    assert s["tokens_per_second"] > 0 and s["prompt_tokens_per_second"] > 0


@pytest.mark.parametrize("which", ["random", "trained"])
@pytest.mark.parametrize("draft", [1, 2, 3])
def test_speculative_greedy_equals_plain_greedy(which, draft, rand_model, trained):
    m = rand_model if which == "random" else trained
    rng = np.random.default_rng(draft)
    for length in (1, 4, 11):
        prompt = rng.integers(0, 64, length) if which == "random" else np.array(PERIOD[:length % 8 + 1])
        plain = m.generate(prompt, max_new_tokens=25)
        spec = m.generate(prompt, max_new_tokens=25, speculative="mtp", num_draft_tokens=draft)
        np.testing.assert_array_equal(spec.tokens, plain.tokens,
                                      err_msg=f"{which} draft={draft} prompt={prompt}")
        assert spec.stats["proposed"] > 0


def test_trained_model_acceptance_and_fewer_forwards(trained):
    prompt = np.array(PERIOD[:3])
    for draft in (1, 2):
        out = trained.generate(prompt, max_new_tokens=40, speculative="mtp",
                               num_draft_tokens=draft)
        s = out.stats
        assert s["acceptance_rate"] > 0.5, s
        assert s["main_forwards"] < s["new_tokens"] == 40, s
        assert s["accepted"] <= s["proposed"]
    # the same with sampling at temperature 1 (the trained model is confident)
    s = trained.generate(prompt, max_new_tokens=40, speculative="mtp", temperature=1.0,
                         seed=0).stats
    assert s["acceptance_rate"] > 0.5 and s["main_forwards"] < 40, s


def test_eos_stops_and_is_included(trained):
    prompt = np.array(PERIOD[:2])
    for spec in (None, "mtp"):
        out = trained.generate(prompt, max_new_tokens=30, eos_token_id=PERIOD[5],
                               speculative=spec, num_draft_tokens=3)
        assert list(out.tokens) == list(PERIOD[2:6]), (spec, out.tokens)


def test_batch_of_prompts_equals_each_alone(rand_model):
    prompts = [np.array([1, 2, 3]), np.array([7]), np.arange(10, 30)]
    for kw in (dict(), dict(temperature=0.8, top_k=10, seed=4),
               dict(speculative="mtp", num_draft_tokens=2)):
        out = rand_model.generate(prompts, max_new_tokens=9, **kw)
        assert isinstance(out.tokens, list) and len(out.per_prompt) == 3
        for p, got in zip(prompts, out.tokens):
            np.testing.assert_array_equal(got, rand_model.generate(p, max_new_tokens=9, **kw).tokens)
        assert out.stats["new_tokens"] == 27
    two = rand_model.generate(np.array([[1, 2, 3], [4, 5, 6]]), max_new_tokens=4)
    np.testing.assert_array_equal(two.tokens[1], rand_model.generate([4, 5, 6], max_new_tokens=4).tokens)


def test_streaming_matches_generate(trained, rand_model):
    prompt = np.array(PERIOD[:3])
    for m, kw in ((rand_model, dict(temperature=1.0, seed=2)),
                  (trained, dict(speculative="mtp", num_draft_tokens=2))):
        full = m.generate(prompt, max_new_tokens=15, **kw).tokens
        assert list(m.stream(prompt, max_new_tokens=15, **kw)) == list(full)
        seen = []
        m.generate(prompt, max_new_tokens=15, callback=lambda i, t: seen.extend(t), **kw)
        assert seen == list(full)


def test_rollback_cache_equals_cache_without_rejected_tokens(rand_model):
    """Verify [t, d1, d2] at n, keep t only (truncate), then continue: the main and MTP caches
    equal caches that never saw d1, d2 (rows < length bitwise for untouched rows; the rows
    computed in a multi-token forward within 1e-6), and the next logits agree."""
    m, cfg = rand_model, rand_model.config
    prompt = np.array([[4, 8, 15, 16, 23]])
    n = prompt.shape[1]
    a, b = m.new_cache(1, 16), m.new_cache(1, 16)
    _, ha = m.forward_with_hidden(prompt, a, 0)
    m.forward(prompt, cache=b, start_pos=0)
    m.forward(np.array([[42, 7, 9]]), cache=a, start_pos=n)     # t=42, drafts 7, 9 rejected
    assert a.length == [n + 3] * cfg.num_hidden_layers
    a.truncate(n + 1)
    m.forward(np.array([[42]]), cache=b, start_pos=n)
    assert a.length == b.length == [n + 1] * cfg.num_hidden_layers
    for l in range(cfg.num_hidden_layers):
        da, db = a.layer_data(l)[:, :n + 1], b.layer_data(l)[:, :n + 1]
        np.testing.assert_array_equal(da[:, :n], db[:, :n])
        assert_close(f"layer {l} row n", da[:, n], db[:, n], rtol=1e-6, atol=1e-6)
    la = m.forward(np.array([[11]]), cache=a, start_pos=n + 1)
    lb = m.forward(np.array([[11]]), cache=b, start_pos=n + 1)
    assert_close("logits after rollback", la, lb, rtol=1e-5, atol=1e-5)
    # MTP cache: rows fed (h_i, t_{i+1}); a draft row n rewritten after truncation
    ma, mb = m.new_mtp_cache(1, 16), m.new_mtp_cache(1, 16)
    toks = np.array([[8, 15, 16, 23, 42]])
    m.mtp_forward(ha, toks, ma, 0)
    m.mtp_forward(ha, toks, mb, 0)
    m.mtp_forward(ha[:, -1:], np.array([[5]]), ma, n)             # a draft row
    ma.truncate(n)
    assert ma.length == mb.length == [n]
    np.testing.assert_array_equal(ma.layer_data(0)[:, :n], mb.layer_data(0)[:, :n])


def test_mtp_step_vs_float64_reference(rand_model):
    """Prefill the MTP cache over the prompt, then step row by row: the draft logits equal
    semantics §2.5 computed in float64 from the state dict (ref_model's block + rmsnorm)."""
    torch = get_torch()
    m, cfg = rand_model, rand_model.config
    P = {k: torch.tensor(v.astype(np.float64)) for k, v in m.state_dict().items()}
    toks = np.random.default_rng(1).integers(0, cfg.vocab_size, 10)
    N = len(toks) - 1                      # rows i = 0..N-1 fed (h_i, t_{i+1})
    h = torch.tensor(toks[None, :N])
    x = P["model.embed_tokens.weight"][h]
    for i in range(cfg.num_hidden_layers):
        x = t_block(torch, x, P, i, cfg, [])
    hn = t_rmsnorm(torch, x, P["model.norm.weight"], cfg.rms_norm_eps)
    p = f"model.layers.{cfg.num_hidden_layers}."
    e = P["model.embed_tokens.weight"][torch.tensor(toks[None, 1:])]
    cat = torch.cat([t_rmsnorm(torch, e, P[p + "enorm.weight"], cfg.rms_norm_eps),
                     t_rmsnorm(torch, hn, P[p + "hnorm.weight"], cfg.rms_norm_eps)], -1)
    hk = t_block(torch, cat @ P[p + "eh_proj.weight"].T, P, cfg.num_hidden_layers, cfg, [])
    want = (t_rmsnorm(torch, hk, P[p + "shared_head.norm.weight"], cfg.rms_norm_eps)
            @ P["lm_head.weight"].T).numpy()[0]
    cache, mc = m.new_cache(1, 16), m.new_mtp_cache(1, 16)
    _, hid = m.forward_with_hidden(toks[None, :N], cache, 0)
    assert_close("main hidden", hid[0], hn.numpy()[0], "fp32_reduce", rtol=1e-4, atol=1e-5)
    got_pre, hk_got = m.mtp_forward(hid[:, :6], toks[None, 1:7], mc, 0)
    rows = [got_pre[0]]
    for i in range(6, N):
        lg, _ = m.mtp_forward(hid[:, i:i + 1], toks[None, i + 1:i + 2], mc, i)
        rows.append(lg[0])
    # fp32 engine vs float64: a few ulp through 3 blocks and the head (tolerance as test_model)
    assert_close("MTP draft logits", np.concatenate(rows), want, "fp32_reduce", rtol=1e-4,
                 atol=1e-5)
    assert_close("MTP hidden h^1", hk_got[0], hk.numpy()[0, :6], "fp32_reduce", rtol=1e-4,
                 atol=1e-5)
    assert mc.length == [N]


def test_bad_input(rand_model):
    m = rand_model
    with pytest.raises(ValueError, match="empty"):
        m.generate(np.array([], np.int64))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m.generate(np.zeros(m.config.max_position_embeddings, np.int64))
    with pytest.raises(IndexError, match="64"):
        m.generate(np.array([1, 64]))
    with pytest.raises(IndexError, match="-1"):
        m.generate([np.array([1]), np.array([-1, 2])])
    with pytest.raises(TypeError, match="integer"):
        m.generate(np.array([1.5, 2.0]))
    with pytest.raises(ValueError, match="temperature"):
        m.generate(np.array([1]), temperature=-0.1)
    for tp in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match="top_p"):
            m.generate(np.array([1]), top_p=tp)
    with pytest.raises(ValueError, match="top_k"):
        m.generate(np.array([1]), top_k=-1)
    with pytest.raises(ValueError, match="speculative"):
        m.generate(np.array([1]), speculative="medusa")
    with pytest.raises(ValueError, match="num_draft_tokens"):
        m.generate(np.array([1]), speculative="mtp", num_draft_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(np.array([1]), max_new_tokens=-1)
    with pytest.raises(ValueError, match="MTP"):
        dsv3.Model(dsv3.Config.tiny().replace(num_nextn_predict_layers=0)).generate(
            np.array([1]), speculative="mtp")
    mc = m.new_mtp_cache(1, 4)
    with pytest.raises(ValueError, match="hidden must have shape"):
        m.mtp_forward(np.zeros((1, 2, 5), np.float32), np.array([[1, 2]]), mc, 0)
    with pytest.raises(ValueError, match="does not continue"):
        m.mtp_forward(np.zeros((1, 1, 48), np.float32), np.array([[1]]), mc, 2)
    with pytest.raises(IndexError, match="module k"):
        m.mtp_forward(np.zeros((1, 1, 48), np.float32), np.array([[1]]), mc, 0, k=2)
    assert len(m.generate(np.array([1]), max_new_tokens=0).tokens) == 0


def test_stops_at_max_position_embeddings():
    m = dsv3.Model(dsv3.Config.tiny().replace(max_position_embeddings=12), seed=1)
    for spec in (None, "mtp"):
        assert len(m.generate(np.arange(1, 9), max_new_tokens=50, speculative=spec).tokens) == 4


def test_cli_generate(tmp_path, trained):
    import subprocess
    import sys
    trained.save_pretrained(str(tmp_path / "ck"))
    ids = ",".join(map(str, PERIOD[:3]))
    base = [sys.executable, "-m", "dsv3", "generate", str(tmp_path / "ck"), "--prompt-ids", ids,
            "--max-new-tokens", "10", "--eos-token-id", "-1"]
    want = " ".join(map(str, trained.generate(np.array(PERIOD[:3]), max_new_tokens=10).tokens))
    for extra in ([], ["--speculative", "mtp", "--num-draft-tokens", "2"]):
        r = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == want
        assert "acceptance rate" in r.stderr and "tok/s" in r.stderr
    r = subprocess.run(base + ["--top-p", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "top-p" in r.stderr  # the flag named as typed
    r = subprocess.run(base[:4] + [str(tmp_path / "nope")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "not found" in r.stderr


def test_speculative_greedy_equals_plain_greedy_small_config():
    """Config.small(): the verify forwards (S = 2 and 4) compute each row as the S = 1 steps do
    (test_verification_rows_equal_single_decode_steps_bitwise), so the tokens agree."""
    m = dsv3.Model(dsv3.Config.small(), seed=1)
    for prompt in (np.array([256, 72, 101, 108]), np.arange(30, 60)):
        plain = m.generate(prompt, max_new_tokens=16)
        for draft in (1, 3):
            spec = m.generate(prompt, max_new_tokens=16, speculative="mtp", num_draft_tokens=draft)
            np.testing.assert_array_equal(spec.tokens, plain.tokens)


@pytest.mark.parametrize("which", ["random", "trained"])
def test_caches_after_speculative_decoding_equal_clean_caches(which, rand_model, trained):
    """After a speculative run with rejections (random model: ~all drafts rejected; trained:
    mostly accepted), the main and MTP caches hold exactly the committed tokens: lengths, and
    rows < length equal caches built from the committed tokens alone (prefill + single steps;
    the prompt's prefill (more than 16 rows: sgemm) and the decode steps (the GEMV) sum in
    other orders, ~1e-6, hence rtol 1e-4 / atol 1e-5)."""
    from dsv3.generate import _decoders
    m = rand_model if which == "random" else trained
    cfg = m.config
    prompt = np.array(PERIOD[:4])
    (dec,), _ = _decoders(m, prompt, max_new_tokens=23, speculative="mtp", num_draft_tokens=2)
    toks = [t for new in dec.run() for t in new]
    if which == "random":
        assert dec.stats["accepted"] < dec.stats["proposed"]
    seq = np.array(list(prompt) + toks)
    L = dec.cache.length[0]
    assert dec.cache.length == [L] * cfg.num_hidden_layers and dec.mtp_cache.length == [L]
    assert len(prompt) <= L <= len(seq)  # L == len(seq): the next committed token is unfed
    clean = m.new_cache(1, 64)
    m.forward(prompt[None], cache=clean, start_pos=0)
    for i in range(len(prompt), L):
        m.forward(seq[None, i:i + 1], cache=clean, start_pos=i)
    for l in range(cfg.num_hidden_layers):
        assert_close(f"main layer {l}", dec.cache.layer_data(l)[:, :L], clean.layer_data(l)[:, :L],
                     rtol=1e-4, atol=1e-5)
    Lm = min(L, len(seq) - 1)  # MTP row i is fed t_{i+1}; the last may be the unemitted one
    _, h = m.forward_with_hidden(seq[None, :Lm], m.new_cache(1, 64), 0)
    mclean = m.new_mtp_cache(1, 64)
    m.mtp_forward(h, seq[None, 1:Lm + 1], mclean, 0)
    assert_close("MTP layer", dec.mtp_cache.layer_data(0)[:, :Lm], mclean.layer_data(0)[:, :Lm],
                 rtol=1e-4, atol=1e-5)


def test_decode_time_excludes_the_callback(rand_model):
    import time
    out = rand_model.generate(np.array([1, 2]), max_new_tokens=5,
                              callback=lambda i, t: time.sleep(0.1))
    assert out.stats["decode_seconds"] < 0.3, out.stats  # 5 callbacks sleep 0.5 s in total


@pytest.mark.parametrize("P", [40, 300, 600])
def test_verification_rows_equal_single_decode_steps_bitwise(P):
    """A cached forward of S <= 16 tokens (speculative verification) computes each token's
    logits exactly as S single-token steps do, at contexts below and across the decode chunks
    of 256 keys (kernels/mla.cpp): what makes greedy speculative decoding equal greedy."""
    cfg = dsv3.Config.small()
    m = dsv3.Model(cfg, seed=0)
    prompt = (np.arange(P) * 7 + 1) % cfg.vocab_size
    for S in (2, 5, 16):
        c1, c2 = m.new_cache(1, P + 16), m.new_cache(1, P + 16)
        m.forward(prompt[None], c1)
        m.forward(prompt[None], c2)
        toks = (np.arange(S) * 3 + 5) % cfg.vocab_size
        ver = m.forward(toks[None], c1, start_pos=P)[0]
        single = np.concatenate([m.forward(toks[i:i + 1][None], c2, start_pos=P + i)[0]
                                 for i in range(S)])
        np.testing.assert_array_equal(ver, single, err_msg=f"P={P} S={S}")
