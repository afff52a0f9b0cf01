"""Hardening of checkpoints, files and the CLI: duplicate tensor names, shard indexes pointing
outside the checkpoint, non-finite weights and scales, FIFOs as inputs, saves that must not
replace user files, one-line CLI errors, in-place bindings, and concurrent saves."""
import json
import os
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest

import dsv3
from dsv3 import _core, _files, checkpoint, safetensors_io as st


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "dsv3", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def model():
    return dsv3.Model(dsv3.Config.tiny(), seed=3)


def hidden(path):
    return sorted(f for f in os.listdir(path) if f.startswith("."))


# ---------------------------------------------------------------- 1. duplicate tensor names
def raw_safetensors(path, header_json: str, data: bytes):
    hdr = header_json.encode()
    path.write_bytes(struct.pack("<Q", len(hdr)) + hdr + data)


@pytest.mark.parametrize("name", ["lm_head.weight", "__metadata__"])
def test_duplicate_names_in_header_refused(tmp_path, name):
    info = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}' if name != "__metadata__" \
        else '{"format":"pt"}'
    hdr = f'{{"{name}":{info},"{name}":{info}}}'
    raw_safetensors(tmp_path / "x.safetensors", hdr, b"\0" * 4)
    with pytest.raises(ValueError, match=f"duplicate key '{name}'"):
        st.read(tmp_path / "x.safetensors")


def test_duplicate_names_in_index_refused(tmp_path, model):
    model.save_pretrained(tmp_path / "ck", max_shard_bytes=1 << 14)
    ipath = tmp_path / "ck" / "model.safetensors.index.json"
    text = ipath.read_text()
    first = next(iter(json.loads(text)["weight_map"].items()))
    text = text.replace('"weight_map": {', f'"weight_map": {{"{first[0]}": "{first[1]}", ', 1)
    ipath.write_text(text)
    with pytest.raises(ValueError, match="duplicate key"):
        dsv3.Model.from_pretrained(tmp_path / "ck")


# ---------------------------------------------------------------- 2. index escaping the dir
@pytest.fixture
def sharded(tmp_path, model):
    d = tmp_path / "ck"
    model.save_pretrained(d, max_shard_bytes=1 << 14)
    return d


def point_first_shard(d, target):
    ipath = d / "model.safetensors.index.json"
    index = json.loads(ipath.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (target if v == shard else v)
                           for k, v in index["weight_map"].items()}
    ipath.write_text(json.dumps(index))
    return shard


@pytest.mark.parametrize("how", ["absolute", "dotdot", "subdir", "not_a_string"])
def test_index_outside_directory_refused(sharded, tmp_path, how):
    d = sharded
    outside = tmp_path / "outside"
    outside.mkdir()
    shard = sorted(set(json.loads((d / "model.safetensors.index.json").read_text())
                       ["weight_map"].values()))[0]
    os.replace(d / shard, outside / shard)  # the real bytes now live outside the checkpoint
    target = {"absolute": str(outside / shard), "dotdot": f"../outside/{shard}",
              "subdir": f"sub/{shard}", "not_a_string": 7}[how]
    if how == "subdir":
        (d / "sub").mkdir()
        os.symlink(outside / shard, d / "sub" / shard)
    point_first_shard(d, target)
    with pytest.raises(ValueError, match="expected a file name inside the checkpoint directory"):
        dsv3.Model.from_pretrained(d)


def test_hub_cache_layout_loads(sharded, tmp_path, model):
    # a Hugging Face cache snapshot: every file a symlink into ../../blobs (outside the dir)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for f in os.listdir(sharded):
        os.replace(sharded / f, blobs / f)
        os.symlink(os.path.relpath(blobs / f, sharded), sharded / f)
    back = dsv3.Model.from_pretrained(sharded)
    sd = model.state_dict()
    assert all(np.array_equal(v, sd[k]) for k, v in back.state_dict().items())


def test_index_symlink_inside_directory_still_loads(sharded, model):
    d = sharded
    shard = sorted(set(json.loads((d / "model.safetensors.index.json").read_text())
                       ["weight_map"].values()))[0]
    os.replace(d / shard, d / "real.bin")
    os.symlink("real.bin", d / shard)
    back = dsv3.Model.from_pretrained(d)
    sd = model.state_dict()
    assert all(np.array_equal(v, sd[k]) for k, v in back.state_dict().items())


