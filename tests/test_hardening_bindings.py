"""Binding-level hardening (issue #20): the model / Trainer read-write lock, strict moment and
dtype checks, config validation at the binding, huge ints, sizes refused before allocating,
exact expert-load statistics, the thread pool's count after a failed start, numpy scalars in
TrainConfig. Reproducers that could crash the interpreter run in a subprocess."""
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import dsv3



def run_py(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # The dsv3 this test imported (an installed one in CI, python/ in a dev tree), first.
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(dsv3.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([pkg, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------- 1. read/write lock
def small_trainer(seed=1):
    cfg = dsv3.Config.small()
    m = dsv3.Model(cfg, seed=seed)
    return m, dsv3.Trainer(m, dsv3.TrainConfig(lr=1e-2, schedule="constant"))


def step_batch(cfg, seed=0, shape=(4, 129)):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=shape)


def test_two_steps_on_one_model_from_two_threads_raise_not_crash():
    r = run_py("""
        import threading, numpy as np, dsv3
        cfg = dsv3.Config.small()
        m = dsv3.Model(cfg, seed=1)
        tc = dsv3.TrainConfig(lr=1e-2, schedule="constant")
        ta, tb = dsv3.Trainer(m, tc), dsv3.Trainer(m, tc)
        tok = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(4, 129))
        raised, ok = [0], [0]
        def run(t, bar):
            bar.wait()
            try:
                t.step(tok)
                ok[0] += 1
            except RuntimeError as e:
                assert "in use by another thread" in str(e), e
                raised[0] += 1
        for pair in [(ta, tb), (ta, ta)] * 3:
            bar = threading.Barrier(2)
            ts = [threading.Thread(target=run, args=(t, bar)) for t in pair]
            [t.start() for t in ts]
            [t.join() for t in ts]
        assert ta.step_count + tb.step_count == ok[0]
        print("raised", raised[0], "ok", ok[0])
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    raised, ok = int(r.stdout.split()[1]), int(r.stdout.split()[3])
    assert raised >= 1 and ok >= 6, r.stdout  # every round: one step ran, the other refused


def during_step(trainer, batch, action, tries=5):
    """Runs trainer.step(batch) in a thread while calling action() in a loop; returns
    (action results, RuntimeErrors raised by action). Retries when action won the race and the
    step itself was refused."""
    for attempt in range(tries):
        started, err = threading.Event(), []

        def stepper():
            started.set()
            try:
                trainer.step(batch)
            except RuntimeError as e:
                err.append(e)

        t = threading.Thread(target=stepper)
        t.start()
        started.wait()
        time.sleep(0.005 * (attempt + 1))  # let the step take the object first (retries: longer)
        results, raised = [], 0
        while t.is_alive():
            try:
                results.append(action())
            except RuntimeError as e:
                assert "in use by another thread" in str(e), e
                raised += 1
            # an action that holds the object without the GIL for most of its time (a
            # whole-slab load_state_dict) would otherwise refuse every attempt of the step to
            # begin: leave it a gap
            time.sleep(0.002)
        t.join()
        if not err:
            return results, raised
        assert "in use by another thread" in str(err[0])
    pytest.fail("the step never ran")


def test_forward_during_step_is_refused_or_sees_old_or_new_weights():
    m, t = small_trainer()
    twin, tt = small_trainer()
    batch = step_batch(m.config)
    tok = batch[:2, :64]
    before = m.forward(tok)
    tt.step(batch)
    after = twin.forward(tok)
    assert not np.array_equal(before, after)
    results, raised = during_step(t, batch, lambda: m.forward(tok))
    assert raised >= 1
    for r in results:  # never torn
        assert np.array_equal(r, before) or np.array_equal(r, after)
    assert np.array_equal(m.forward(tok), after)


@pytest.mark.parametrize("what", ["load_state_dict", "set_moments", "steps_done", "moments"])
def test_writers_and_moment_reads_during_step_are_refused(what):
    m, t = small_trainer()
    state = m.state_dict()
    mv = t._t.moments()
    actions = {"load_state_dict": lambda: m.load_state_dict(state),
               "set_moments": lambda: t._t.set_moments(*mv),
               "steps_done": lambda: setattr(t._t, "steps_done", 0),
               "moments": lambda: t.moments()}
    _, raised = during_step(t, step_batch(m.config), actions[what])
    assert raised >= 1


def test_same_trainer_stepped_meanwhile_refuses_a_stale_learning_rate():
    m, t = small_trainer()
    n = t.step_count
    t.step(step_batch(m.config, shape=(2, 9)))  # what another thread would have done
    with pytest.raises(RuntimeError, match="another thread stepped this Trainer"):
        t._t.step(step_batch(m.config, shape=(2, 9)), t._options(1e-2), n)


def test_save_during_training_captures_one_moment(tmp_path):
    cfg = dsv3.Config.tiny()
    tc = dsv3.TrainConfig(lr=1e-2, schedule="constant")
    batches = [step_batch(cfg, seed=i, shape=(2, 17)) for i in range(40)]
    twin = dsv3.Trainer(dsv3.Model(cfg, seed=3), tc)
    ref = [twin._t.snapshot()]
    for b in batches:
        twin.step(b)
        ref.append(twin._t.snapshot())
    t = dsv3.Trainer(dsv3.Model(cfg, seed=3), tc)
    def train():
        for b in batches:
            while True:  # a step that finds a save reading the trainer is refused, unapplied
                try:
                    t.step(b)
                    break
                except RuntimeError as e:
                    assert "in use by another thread" in str(e), e
                    time.sleep(0.001)
            time.sleep(0.003)  # room for saves between the steps

    th = threading.Thread(target=train)
    saved, raised = [], 0
    th.start()
    while th.is_alive() and len(saved) < 8:
        d = tmp_path / f"ck{len(saved)}"
        try:
            t.save(d)
            saved.append(d)
        except RuntimeError as e:
            assert "in use by another thread" in str(e)
            raised += 1
    th.join()
    assert saved, "no save landed"
    for d in saved:
        back = dsv3.Trainer.load(d)
        params, m, v, step = back._t.snapshot()
        rp, rm, rv, rstep = ref[step]
        assert step == rstep
        assert np.array_equal(m, rm) and np.array_equal(v, rv), f"moments torn in {d}"
        assert all(np.array_equal(params[k], rp[k]) for k in rp), f"weights torn in {d}"


# ---------------------------------------------------------------------- 2. moment dtypes
MOMENT_CASES = {  # name -> expression of the moments given to a trainer (n = slab size)
    "float64": "np.zeros(n)", "int64": "np.zeros(n, np.int64)", "bool": "np.zeros(n, bool)",
    "str": "np.array(['x'] * n)", "object": "np.array([0.0] * n, dtype=object)",
    "float32_for_bf16": "np.zeros(n, np.float32)", "uint16_for_fp32": "np.zeros(n, np.uint16)",
    "short": "np.zeros(n - 1, DT)", "2d": "np.zeros((1, n), DT)", "list": "[0.0] * n",
}


@pytest.mark.parametrize("moment_dtype", ["float32", "bfloat16"])
def test_set_moments_of_another_dtype_or_shape_raise_value_error(moment_dtype):
    r = run_py(f"""
        import json, numpy as np, dsv3
        m = dsv3.Model(dsv3.Config.tiny(), seed=0)
        t = dsv3.Trainer(m, dsv3.TrainConfig(moment_dtype={moment_dtype!r}))
        m0, v0 = t._t.moments()
        n, DT = m0.size, m0.dtype
        out, untouched = {{}}, True
        for name, expr in {MOMENT_CASES!r}.items():
            good = np.full(n, 7, DT)
            for which in ("optimizer_m", "optimizer_v"):
                args = (eval(expr), good) if which == "optimizer_m" else (good, eval(expr))
                try:
                    t._t.set_moments(*args)
                    out[name + "/" + which] = "accepted"
                    t._t.set_moments(m0, v0)
                except Exception as e:
                    out[name + "/" + which] = type(e).__name__ + ": " + str(e)
                    a, b = t._t.moments()
                    untouched &= bool(np.array_equal(a, m0) and np.array_equal(b, v0))
        out["untouched"] = untouched
        print(json.dumps(out))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    out = json.loads(r.stdout)
    assert out.pop("untouched") is True  # a refused call writes nothing
    want = "uint16" if moment_dtype == "bfloat16" else "float32"
    for case, msg in out.items():
        if case.startswith("float32_for_bf16") and moment_dtype == "float32" or \
                case.startswith("uint16_for_fp32") and moment_dtype == "bfloat16":
            assert msg == "accepted", (case, msg)  # the right dtype for this trainer
            continue
        which = case.split("/")[1]
        assert msg.startswith("ValueError: ") and which in msg and want in msg, (case, msg)


def test_trainer_load_refuses_moments_of_another_dtype(tmp_path):
    t = dsv3.Trainer(dsv3.Model(dsv3.Config.tiny(), seed=0),
                     dsv3.TrainConfig(moment_dtype="bfloat16"))
    t.save(tmp_path / "ck")
    m, _ = t._t.moments()
    f = tmp_path / "ck" / "optimizer_m.npy"
    np.save(f, (m.astype(np.uint32) << 16).view(np.float32))  # bf16 given as float32 values
    with pytest.raises(ValueError, match=r"optimizer_m must be uint16 .*\(\d+,\), got float32"):
        dsv3.Trainer.load(tmp_path / "ck")
    np.save(f, np.array([None] * m.size), allow_pickle=True)
    with pytest.raises(ValueError, match="optimizer_m"):
        dsv3.Trainer.load(tmp_path / "ck")


# ---------------------------------------------------------------------- 3. dtypes by value
def unpickled(a):
    import pickle
    b = pickle.loads(pickle.dumps(a))
    assert b.dtype == a.dtype
    return b


def test_unpickled_arrays_are_accepted_by_every_dtype_check():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 8)).astype(np.float32), np.ones(8, np.float32)
    np.testing.assert_array_equal(dsv3.ops.rmsnorm(unpickled(x), unpickled(w)),
                                  dsv3.ops.rmsnorm(x, w))
    b = rng.standard_normal((8, 5)).astype(np.float32)
    np.testing.assert_array_equal(dsv3.ops.bf16_matmul(unpickled(x), unpickled(b)),
                                  dsv3.ops.bf16_matmul(x, b))
    codes = dsv3.fp8.encode(x)
    np.testing.assert_array_equal(dsv3.fp8.decode(unpickled(codes)), dsv3.fp8.decode(codes))
    built = np.zeros(8, dtype=np.dtype("<f4"))  # a dtype built from a descriptor
    np.testing.assert_array_equal(dsv3.ops.rmsnorm(x, built + 1), dsv3.ops.rmsnorm(x, w))
    for bf16 in (False, True):  # in-place update through unpickled arrays: writes land
        mdt = np.uint16 if bf16 else np.float32
        ref = [np.ones(8, np.float32), np.zeros(8, mdt), np.zeros(8, mdt)]
        got = [unpickled(a) for a in ref]
        g = np.full(8, 0.5, np.float32)
        for arrs in (ref, got):
            dsv3._core.adamw_update(arrs[0], g, arrs[1], arrs[2], 0.1, 0.9, 0.95, 1e-8, 0.0, 1)
        assert not np.array_equal(ref[0], np.ones(8, np.float32))
        for r, a in zip(ref, got):
            np.testing.assert_array_equal(a, r)


def test_non_native_byte_order_is_refused_clearly():
    x = np.ones((2, 8), np.float32)
    with pytest.raises(TypeError, match=r"x has non-native byte order \(dtype >f4\)"):
        dsv3.ops.rmsnorm(x.astype(">f4"), np.ones(8, np.float32))
    with pytest.raises(TypeError, match="non-native byte order"):
        dsv3.ops.bf16_matmul(x.astype(">f4"), np.ones((8, 2), np.float32))
    w, m = np.ones(8, ">f4"), np.zeros(8, np.float32)
    with pytest.raises(TypeError, match="w has non-native byte order"):
        dsv3._core.adamw_update(w, m, m.copy(), m.copy(), 0.1, 0.9, 0.95, 1e-8, 0.0, 1)


# ---------------------------------------------------------------------- numeric arguments
def tiny_model():
    return dsv3.Model(dsv3.Config.tiny(), seed=0)


def attn_args(cfg):
    sd = dsv3.Model(cfg, seed=0).state_dict()
    pre = "model.layers.0.self_attn."
    p = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
    return np.ones((2, cfg.hidden_size), np.float32), p


INT_CALLS = {  # name -> (call taking the bad value, argument name in the message)
    "new_cache batch": (lambda m, v: m.new_cache(batch=v, max_len=8), "batch"),
    "new_cache max_len": (lambda m, v: m.new_cache(batch=1, max_len=v), "max_len"),
    "new_mtp_cache batch": (lambda m, v: m.new_mtp_cache(batch=v, max_len=8), "batch"),
    "forward start_pos": (lambda m, v: m.forward(np.zeros((1, 1), np.int64),
                                                 cache=m.new_cache(1, 8), start_pos=v), "start_pos"),
    "Model seed": (lambda m, v: dsv3.Model(dsv3.Config.tiny(), seed=v), "seed"),
    "set_num_threads": (lambda m, v: dsv3.set_num_threads(v), "n"),
    "embedding_backward": (lambda m, v: dsv3.ops.embedding_backward(
        np.ones((2, 4), np.float32), np.arange(2), v), "num_embeddings"),
    "expert_load": (lambda m, v: dsv3.ops.expert_load(np.arange(4), v), "n_routed_experts"),
    "cross_entropy ignore_index": (lambda m, v: dsv3.ops.cross_entropy(
        np.ones((2, 5), np.float32), np.arange(2), ignore_index=v), "ignore_index"),
    "attention start_pos": (lambda m, v: dsv3.ops.attention(
        *([np.ones((1, 2, 1, 4), np.float32)] * 3), 0.5, start_pos=v), "start_pos"),
    "attention_layer start_pos": (lambda m, v: dsv3.ops.attention_layer(
        *attn_args(dsv3.Config.tiny()), dsv3.Config.tiny(), start_pos=v), "start_pos"),
    "rope_table dim": (lambda m, v: dsv3.ops.rope_table(v), "dim"),
    "KVCache batch": (lambda m, v: dsv3.KVCache(dsv3.Config.tiny(), batch=v), "batch"),
    "KVCache truncate": (lambda m, v: m.new_cache(1, 8).truncate(v), "length"),
    "TrainConfig warmup_steps": (lambda m, v: dsv3.TrainConfig(warmup_steps=v), "warmup_steps"),
    "TrainConfig batch_size": (lambda m, v: dsv3.TrainConfig(batch_size=v), "batch_size"),
}


@pytest.mark.parametrize("what", sorted(INT_CALLS))
@pytest.mark.parametrize("value,exc", [(2 ** 64, OverflowError), (2 ** 70, OverflowError),
                                       (1.5, TypeError), (8.7, TypeError), (2.0, TypeError),
                                       (True, TypeError), ("3", TypeError)])
def test_integer_arguments_refuse_huge_ints_and_floats_naming_the_argument(what, value, exc):
    call, name = INT_CALLS[what]
    if what == "cross_entropy ignore_index" and value == 2 ** 64:
        value = -2 ** 70  # any int64 is a valid ignore_index; below int64 is not
    with pytest.raises(exc, match=name) as e:
        call(tiny_model(), value)
    assert "incompatible function arguments" not in str(e.value)


@pytest.mark.parametrize("what", ["new_cache batch", "expert_load", "set_num_threads",
                                  "embedding_backward"])
def test_integer_arguments_below_their_minimum_raise_value_error(what):
    call, name = INT_CALLS[what]
    with pytest.raises(ValueError, match=name):
        call(tiny_model(), 0)


def test_numpy_integers_are_accepted_as_integer_arguments():
    m = tiny_model()
    c = m.new_cache(np.int32(1), np.uint16(8))
    assert (c.batch, c.max_len) == (1, 8)
    assert dsv3.ops.expert_load(np.arange(4), np.int64(5)).shape == (5,)
    n = dsv3.get_num_threads()
    dsv3.set_num_threads(np.int8(n))
    assert dsv3.get_num_threads() == n
    assert dsv3.Model(dsv3.Config.tiny(), seed=np.uint64(2 ** 64 - 1)) is not None
    tc = dsv3.TrainConfig(warmup_steps=np.int64(3), lr=np.float32(0.5), betas=(np.float64(0.9), 0.99))
    assert type(tc.warmup_steps) is int and type(tc.lr) is float and tc.warmup_steps == 3
    assert all(type(b) is float for b in tc.betas)


@pytest.mark.parametrize("call,name", [
    (lambda m: m.loss(np.zeros((1, 4), np.int64), mtp_weight=float("inf")), "mtp_weight"),
    (lambda m: m.loss(np.zeros((1, 4), np.int64), alpha=float("inf")), "alpha"),
    (lambda m: m.loss_and_grad(np.zeros((1, 4), np.int64), mtp_weight=float("nan")), "mtp_weight"),
    (lambda m: dsv3.ops.rope(np.ones((2, 1, 4), np.float32), np.arange(2), theta=float("inf")), "theta"),
    (lambda m: dsv3.ops.rope_table(4, theta=float("inf")), "theta"),
    (lambda m: dsv3.ops.rope(np.ones((2, 1, 4), np.float32), np.arange(2),
                             rope_scaling={"type": "yarn", "factor": float("inf")}), "rope_scaling"),
    (lambda m: dsv3.ops.rope(np.ones((2, 1, 4), np.float32), np.arange(2),
                             rope_scaling={"type": "yarn", "factor": 4.0, "mscale": float("nan")}),
     "rope_scaling"),
    (lambda m: dsv3.ops.moe_balance_loss(np.ones((2, 4), np.float32), np.zeros((2, 1), np.int64),
                                         float("inf")), "alpha"),
    (lambda m: dsv3.ops.update_expert_bias(np.zeros(4, np.float32), np.ones(4, np.int64),
                                           float("inf")), "gamma"),
    (lambda m: dsv3.ops.cross_entropy_backward(np.ones((2, 5), np.float32), np.arange(2),
                                               np.ones(2, np.float32), d_loss=float("nan")), "d_loss"),
])
def test_non_finite_float_arguments_are_refused_naming_them(call, name):
    with pytest.raises(ValueError, match=name):
        call(tiny_model())


@pytest.mark.parametrize("field,value", [
    ("lr", float("inf")), ("lr", 0.0), ("min_lr", float("nan")), ("eps", float("inf")),
    ("eps", 0.0), ("weight_decay", float("inf")), ("weight_decay", -0.1),
    ("grad_clip", float("inf")), ("grad_clip", -1.0), ("aux_loss_alpha", float("nan")),
    ("betas", (0.9, float("nan"))), ("betas", (0.9, 1.0)), ("betas", (0.9,)), ("betas", "ab"),
    ("warmup_steps", 2.5), ("warmup_steps", -1), ("grad_accum", 0), ("total_steps", 2 ** 64),
    ("seq_len", 8.0), ("eval_interval", -1)])
def test_trainconfig_numbers_are_finite_in_range_and_integers_stay_integers(field, value):
    with pytest.raises((TypeError, ValueError, OverflowError), match=field.split("_")[0]):
        dsv3.TrainConfig(**{field: value})


# ---------------------------------------------------------------------- configs given to ops
@pytest.mark.parametrize("field,value", [("hidden_size", 48.5), ("kv_lora_rank", 16.2),
                                         ("hidden_size", "48"), ("num_attention_heads", 1000),
                                         ("num_attention_heads", 0), ("qk_rope_head_dim", 3)])
@pytest.mark.parametrize("op", ["attention_layer", "attention_layer_backward", "moe_forward",
                                "attention_layer_decode"])
def test_ops_validate_a_mutated_config_naming_the_field(field, value, op):
    cfg = dsv3.Config.tiny()
    x, p = attn_args(cfg)
    moe_p = dsv3.ops.init_moe_params(cfg)
    cache = dsv3.KVCache(cfg, 1, 8)
    setattr(cfg, field, value)
    calls = {
        "attention_layer": lambda: dsv3.ops.attention_layer(x, p, cfg),
        "attention_layer_backward": lambda: dsv3.ops.attention_layer_backward(x, x, p, cfg),
        "attention_layer_decode": lambda: dsv3.ops.attention_layer_decode(x[None], p, cfg, cache, 0, 0),
        "moe_forward": lambda: dsv3.ops.moe_forward(x, moe_p, cfg),
    }
    with pytest.raises(ValueError, match=field):
        calls[op]()


def test_ops_accept_a_config_whose_integral_fields_were_set_to_integral_floats():
    cfg = dsv3.Config.tiny()
    x, p = attn_args(cfg)
    want = dsv3.ops.attention_layer(x, p, cfg)
    cfg.hidden_size = float(cfg.hidden_size)  # Config's own rule (as from a JSON 48.0)
    np.testing.assert_array_equal(dsv3.ops.attention_layer(x, p, cfg), want)


def test_duck_typed_config_with_a_float_dim_names_the_field():
    class Cfg:
        pass
    c = Cfg()
    c.__dict__.update(dsv3.Config.tiny().to_canonical_dict())
    c.kv_heads, c.softmax_scale = c.num_attention_heads, dsv3.Config.tiny().softmax_scale
    x, p = attn_args(dsv3.Config.tiny())
    c.hidden_size = 48.5
    with pytest.raises(TypeError, match="hidden_size"):
        dsv3.ops.attention_layer(x, p, c)


def test_model_config_edits_do_not_reach_the_saved_checkpoint(tmp_path):
    m = tiny_model()
    m.config.num_hidden_layers = 50
    assert m.config.num_hidden_layers == 2
    m.save_pretrained(tmp_path / "ck")
    b = dsv3.Model.from_pretrained(tmp_path / "ck")
    assert b.config.num_hidden_layers == 2
    np.testing.assert_array_equal(b.forward(np.arange(5)), m.forward(np.arange(5)))


# ---------------------------------------------------------------------- expert-load statistics
def ref_max_violation(load):
    load = [int(v) for v in load]
    total = sum(load)
    if total == 0:
        return 0.0
    from fractions import Fraction
    return float(Fraction(max(load) * len(load), total) - 1)


def ref_bias(bias, load, gamma):
    load = [int(v) for v in load]
    total, E = sum(load), len(load)
    sign = [(total > E * v) - (total < E * v) for v in load]  # sign(mean - load_i), exactly
    return np.float32(bias) + np.float32(gamma) * np.array(sign, np.float32)


@pytest.mark.parametrize("scale", [2 ** 31, 2 ** 53, 2 ** 62 - 1, 2 ** 61])
@pytest.mark.parametrize("pattern", [(1, 0, 0, 0), (1, 1, 1, 1), (3, 1, 0, 0), (1, 1, 1, 0)])
def test_expert_load_statistics_are_exact_for_huge_loads(scale, pattern):
    load = [scale * p // max(sum(pattern), 1) for p in pattern]
    arr = np.array(load, np.int64)
    assert dsv3.ops.max_violation(arr) == pytest.approx(ref_max_violation(load), rel=1e-15, abs=0)
    bias = np.array([0.1, -0.2, 0.3, 0.0], np.float32)
    np.testing.assert_array_equal(dsv3.ops.update_expert_bias(bias, arr, 0.01),
                                  ref_bias(bias, load, 0.01))


def test_expert_load_near_2_62_moves_the_bias_the_right_way():
    load = np.array([2 ** 62, 0, 0, 0], np.int64)
    b = dsv3.ops.update_expert_bias(np.zeros(4, np.float32), load, 0.01)
    assert b[0] < 0 and np.all(b[1:] > 0)
    assert dsv3.ops.max_violation(load) == 3.0
    balanced = np.full(4, 2 ** 61 - 1, np.int64)
    assert dsv3.ops.max_violation(balanced) == 0.0


@pytest.mark.parametrize("fn", ["max_violation", "update_expert_bias"])
def test_expert_loads_summing_beyond_int64_stay_exact_and_negative_loads_are_refused(fn):
    bias = np.array([0.5, 0.0, -0.5, 0.25], np.float32)
    for load in ([2 ** 62] * 4, [2 ** 63 - 1] * 3 + [2 ** 63 - 2], [2 ** 63 - 1, 0, 0, 1]):
        arr = np.array(load, np.int64)
        if fn == "max_violation":
            assert dsv3.ops.max_violation(arr) == pytest.approx(ref_max_violation(load),
                                                                rel=1e-15, abs=0)
        else:
            np.testing.assert_array_equal(dsv3.ops.update_expert_bias(bias, arr, 0.01),
                                          ref_bias(bias, load, 0.01))
    call = {"max_violation": lambda l: dsv3.ops.max_violation(l),
            "update_expert_bias": lambda l: dsv3.ops.update_expert_bias(
                np.zeros(len(l), np.float32), l, 0.01)}[fn]
    with pytest.raises(ValueError, match=">= 0"):
        call(np.array([3, -1, 2], np.int64))


# ---------------------------------------------------------------------- thread pool start failure
def test_failed_pool_start_keeps_the_previous_thread_count():
    r = run_py("""
        import resource, dsv3
        dsv3.set_num_threads(2)
        before = (dsv3.get_num_threads(), dsv3.build_info()["num_threads"])
        vm = int([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmSize')][0])
        # room for a few thread stacks, not for 1000 of them (8 MiB each)
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, ((vm + 64 * 1024) * 1024, hard))  # soft only
        try:
            dsv3.set_num_threads(1000)
            print("NO ERROR")
        except RuntimeError as e:
            print("refused:", e)
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
        after = (dsv3.get_num_threads(), dsv3.build_info()["num_threads"])
        print("before", before, "after", after)
        assert after == before, (before, after)
        import numpy as np
        print(dsv3.ops.linear(np.ones((64, 64), np.float32), np.ones((64, 64), np.float32)).sum())
    """, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "refused: [parallel] could not start" in r.stdout, r.stdout
