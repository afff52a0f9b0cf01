"""Data- and expert-parallel training over MPI (dsv3.distributed, csrc/dist, kernels/moe_ep).

Each case runs tests/mpi/train_parallel.py under ``mpirun --oversubscribe`` (loopback,
shared memory) and compares with the same script run in one process on the same global
batches: losses, gradient norms and expert loads per step, and the weights after the steps.
Tolerances: losses within 1e-6 relative and gradient norms within 1e-5 relative per step;
weights: all but 0.2% of the elements within 2e-5 absolute after 3 AdamW steps at lr 3e-3,
and every element within 2 lr per step. (The gradient sums differ by fp32 reassociation; Adam's
first update is ~lr sign(g), so an element whose gradient is ~0 can move by up to 2 lr either
way: the rare entries of tokens that hardly occur.) A rank that skipped the all-reduce, the
1/W scaling or the global expert load fails them (grad norms differ by W, replicas diverge,
most weights move differently). Replicas must be bit-identical. Skipped with a reason when dsv3 was built without MPI or mpirun is missing.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import dsv3

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(HERE, "mpi", "train_parallel.py")
MPIRUN = shutil.which("mpirun")

pytestmark = [
    pytest.mark.skipif(not dsv3.distributed.available(),
                       reason="dsv3 built without MPI (install libopenmpi-dev and rebuild)"),
    pytest.mark.skipif(MPIRUN is None, reason="mpirun not found (apt-get install openmpi-bin)"),
]


def _env(extra=None):
    env = dict(os.environ)
    env.update(extra or {})
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_btl="self,vader", OMPI_MCA_rmaps_base_oversubscribe="1",
               OMPI_MCA_btl_vader_single_copy_mechanism="none", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(dsv3.__file__))]
                                          + [p for p in [env.get("PYTHONPATH")] if p]))
    return env


def run(tmp_path, name, np_=1, layout="none", timeout=180, check=True, env=None, **kw):
    out = os.path.join(str(tmp_path), name)
    args = [sys.executable, RUNNER, "--layout", layout, "--out", out]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        args += [flag] if v is True else [flag, str(v)]
    if np_ > 1 or layout != "none":
        args = [MPIRUN, "--oversubscribe", "-np", str(np_)] + args
    p = subprocess.run(args, env=_env(env), capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        ranks = []
        for r in range(max(np_, 1)):
            with open(os.path.join(out, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
        with np.load(os.path.join(out, "weights.npz")) as z:  # closes the archive
            w = dict(z)
        return ranks, w
    return p


def assert_same_run(par, single, par_w, single_w, loss_rtol=1e-6, w_atol=2e-5, frac=2e-3):
    shas = {r["weights_sha256"] for r in par}
    assert len(shas) == 1, "replicas diverged"
    for r in par:
        np.testing.assert_allclose(r["loss"], single["loss"], rtol=loss_rtol, atol=0)
        np.testing.assert_allclose(r["grad_norm"], single["grad_norm"], rtol=1e-5, atol=0)
        assert r["expert_load"] == single["expert_load"]  # the GLOBAL load, every rank
    assert_weights_close(par_w, single_w, w_atol, steps=len(single["loss"]), frac=frac)


def assert_weights_close(a, b, atol=2e-5, steps=3, lr=3e-3, frac=2e-3):
    assert a.keys() == b.keys()
    diff = np.concatenate([np.abs(a[k] - b[k]).ravel() for k in sorted(b)])
    assert diff.max() <= 2 * lr * steps + 1e-6, diff.max()
    assert np.mean(diff > atol) <= frac, (np.mean(diff > atol), np.sort(diff)[-10:])


@pytest.fixture(scope="module")
def single_tiny(tmp_path_factory):
    return run(tmp_path_factory.mktemp("single"), "single")


@pytest.mark.parametrize("np_,layout", [(2, "dp=2"), (2, "ep=2"), (4, "dp=2,ep=2"),
                                        (4, "ep=4")])
def test_parallel_equals_single_process(tmp_path, single_tiny, np_, layout):
    (single,), sw = single_tiny
    par, pw = run(tmp_path, "par", np_, layout)
    assert_same_run(par, single, pw, sw)
    if "ep" in layout:
        st = par[0]["ep_stats"]
        assert st["tokens"] > 0 and st["dispatch_bytes"] > 0
        # tiny: 8 experts in n_group=4 groups, topk_group=2; ep divides n_group, so each group's
        # experts live on one rank and a token reaches at most topk_group ranks
        assert 1.0 <= st["ranks_per_token"] <= 2.0


@pytest.mark.parametrize("thread,level", [("funneled", 1), ("serialized", 2)])
def test_lower_mpi_thread_levels_train_the_same(tmp_path, single_tiny, thread, level):
    """dp=2 x ep=2 with MPI initialised below MPI_THREAD_MULTIPLE: funneled runs every
    collective on the step's own thread (no communication thread, no overlap), serialized runs
    the expert dispatch through the communication thread too (train_parallel.cpp). Both train
    as the single process does."""
    par, w = run(tmp_path, thread, 4, "dp=2,ep=2", env={"DSV3_MPI_THREAD": thread})
    assert {r["mpi_thread_level"] for r in par} == {level}
    assert_same_run(par, single_tiny[0][0], w, single_tiny[1])
    hidden = [ts["all_reduce_hidden_fraction"] for r in par for ts in r["time_split"]]
    if level < 2:  # no communication thread: the step waits for every all-reduce
        assert hidden == [0.0] * len(hidden)


def test_the_time_split_adds_up_and_the_all_reduce_overlaps_the_backward(tmp_path):
    """dp=2 (MPI_THREAD_MULTIPLE): each step reports its split; compute + waited all-reduce
    + dispatch/combine is the step time, and some of the all-reduce runs while the backward
    continues (the block all-reduces go to the communication thread)."""
    par, _ = run(tmp_path, "ts", 2, "dp=2", steps=4)
    assert {r["mpi_thread_level"] for r in par} == {3}
    for r in par:
        for ts in r["time_split"]:
            assert set(ts) >= {"step", "compute", "all_reduce", "all_reduce_waited",
                               "all_reduce_hidden_fraction", "dispatch_combine",
                               "all_reduce_bytes", "dispatch_combine_bytes"}
            assert abs(ts["compute"] + ts["all_reduce_waited"] + ts["dispatch_combine"]
                       - ts["step"]) < 1e-9
            assert 0.0 <= ts["all_reduce_hidden_fraction"] <= 1.0 and ts["all_reduce"] > 0
            assert ts["dispatch_combine_bytes"] == 0  # dp only: no expert dispatch
    assert max(ts["all_reduce_hidden_fraction"] for r in par for ts in r["time_split"]) > 0


def test_all_to_all_in_pieces_moves_the_same_bytes(tmp_path):
    # Messages above 2 GiB (MPI's int counts) go as point-to-point pieces; DSV3_MPI_MAX_MESSAGE
    # lowers that limit so the path runs here: 1000-byte pieces must give the same bits.
    ck = {n: os.path.join(str(tmp_path), n + "_ck") for n in ("whole", "pieces")}
    sp = {n: os.path.join(str(tmp_path), n + "_sp") for n in ("whole", "pieces")}
    whole, ww = run(tmp_path, "whole", 2, "ep=2", save=ck["whole"], save_pretrained=sp["whole"])
    pieces, pw = run(tmp_path, "pieces", 2, "ep=2", env={"DSV3_MPI_MAX_MESSAGE": "1000"},
                     save=ck["pieces"], save_pretrained=sp["pieces"])
    # the saves' gathers to rank 0 (zero counts towards rank 1) in pieces too: the same files
    for d in (ck, sp):
        files = [f for f in sorted(os.listdir(d["whole"])) if f.endswith((".npy", ".safetensors"))]
        assert any(f.endswith(".safetensors") for f in files)
        for f in files:
            with open(os.path.join(d["whole"], f), "rb") as a, \
                    open(os.path.join(d["pieces"], f), "rb") as b:
                assert a.read() == b.read(), f
    assert [r["loss"] for r in pieces] == [r["loss"] for r in whole]
    assert {r["weights_sha256"] for r in pieces} == {r["weights_sha256"] for r in whole}
    assert pieces[0]["ep_stats"]["dispatch_bytes"] > 4 * 1000  # several pieces per message
    for k in ww:
        np.testing.assert_array_equal(pw[k], ww[k])


def test_wrong_gradients_would_fail_the_comparison(tmp_path, single_tiny):
    """The tolerance separates: twice the batch in one process (another run) is far outside."""
    (single,), sw = single_tiny
    (other,), ow = run(tmp_path, "other", batch=16)
    with pytest.raises(AssertionError):
        assert_same_run([other], single, ow, sw)


def test_gradients_equal_single_process_elementwise(tmp_path):
    """One step without clipping: the applied gradient (the global batch's mean) of every
    layout equals the single process's, element by element, to 1e-5 of each tensor's largest
    entry; the gradient of one rank's half of the batch (a missing all-reduce) is far off."""
    import dsv3 as d
    (single,), _ = run(tmp_path, "s", steps=1, clip=0, grads=True)
    g1 = np.load(os.path.join(str(tmp_path), "s", "grads.npy"))
    for np_, layout in [(2, "dp=2"), (4, "dp=2,ep=2")]:
        run(tmp_path, layout, np_, layout, steps=1, clip=0, grads=True)
        g = np.load(os.path.join(str(tmp_path), layout, "grads.npy"))
        assert np.max(np.abs(g - g1)) <= 1e-5 * np.max(np.abs(g1)), layout
    run(tmp_path, "half", steps=1, clip=0, grads=True, batch=4)
    gh = np.load(os.path.join(str(tmp_path), "half", "grads.npy"))
    assert np.max(np.abs(gh - g1)) > 1e-2 * np.max(np.abs(g1))
    del d


def test_a_cpp_failure_on_one_rank_raises_on_every_rank(tmp_path):
    """dp: rank 1's C++ step fails (a token out of range in its rows only): rank 1 raises its
    own IndexError, rank 0 a RuntimeError naming rank 1, nothing is applied, and the run goes
    on: the weights equal a single-process run that skipped that step."""
    par, pw = run(tmp_path, "par", 2, "dp=2", steps=3, fail_rank_cpp=1)
    assert par[1]["error"][0] == "IndexError" and "vocab" in par[1]["error"][1]  # its own type
    assert par[0]["error"][0] == "RuntimeError" and "rank 1" in par[0]["error"][1]
    (single,), sw = run(tmp_path, "single", steps=3, skip_step=1)
    assert_same_run(par, single, pw, sw)


def test_a_cpp_failure_with_expert_parallel_ends_the_job(tmp_path):
    p = run(tmp_path, "ep", 2, "ep=2", steps=3, fail_rank_cpp=1, check=False, timeout=120)
    assert p.returncode != 0
    assert "aborting the job" in p.stderr + p.stdout


def test_small_config_with_grad_accum(tmp_path):
    (single,), sw = run(tmp_path, "s", config="small", batch=8, seq=16, steps=2, grad_accum=2)
    par, pw = run(tmp_path, "p", 4, "dp=2,ep=2", config="small", batch=8, seq=16, steps=2,
                  grad_accum=2)
    assert_same_run(par, single, pw, sw)


def test_fp8_precision_data_parallel(tmp_path):
    # fp8's weight-gradient GEMMs quantize dy^T and x^T in 1x128 tiles along the tokens of a
    # micro-batch: the same micro-batches (2 sequences) on both sides give the same tiles.
    # (With ep > 1 an expert's rows come from several ranks, so its tiles differ: not compared.)
    # One step: the second would start from weights that differ by fp32 reassociation
    # (all-reduce over ranks vs accumulation over micro-batches), and a 128x128 weight block
    # whose amax moves by one ulp gets a new scale, so all its 16384 elements are quantized
    # anew; Adam's first updates are +-lr whatever the gradient's size, so such flips move
    # weights by up to 2 lr (after 2 steps 3% of the weights on a Zen 5 differed by > 2e-5).
    (single,), sw = run(tmp_path, "s", config="small", batch=8, seq=16, steps=1, grad_accum=4,
                        precision="fp8")
    par, pw = run(tmp_path, "p", 4, "dp=4", config="small", batch=8, seq=16, steps=1,
                  precision="fp8")
    # fp8 rounds the (reassociated) gradients' GEMM operands: more near-zero elements flip
    assert_same_run(par, single, pw, sw, frac=1e-2)
    # the applied gradient itself, element by element (Adam's first update is +-lr whatever its
    # size, so the weights above cannot show a gradient that is off in magnitude); a rank's half
    # of the batch (a missing all-reduce) is far off
    def grads(name, np_=1, layout="none", batch=8, **kw):
        run(tmp_path, name, np_, layout, config="small", batch=batch, seq=16, steps=1, clip=0,
            grads=True, precision="fp8", **kw)
        return np.load(os.path.join(str(tmp_path), name, "grads.npy"))
    g1, gp = grads("gs", grad_accum=4), grads("gp", 4, "dp=4")
    gh = grads("gh", grad_accum=2, batch=4)
    scale = np.max(np.abs(g1))
    assert np.max(np.abs(gp - g1)) <= 1e-5 * scale, np.max(np.abs(gp - g1)) / scale  # 6e-8 seen
    assert np.max(np.abs(gh - g1)) > 1e-2 * scale


def test_fp8_dispatch_equals_quantize_dequantize(tmp_path):
    (plain,), _ = run(tmp_path, "plain")
    (emul,), ew = run(tmp_path, "emul", fp8_dispatch=True)
    par, pw = run(tmp_path, "par", 2, "ep=2", fp8_dispatch=True)
    assert_same_run(par, emul, pw, ew)
    # and it is not the fp32 dispatch: the quantization shows in the loss
    assert abs(emul["loss"][0] - plain["loss"][0]) > 1e-6
    fp32_par, _ = run(tmp_path, "par32", 2, "ep=2")
    assert par[0]["ep_stats"]["dispatch_bytes"] < 0.35 * fp32_par[0]["ep_stats"]["dispatch_bytes"]


def test_save_at_four_resume_exact_and_load_anywhere(tmp_path):
    ck = os.path.join(str(tmp_path), "ck")
    straight, sw = run(tmp_path, "straight", 4, "dp=2,ep=2", steps=3)
    run(tmp_path, "first", 4, "dp=2,ep=2", steps=2, save=ck)
    resumed, rw = run(tmp_path, "resumed", 4, "dp=2,ep=2", steps=1, load=ck)
    assert resumed[0]["weights_sha256"] == straight[0]["weights_sha256"]  # exact resume
    # the checkpoint is an ordinary one: a single process and dp=2 continue it alike
    (one,), w1 = run(tmp_path, "one", steps=1, load=ck)
    two, w2 = run(tmp_path, "two", 2, "dp=2", steps=1, load=ck)
    for w in (w1, w2):
        assert_weights_close(w, sw)
    np.testing.assert_allclose(one["loss"], straight[0]["loss"][2:], rtol=1e-6)
    m = dsv3.Model.from_pretrained(ck)
    assert m.parameter_shapes().keys() == sw.keys()


def test_saves_gather_the_experts_on_rank_0_only(tmp_path):
    """dp=2 x ep=2: for Trainer.save and save_pretrained, rank 1 sends its experts (weights;
    and moments for save) to rank 0 and to no one else; ranks 2 and 3 (the other replica)
    send nothing (before, every rank received the whole model). The files load exactly."""
    ck, sp = (os.path.join(str(tmp_path), n) for n in ("ck", "sp"))
    par, w = run(tmp_path, "par", 4, "dp=2,ep=2", steps=1, save=ck, save_pretrained=sp)
    sent = []
    for r in range(4):
        with open(os.path.join(str(tmp_path), "par", f"rank{r}.saved.json")) as f:
            sent.append(json.load(f))
    rep, ex = _split_counts(par[0]["local_shapes"])  # rank 0's local shapes: E/2 experts
    assert sent[1]["save_pretrained"] == 4 * ex  # its experts' float32 weights, once
    assert sent[1]["save"] == 3 * 4 * ex  # weights and the two float32 moments
    for r in (0, 2, 3):
        assert sent[r] == {"save": 0, "save_pretrained": 0}, (r, sent[r])
    for d in (ck, sp):
        s = dsv3.Model.from_pretrained(d).state_dict()
        assert s.keys() == w.keys()
        for k in s:
            np.testing.assert_array_equal(s[k], w[k])


def test_a_rank_that_cannot_gather_stops_every_rank(tmp_path):
    """dp=2 x ep=2: rank 0 (the one that holds the gathered model) fails to allocate it
    (injected). Every rank raises from Trainer.save and save_pretrained, rank 0 its own
    MemoryError, the others a RuntimeError naming it, instead of waiting in the gather's
    all-to-all; nothing is written."""
    ck, sp = (os.path.join(str(tmp_path), n) for n in ("ck", "sp"))
    run(tmp_path, "par", 4, "dp=2,ep=2", steps=1, save=ck, save_pretrained=sp, catch_save=True,
        env={"DSV3_TEST_FAIL_GATHER_RANK": "0"}, timeout=120)
    for r in range(4):
        with open(os.path.join(str(tmp_path), "par", f"rank{r}.saved.json")) as f:
            rec = json.load(f)
        for name in ("save", "save_pretrained"):
            kind, msg = rec[name + "_error"]
            if r == 0:
                assert kind == "MemoryError", rec
            else:
                assert kind == "RuntimeError" and "could not take part (rank 0" in msg, rec
    assert not os.path.exists(ck) and not os.path.exists(sp)


@pytest.mark.parametrize("layout", ["dp=2", "ep=2"])
def test_a_raising_rank_ends_the_job(tmp_path, layout):
    t0 = time.time()
    p = run(tmp_path, "fail", 2, layout, steps=50, fail_rank=1, check=False, timeout=120)
    assert p.returncode != 0
    assert "fails on purpose" in p.stderr + p.stdout
    assert time.time() - t0 < 60


@pytest.mark.parametrize("layout", ["dp=2", "ep=2"])
def test_a_killed_rank_ends_the_job(tmp_path, layout):
    out = os.path.join(str(tmp_path), "kill")
    os.makedirs(out)
    args = [MPIRUN, "--oversubscribe", "-np", "2", sys.executable, RUNNER, "--layout", layout,
            "--out", out, "--steps", "100000", "--pid-dir", out]
    p = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        pid_file = os.path.join(out, "pid1")
        while not os.path.exists(pid_file) and time.time() < deadline:
            time.sleep(0.1)
        assert os.path.exists(pid_file), "rank 1 never started"
        time.sleep(0.5)
        with open(pid_file) as f:
            os.kill(int(f.read()), signal.SIGKILL)
        p.wait(timeout=60)  # bounded: mpirun ends the survivors
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0


@pytest.mark.parametrize("np_,layout,msg", [(2, "dp=3", "must equal the number of processes"),
                                            (2, "ep=3", "does not divide"),
                                            (2, "dp=1,ep=2,", "cannot read"),
                                            (2, "ep=2", "must divide n_routed_experts")])
def test_bad_layout_refused_before_any_work(tmp_path, np_, layout, msg):
    extra = {"config": "dense"} if msg.startswith("must divide") else {}
    p = run(tmp_path, "bad", np_, layout, check=False, timeout=120, **extra)
    assert p.returncode != 0
    assert msg in p.stderr + p.stdout
    assert not os.path.exists(os.path.join(str(tmp_path), "bad", "rank0.json"))


def test_layout_parsing():
    from dsv3.distributed import parse_layout
    assert parse_layout("dp=2,ep=2", 4) == (2, 2)
    assert parse_layout("ep=2", 4) == (2, 2)
    assert parse_layout(None, 3) == (3, 1)
    with pytest.raises(ValueError, match="dp must be an integer"):
        parse_layout("dp=0", 1)
    with pytest.raises(ValueError, match="given twice"):
        parse_layout("dp=1,dp=1", 1)


def _split_counts(shapes):
    """(replicated parameters, routed-expert parameters) of {name: shape}."""
    is_expert = [".mlp.experts." in n for n in shapes]
    sizes = [int(np.prod(s)) for s in shapes.values()]
    return (sum(n for n, e in zip(sizes, is_expert) if not e),
            sum(n for n, e in zip(sizes, is_expert) if e))


@pytest.mark.parametrize("np_,layout,ep", [(2, "ep=2", 2), (4, "dp=2,ep=2", 2)])
def test_expert_shards_hold_their_experts_and_checkpoint_the_full_model(tmp_path, np_, layout,
                                                                         ep):
    """An EP rank holds the replicated parameters plus E/ep routed experts per MoE block (its
    own, by global name); training, evaluation and save_pretrained (gathered, full Hugging Face
    layout) equal the single process."""
    sp_single, sp_par = (os.path.join(str(tmp_path), n) for n in ("sp1", "sp2"))
    (single,), sw = run(tmp_path, "single", evaluate=True, save_pretrained=sp_single)
    par, pw = run(tmp_path, "par", np_, layout, evaluate=True, save_pretrained=sp_par)
    assert_same_run(par, single, pw, sw)
    rep, ex = _split_counts(single["local_shapes"])
    E = dsv3.Config.tiny().n_routed_experts
    for r, rec in enumerate(par):
        e = r % ep
        assert rec["expert_shard"] == [ep, e]
        assert rec["local_parameters"] == rep + ex // ep
        owned = {int(n.split(".mlp.experts.")[1].split(".")[0]) for n in rec["local_shapes"]
                 if ".mlp.experts." in n}
        assert owned == set(range(e * E // ep, (e + 1) * E // ep))
        np.testing.assert_allclose(rec["val_loss"], single["val_loss"], rtol=1e-6)
        # its AdamW moments are local-sized: the slab of its own parameters, not the full one
        assert rec["slab_end"] <= rec["moment_elems"] < rec["slab_end"] + 16
        assert single["moment_elems"] - rec["moment_elems"] >= ex - ex // ep
        assert rec["moment_elems"] <= rep + ex // ep + 16 * len(rec["local_shapes"])
    assert single["expert_shard"] is None and single["local_parameters"] == rep + ex
    m2 = dsv3.Model.from_pretrained(sp_par)  # an ordinary full checkpoint
    s2 = m2.state_dict()
    assert s2.keys() == sw.keys()
    for k in s2:
        np.testing.assert_array_equal(s2[k], pw[k])  # the gathered weights, exactly


def test_a_dp_checkpoint_loads_into_expert_shards_and_bf16_moments_resume_exactly(tmp_path):
    """A checkpoint of unsharded ranks (dp=2) continues at ep=2 and ep=4 (each rank takes
    its experts of the full files) as the run that never stopped; an ep=2 run with bf16
    moments saved and resumed equals its straight run bit for bit."""
    ck = os.path.join(str(tmp_path), "ck")
    straight, sw = run(tmp_path, "straight", 2, "dp=2", steps=3)
    run(tmp_path, "first", 2, "dp=2", steps=2, save=ck)
    for np_, layout in [(2, "ep=2"), (4, "ep=4")]:
        par, w = run(tmp_path, layout, np_, layout, steps=1, load=ck)
        assert len({r["weights_sha256"] for r in par}) == 1
        assert_weights_close(w, sw)
        np.testing.assert_allclose(par[0]["loss"], straight[0]["loss"][2:], rtol=1e-6)
        rep, ex = _split_counts(par[0]["local_shapes"])
        ep = int(layout.split("=")[1])
        assert par[0]["local_parameters"] == rep + ex  # its shapes hold E/ep experts
        assert ex * ep == _split_counts({k: v.shape for k, v in sw.items()})[1]
    ck16 = os.path.join(str(tmp_path), "ck16")
    s16, _ = run(tmp_path, "s16", 2, "ep=2", steps=3, moments="bfloat16")
    run(tmp_path, "f16", 2, "ep=2", steps=2, moments="bfloat16", save=ck16)
    r16, _ = run(tmp_path, "r16", 2, "ep=2", steps=1, load=ck16)
    assert r16[0]["weights_sha256"] == s16[0]["weights_sha256"]


def test_expert_gradients_are_not_summed_over_the_world(tmp_path):
    """ep=2 (dp=1): only the replicated gradients cross ranks (each rank's experts have no
    other holder), so a rank's all-reduce bytes per step are the dp=2 run's (the whole slab)
    times the replicated share of the parameters."""
    dp, _ = run(tmp_path, "dp", 2, "dp=2", steps=2)
    ep, _ = run(tmp_path, "ep", 2, "ep=2", steps=2)
    rep, ex = _split_counts(dp[0]["local_shapes"])
    ratio = ep[0]["allreduce_bytes"][-1] / dp[0]["allreduce_bytes"][-1]
    assert 0.9 * rep / (rep + ex) <= ratio <= 1.1 * rep / (rep + ex), (ratio, rep, ex)


def test_the_cli_under_mpirun_trains_what_one_process_trains(tmp_path):
    """`mpirun -np 2 python -m dsv3 train ... --parallel ep=2` and the same command without
    mpirun (and without --parallel): the same losses in the same kind of JSON-lines log,
    a checkpoint that loads, written by rank 0 alone."""
    data = tmp_path / "text.txt"
    data.write_text("".join(f"line {i}: the quick brown fox {i * 7 % 13} jumps\n"
                            for i in range(400)))
    cfg = tmp_path / "config.json"  # Config.tiny with room for the byte tokenizer
    dsv3.Config.tiny().replace(vocab_size=264).to_json(cfg)
    common = ["-m", "dsv3", "train", "--config", str(cfg), "--steps", "3", "--batch", "4",
              "--seq", "16", "--data", str(data), "--warmup", "0", "--schedule", "constant",
              "--no-progress", "--eval-interval", "0"]
    logs = {}
    for name, prefix, extra in [("one", [], []),
                                ("par", [MPIRUN, "--oversubscribe", "-np", "2"],
                                 ["--parallel", "ep=2"])]:
        out = tmp_path / name / "ck"
        out.parent.mkdir()
        p = subprocess.run(prefix + [sys.executable] + common + ["--out", str(out)] + extra,
                           env=_env(), capture_output=True, text=True, timeout=300,
                           cwd=str(out.parent))
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert sorted(os.listdir(out.parent)) == ["ck", "ck.log.jsonl"]  # nothing per rank
        with open(str(out) + ".log.jsonl") as f:
            logs[name] = [json.loads(line) for line in f]
        dsv3.Model.from_pretrained(str(out))
    steps = {name: [r for r in recs if "loss" in r and "step" in r] for name, recs in logs.items()}
    assert len(steps["one"]) == len(steps["par"]) == 3
    for a, b in zip(steps["one"], steps["par"]):
        assert set(a) <= set(b)  # the parallel run adds its time split
        assert a["expert_load"] == b["expert_load"]  # the global load, logged by rank 0
    np.testing.assert_allclose([r["loss"] for r in steps["par"]],
                               [r["loss"] for r in steps["one"]], rtol=1e-5)