# ---------------------------------------------------------------- 3. non-finite weights
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "fp8"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_weight_refused(tmp_path, model, dtype, bad):
    d = tmp_path / "ck"
    model.save_pretrained(d, dtype=dtype)
    tensors, meta = st.read(d / "model.safetensors")
    stored = {k: (t.dtype, np.array(t.data)) for k, t in tensors.items()}
    victim = "model.layers.0.self_attn.o_proj.weight"
    kind, arr = stored[victim]
    if kind == "F8_E4M3":  # poison the scale: w = q * scale_inv
        victim += "_scale_inv"
        kind, arr = stored[victim]
    if kind == "BF16":
        arr.flat[arr.size // 2] = st.bf16_bits(np.array([bad], np.float32))[0]
    else:
        arr.flat[arr.size // 2] = bad
    stored[victim] = (kind, arr)
    st.write(d / "model.safetensors", stored, meta)
    with pytest.raises(ValueError, match=f"'{victim}' holds 1 NaN or infinite"):
        dsv3.Model.from_pretrained(d)


def test_nan_fp8_code_refused(tmp_path, model):
    d = tmp_path / "ck"
    model.save_pretrained(d, dtype="fp8")
    tensors, meta = st.read(d / "model.safetensors")
    stored = {k: (t.dtype, np.array(t.data)) for k, t in tensors.items()}
    name = "model.layers.0.mlp.down_proj.weight"
    if name not in stored:
        name = next(k for k, (t, _) in stored.items() if t == "F8_E4M3")
    stored[name][1].flat[0] = 0x7F  # E4M3 NaN
    st.write(d / "model.safetensors", stored, meta)
    with pytest.raises(ValueError, match=f"'{name}' holds 1 NaN"):
        dsv3.Model.from_pretrained(d)


# ---------------------------------------------------------------- 4. FIFOs and devices
def in_subprocess(code: str, timeout=60):
    """Run ``code`` in a fresh interpreter (a regression would hang, not fail, in-process)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("where", ["file", "directory"])
def test_config_json_fifo_refused_without_hanging(tmp_path, where):
    os.mkfifo(tmp_path / "config.json")
    path = tmp_path / "config.json" if where == "file" else tmp_path
    r = in_subprocess(f"import dsv3\ndsv3.Config.from_json({str(path)!r})")
    assert r.returncode != 0
    assert "ValueError" in r.stderr and "is not a regular file (a FIFO)" in r.stderr, r.stderr


def test_index_json_fifo_refused(tmp_path, model):
    d = tmp_path / "ck"
    model.save_pretrained(d)
    os.mkfifo(d / "model.safetensors.index.json")
    r = in_subprocess(f"import dsv3\ndsv3.Model.from_pretrained({str(d)!r})")
    assert r.returncode != 0
    assert "ValueError" in r.stderr and "FIFO" in r.stderr, r.stderr


@pytest.mark.parametrize("name", ["trainer.json", "optimizer_m.npy"])
def test_trainer_checkpoint_fifo_refused(tmp_path, name):
    d = tmp_path / "ck"
    dsv3.Trainer(dsv3.Model(dsv3.Config.tiny(), seed=0), dsv3.TrainConfig(lr=1e-3)).save(d)
    os.remove(d / name)
    os.mkfifo(d / name)
    r = in_subprocess(f"import dsv3\ndsv3.Trainer.load({str(d)!r})")
    assert r.returncode != 0
    assert "ValueError" in r.stderr and f"{name} is not a regular file (a FIFO)" in r.stderr, \
        r.stderr


def test_data_fifo_refused_and_skipped_in_directories(tmp_path):
    from dsv3 import data
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ValueError, match="not a regular file"):
        data.text_files(tmp_path / "pipe")
    (tmp_path / "a.txt").write_text("hello")
    assert data.text_files(tmp_path) == [str(tmp_path / "a.txt")]
    with pytest.raises(ValueError, match="not a regular file"):
        data.text_files("/dev/null")


@pytest.mark.parametrize("which", ["data", "config"])
def test_cli_train_fifo_one_line_error(tmp_path, which):
    os.mkfifo(tmp_path / "fifo")
    arg = ["--data", str(tmp_path / "fifo")] if which == "data" else \
        ["--config", str(tmp_path / "fifo")]
    r = run_cli("train", "--out", str(tmp_path / "out"), "--steps", "1", *arg, timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "FIFO" in r.stderr or "regular file" in r.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 5. never replace user data
@pytest.fixture(params=["file", "foreign_dir"])
def user_target(request, tmp_path):
    p = tmp_path / "target"
    if request.param == "file":
        p.write_text("precious")
    else:
        p.mkdir()
        (p / "notes.txt").write_text("precious")
    return p


def snapshot(p):
    if p.is_file():
        return p.read_text()
    return {f: (p / f).read_text() for f in os.listdir(p)}


@pytest.mark.parametrize("saver", ["model", "trainer", "fit"])
def test_save_refuses_user_file_or_directory(user_target, model, saver):
    before = snapshot(user_target)
    with pytest.raises(ValueError, match="refusing to replace"):
        if saver == "model":
            model.save_pretrained(user_target)
        else:
            t = dsv3.Trainer(dsv3.Model(dsv3.Config.tiny(), seed=0),
                             dsv3.TrainConfig(lr=1e-3, batch_size=1, seq_len=8))
            if saver == "trainer":
                t.save(user_target)
            else:
                t.fit(None, 0, checkpoint_dir=user_target)
    assert snapshot(user_target) == before
    assert hidden(user_target.parent) == []


def test_cli_train_out_refuses_user_data(user_target):
    before = snapshot(user_target)
    r = run_cli("train", "--out", str(user_target), "--steps", "1", "--config", "tiny")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "refusing to replace" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert snapshot(user_target) == before
    assert hidden(user_target.parent) == []


def test_save_over_checkpoint_and_empty_dir_still_allowed(tmp_path, model):
    (tmp_path / "empty").mkdir()
    model.save_pretrained(tmp_path / "empty")
    model.save_pretrained(tmp_path / "empty", dtype="bfloat16")  # over a dsv3 checkpoint
    assert checkpoint.is_checkpoint_dir(tmp_path / "empty")
    assert hidden(tmp_path) == []


def test_failed_save_leaves_no_temporaries(tmp_path, model, monkeypatch):
    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(st, "write_sharded", boom)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "ck")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- 6. CLI user errors
@pytest.mark.parametrize("args", [
    ["train", "--steps", "x", "--out", "o"],
    ["train"],
    ["nosuchcommand"],
    ["info", "/nonexistent/config.json"],
    ["generate", "/nonexistent"],
    ["train", "--out", "OUT", "--data", "/nonexistent/corpus", "--steps", "1"],
    ["train", "--out", "OUT", "--config", "BADJSON", "--steps", "1"],
    ["train", "--out", "OUT", "--config", "BADCFG", "--steps", "1"],
    ["info", "BADJSON"],
])
def test_cli_user_errors_are_one_line(tmp_path, args):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "badcfg.json").write_text(json.dumps({"hidden_size": -3}))
    subst = {"OUT": str(tmp_path / "out"), "BADJSON": str(tmp_path / "bad.json"),
             "BADCFG": str(tmp_path / "badcfg.json")}
    r = run_cli(*[subst.get(a, a) for a in args])
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsv3:"), r.stderr


# ---------------------------------------------------------------- 7. in-place bindings
def adamw_args(n=8, m_dtype=np.float32):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    return w, g, np.zeros(n, m_dtype), np.zeros(n, m_dtype)


@pytest.mark.parametrize("arg", [0, 2, 3])
@pytest.mark.parametrize("bad", ["noncontig", "float64", "readonly", "list"])
def test_adamw_refuses_arrays_it_cannot_update_in_place(arg, bad):
    args = list(adamw_args())
    x = args[arg]
    if bad == "noncontig":
        big = np.zeros(2 * x.size, np.float32)
        big[::2] = x
        x = big[::2]
    elif bad == "float64":
        x = x.astype(np.float64)
    elif bad == "readonly":
        x = x.copy()
        x.flags.writeable = False
    else:
        x = x.tolist()
    args[arg] = x
    name = "wgmv"[arg]
    with pytest.raises((TypeError, ValueError), match=f"{name} is updated in place"):
        _core.adamw_update(*args, 1e-3, 0.9, 0.95, 1e-8, 0.0, 1)


def test_adamw_bf16_moments_must_both_be_uint16():
    w, g, m, _ = adamw_args(m_dtype=np.uint16)
    with pytest.raises(TypeError, match="v is updated in place"):
        _core.adamw_update(w, g, m, np.zeros(8, np.float32), 1e-3, 0.9, 0.95, 1e-8, 0.0, 1)


def test_adamw_noncontiguous_gradient_is_fine():
    w, g, m, v = adamw_args()
    w2, m2, v2 = w.copy(), m.copy(), v.copy()
    big = np.zeros(16, np.float32)
    big[::2] = g
    _core.adamw_update(w, big[::2], m, v, 1e-3, 0.9, 0.95, 1e-8, 0.0, 1)
    _core.adamw_update(w2, g, m2, v2, 1e-3, 0.9, 0.95, 1e-8, 0.0, 1)
    assert np.array_equal(w, w2) and np.array_equal(m, m2) and not np.array_equal(w, g)


# ---------------------------------------------------------------- 8. concurrent saves
def test_temp_names_unique_per_call():
    from dsv3._files import temp_name
    assert len({temp_name("/x/y") for _ in range(100)}) == 100


@pytest.mark.parametrize("saver", ["model", "trainer"])
def test_two_concurrent_saves_one_wins_cleanly(tmp_path, saver):
    models = [dsv3.Model(dsv3.Config.tiny(), seed=s) for s in (1, 2)]
    target = tmp_path / "ck"
    barrier = threading.Barrier(2)
    errors = []

    def save(m):
        try:
            barrier.wait()
            if saver == "model":
                m.save_pretrained(target)
            else:
                dsv3.Trainer(m, dsv3.TrainConfig(lr=1e-3)).save(target)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    for _ in range(3):
        threads = [threading.Thread(target=save, args=(m,)) for m in models]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert hidden(tmp_path) == []
        back = dsv3.Model.from_pretrained(target).state_dict()
        assert any(all(np.array_equal(back[k], v) for k, v in m.state_dict().items())
                   for m in models)


# ---------------------------------------------------------------- CLI numeric flags, closed pipes
@pytest.mark.parametrize("cmd,flag,value", [
    ("train", "--steps", str(2**64)), ("train", "--steps", "-1"), ("train", "--save-every", "0"),
    ("train", "--eval-interval", "-1"), ("train", "--batch", "0"), ("train", "--seq", "0"),
    ("train", "--warmup", "-5"), ("train", "--lr", "nan"), ("train", "--lr", "0"),
    ("train", "--seed", "-1"), ("train", "--threads", "-5"),
    ("generate", "--max-new-tokens", "-1"), ("generate", "--temperature", "inf"),
    ("generate", "--top-k", "-1"), ("generate", "--top-p", "2"), ("generate", "--top-p", "0"),
    ("generate", "--num-draft-tokens", "0"), ("generate", "--eos-token-id", "-2"),
    ("generate", "--eos-token-id", "1.5"), ("generate", "--seed", str(2**70)),
])
def test_cli_numeric_flags_refused_with_their_range(tmp_path, cmd, flag, value):
    # --steps 2**64 trained forever; --save-every 0 and --eval-interval -1 exited 0
    first = ["--out", str(tmp_path / "o")] if cmd == "train" else [str(tmp_path)]
    r = run_cli(cmd, *first, flag, value, timeout=30)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert flag in lines[0] and ("range" in lines[0] or "not" in lines[0]), lines[0]


@pytest.mark.parametrize("args", [["info", "--config", "tiny"],
                                  ["generate", "CK", "--prompt-ids", "1,2", "--max-new-tokens", "4"]])
def test_cli_closed_stdout_exits_quietly(tmp_path, model, args):
    # `python -m dsv3 ... | head -1`: BrokenPipeError printed a traceback at exit
    model.save_pretrained(tmp_path / "ck")
    r_fd, w_fd = os.pipe()
    os.close(r_fd)  # the reader is gone before anything is written
    p = subprocess.run([sys.executable, "-m", "dsv3",
                        *[str(tmp_path / "ck") if a == "CK" else a for a in args]],
                       stdout=w_fd, stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(w_fd)
    assert p.returncode in (0, 141), p.stderr
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


# ---------------------------------------------------------------- checkpoint temporaries, snapshots
def test_two_rename_publish_killed_between_renames_is_swept(tmp_path, model):
    # without renameat2 the publish moves the old checkpoint aside, then renames the new one
    # in; a process killed in between left the moved-aside copy forever (never swept)
    d = tmp_path / "ck"
    model.save_pretrained(d)
    code = ("import os, dsv3\nfrom dsv3 import checkpoint\n"
            "checkpoint._exchange = lambda a, b: False\nreal = os.rename\n"
            "def rename(a, b):\n    real(a, b)\n"
            "    if os.path.basename(a) == 'ck':\n        os._exit(3)  # killed between the renames\n"
            "os.rename = rename\n"
            f"dsv3.Model(dsv3.Config.tiny(), seed=1).save_pretrained({str(d)!r})\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert not d.exists() and hidden(tmp_path), "the crash left no moved-aside checkpoint"
    model.save_pretrained(d)  # the next save sweeps what the dead process left
    assert os.listdir(tmp_path) == ["ck"]
    got = dsv3.Model.from_pretrained(d).state_dict()
    assert all(np.array_equal(got[k], v) for k, v in model.state_dict().items())


def test_next_save_restores_the_moved_aside_checkpoint_first(tmp_path, model, monkeypatch):
    # the target is missing after such a crash: the previous checkpoint is put back before
    # publishing, so a save that then fails still leaves a checkpoint there
    d = tmp_path / "ck"
    model.save_pretrained(d)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    os.rename(d, tmp_path / f".ck.{checkpoint.OLD_KIND}-{dead}-0123abcd")

    def boom(tmp, directory):
        raise OSError("disk on fire")

    monkeypatch.setattr(checkpoint, "_publish_locked", boom)
    with pytest.raises(OSError, match="disk on fire"):
        dsv3.Model(dsv3.Config.tiny(), seed=1).save_pretrained(d)
    assert checkpoint.is_checkpoint_dir(d) and hidden(tmp_path) == []


def test_trainer_load_reads_one_directory_snapshot(tmp_path, monkeypatch):
    # Trainer.load opened trainer.json, the weights and the moments by path at different
    # times: a directory swapped in between paired one checkpoint's step with another's moments
    t = np.random.default_rng(0).integers(0, 64, (2, 9))
    a = dsv3.Trainer(dsv3.Model(dsv3.Config.tiny(), seed=0), dsv3.TrainConfig(schedule="constant"))
    a.step(t)
    a.save(tmp_path / "tr")
    b = dsv3.Trainer(dsv3.Model(dsv3.Config.tiny(), seed=5), dsv3.TrainConfig(schedule="constant"))
    for _ in range(3):
        b.step(t)
    b.save(tmp_path / "tr2")
    real = _files.open_regular
    swapped = []

    def open_then_swap(path, *args, **kw):
        if os.path.basename(path) == "optimizer_m.npy" and not swapped:
            os.rename(tmp_path / "tr", tmp_path / "tr_old")  # a saver publishes b's checkpoint
            os.rename(tmp_path / "tr2", tmp_path / "tr")
            swapped.append(path)
        return real(path, *args, **kw)

    import dsv3.train as train_mod
    for mod in (checkpoint, train_mod):
        monkeypatch.setattr(mod, "open_regular", open_then_swap, raising=False)
    got = dsv3.Trainer.load(tmp_path / "tr")
    assert swapped
    assert got.step_count == a.step_count
    want_m, got_m = a.moments()[0], got.moments()[0]
    assert all(np.array_equal(got_m[k], v) for k, v in want_m.items())
    assert all(np.array_equal(got.model.state_dict()[k], v) for k, v in a.model.state_dict().items())
