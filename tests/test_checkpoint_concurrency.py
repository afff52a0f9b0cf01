"""Checkpoints under concurrent use, with real processes: a reader while another process
saves into the same directory sees one whole checkpoint or a clear error (never a mix, never
NaN); concurrent savers serialize and leave one complete checkpoint and no temporaries."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import dsv3
from dsv3 import checkpoint
from dsv3._files import ChangedWhileReading

# Two checkpoints that differ in everything a mix could combine: weights, dtype (float32 /
# bfloat16 headers), shard count and shard names.
VARIANTS = {"a": dict(seed=1, dtype="float32", max_shard_bytes=1 << 15),
            "b": dict(seed=2, dtype="bfloat16", max_shard_bytes=1 << 13)}

SAVER = r"""
import os, sys, time
import dsv3
from dsv3 import checkpoint
variants = {variants!r}
target, seconds, order, fallback = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
if fallback == "1":  # the path taken where renameat2(RENAME_EXCHANGE) is missing
    checkpoint._exchange = lambda a, b: False
_rename = os.rename
def slow_rename(a, b):  # a slow file system: widens the window between steps of a publish
    _rename(a, b)
    time.sleep(0.05)
os.rename = slow_rename
models = {{k: dsv3.Model(dsv3.Config.tiny(), seed=v["seed"]) for k, v in variants.items()}}
end, n = time.time() + seconds, 0
while time.time() < end:
    k = order[n % len(order)]
    v = variants[k]
    models[k].save_pretrained(target, dtype=v["dtype"], max_shard_bytes=v["max_shard_bytes"])
    n += 1
print(n)
"""


def start_saver(target, seconds, order="ab", fallback=False):
    code = SAVER.format(variants=VARIANTS)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code, str(target), str(seconds), order,
                             "1" if fallback else "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def expected(tmp_path_factory):
    """{variant: state dict as loaded from a quiet save} (bf16 rounding included)."""
    out = {}
    for k, v in VARIANTS.items():
        d = tmp_path_factory.mktemp("quiet") / k
        dsv3.Model(dsv3.Config.tiny(), seed=v["seed"]).save_pretrained(
            d, dtype=v["dtype"], max_shard_bytes=v["max_shard_bytes"])
        out[k] = dsv3.Model.from_pretrained(d).state_dict()
    return out


def which(state, expected):
    """The variant ``state`` equals exactly, or None (a mix, NaN, anything else)."""
    for k, want in expected.items():
        if state.keys() == want.keys() and all(np.array_equal(state[n], want[n]) for n in want):
            return k
    return None


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "two_renames"])
def test_load_while_another_process_saves_sees_one_checkpoint(tmp_path, expected, fallback):
    target = tmp_path / "ck"
    dsv3.Model(dsv3.Config.tiny(), seed=1).save_pretrained(target, **{
        k: v for k, v in VARIANTS["a"].items() if k != "seed"})
    seconds = 5.0
    saver = start_saver(target, seconds, fallback=fallback)
    seen, clear_errors, bad = {"a": 0, "b": 0}, 0, []
    end = time.time() + seconds
    try:
        while time.time() < end and saver.poll() is None:
            try:
                state = dsv3.Model.from_pretrained(target).state_dict()
            except ChangedWhileReading as e:
                assert "changed while reading" in str(e) and str(target) in str(e)
                clear_errors += 1
                continue
            except FileNotFoundError as e:  # between the two renames of the fallback path
                assert fallback and str(target) in str(e), e
                clear_errors += 1
                continue
            k = which(state, expected)
            if k is None:
                bad.append(sorted(n for n, a in state.items() if not np.isfinite(a).all())[:3])
            else:
                seen[k] += 1
    finally:
        out, err = saver.communicate(timeout=120)
    assert saver.returncode == 0, err
    assert bad == [], f"{len(bad)} loads matched neither checkpoint (non-finite in {bad[:3]})"
    assert int(out) >= 4, "the saver barely ran"
    assert seen["a"] + seen["b"] > 0, (seen, clear_errors)
    assert checkpoint.is_checkpoint_dir(target)
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith(".")) == []


@pytest.mark.parametrize("where", ["read", "from_pretrained"])
def test_safetensors_fifo_is_not_a_regular_file(tmp_path, where):
    d = tmp_path / "ck"
    dsv3.Model(dsv3.Config.tiny(), seed=0).save_pretrained(d)
    os.remove(d / "model.safetensors")
    os.mkfifo(d / "model.safetensors")
    call = (f"st.read({str(d / 'model.safetensors')!r})" if where == "read"
            else f"dsv3.Model.from_pretrained({str(d)!r})")
    r = subprocess.run([sys.executable, "-c", f"import dsv3\nfrom dsv3 import safetensors_io "
                        f"as st\n{call}"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "ValueError" in r.stderr and "model.safetensors is not a regular file (a FIFO)" \
        in r.stderr, r.stderr


def test_shard_deleted_midway_is_a_clear_error(tmp_path, monkeypatch):
    # a reader that keeps losing the race (the saver deletes the old directory every time)
    d = tmp_path / "ck"
    dsv3.Model(dsv3.Config.tiny(), seed=0).save_pretrained(d, max_shard_bytes=1 << 14)
    real_read, calls = checkpoint.st.read, []

    def read_then_replace(name, dir_fd=None, shown=None):
        calls.append(name)
        dsv3.Model(dsv3.Config.tiny(), seed=len(calls)).save_pretrained(
            d, max_shard_bytes=1 << 14)  # publishes a new one, deletes the open one
        return real_read(name, dir_fd, shown)

    monkeypatch.setattr(checkpoint.st, "read", read_then_replace)
    with pytest.raises(ChangedWhileReading, match="changed while reading.*retry"):
        dsv3.Model.from_pretrained(d)
    assert len(calls) == checkpoint.LOAD_ATTEMPTS


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "two_renames"])
def test_two_processes_saving_into_one_directory_serialize(tmp_path, expected, fallback):
    target = tmp_path / "ck"
    savers = [start_saver(target, 4.0, order=k, fallback=fallback) for k in ("a", "b")]
    results = [s.communicate(timeout=180) for s in savers]
    for s, (out, err) in zip(savers, results):
        assert s.returncode == 0, err[-2000:]
        assert int(out) >= 2, "a saver barely ran"
    k = which(dsv3.Model.from_pretrained(target).state_dict(), expected)
    assert k in ("a", "b")
    v = VARIANTS[k]
    dsv3.Model(dsv3.Config.tiny(), seed=v["seed"]).save_pretrained(
        tmp_path / "quiet", dtype=v["dtype"], max_shard_bytes=v["max_shard_bytes"])
    assert sorted(os.listdir(target)) == sorted(os.listdir(tmp_path / "quiet"))  # one whole
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith(".")) == []


def test_save_gives_up_with_runtime_error_while_another_publish_holds_the_lock(
        tmp_path, monkeypatch):
    target = tmp_path / "ck"
    model = dsv3.Model(dsv3.Config.tiny(), seed=0)
    model.save_pretrained(target)
    before = {f: (target / f).read_bytes() for f in os.listdir(target)}
    monkeypatch.setattr(checkpoint, "LOCK_TIMEOUT", 0.2)
    with checkpoint.publish_lock(str(target)):
        assert os.path.exists(tmp_path / ".ck.dsv3-lock")
        with pytest.raises(RuntimeError, match="another save into .*ck is in progress"):
            dsv3.Model(dsv3.Config.tiny(), seed=1).save_pretrained(target)
    assert {f: (target / f).read_bytes() for f in os.listdir(target)} == before
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith(".")) == []  # lock removed
    model.save_pretrained(target)  # and the next save takes it again


@pytest.fixture(params=["exchange", "two_renames"])
def publish_path(request, monkeypatch):
    if request.param == "two_renames":
        monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    return request.param


@pytest.mark.parametrize("saver", ["model", "trainer"])
def test_user_data_swapped_in_after_the_check_is_never_deleted(tmp_path, monkeypatch,
                                                              publish_path, saver):
    # check_target passes, then (a race) the user's directory appears at the target
    target = tmp_path / "ck"
    real_publish = checkpoint.publish_dir

    def swap_then_publish(tmp, directory):
        if os.path.abspath(directory) == str(target):  # not Trainer.save's inner model save
            target.mkdir()
            (target / "notes.txt").write_text("precious")
        real_publish(tmp, directory)

    monkeypatch.setattr(checkpoint, "publish_dir", swap_then_publish)
    model = dsv3.Model(dsv3.Config.tiny(), seed=0)
    with pytest.raises(ValueError, match="not a dsv3 checkpoint.*nothing was replaced"):
        if saver == "model":
            model.save_pretrained(target)
        else:
            dsv3.Trainer(model, dsv3.TrainConfig(lr=1e-3)).save(target)
    assert os.listdir(target) == ["notes.txt"] and (target / "notes.txt").read_text() == \
        "precious"
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith(".")) == []


def test_user_data_that_cannot_be_put_back_is_kept_under_a_named_sibling(tmp_path, monkeypatch):
    target = tmp_path / "ck"
    real_exchange, calls = checkpoint._exchange, []

    def exchange_once(a, b):
        calls.append(a)
        return real_exchange(a, b) if len(calls) == 1 else False

    monkeypatch.setattr(checkpoint, "check_target", lambda d, who: None)
    monkeypatch.setattr(checkpoint, "_exchange", exchange_once)
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match=r"it was moved to .*ck\.kept-by-dsv3-\d+"):
        dsv3.Model(dsv3.Config.tiny(), seed=0).save_pretrained(target)
    kept = [f for f in os.listdir(tmp_path) if ".kept-by-dsv3-" in f]
    assert len(kept) == 1 and (tmp_path / kept[0] / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("saver", ["model", "trainer"])
@pytest.mark.parametrize("points_to", ["checkpoint", "nothing"])
def test_save_to_a_symlink_refused_before_writing(tmp_path, saver, points_to):
    real = tmp_path / "real"
    model = dsv3.Model(dsv3.Config.tiny(), seed=0)
    if points_to == "checkpoint":
        model.save_pretrained(real)
    before = {f: (real / f).read_bytes() for f in os.listdir(real)} if real.exists() else None
    link = tmp_path / "link"
    os.symlink(real, link)
    with pytest.raises(ValueError, match="link is a symlink.*refusing"):
        if saver == "model":
            dsv3.Model(dsv3.Config.tiny(), seed=1).save_pretrained(link)
        else:
            dsv3.Trainer(model, dsv3.TrainConfig(lr=1e-3)).save(link)
    assert os.readlink(link) == str(real)
    after = {f: (real / f).read_bytes() for f in os.listdir(real)} if real.exists() else None
    assert after == before
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith(".")) == []


def test_target_seen_mid_publish_waits_for_the_lock_instead_of_refusing(tmp_path, monkeypatch):
    # another saver is between the two renames (the name briefly absent, the old directory
    # being deleted): the first look says "not a checkpoint"; the check waits for that
    # publish (the lock) and looks again, so the save goes ahead (CI saw the refusal)
    target = tmp_path / "ck"
    dsv3.Model(dsv3.Config.tiny(), seed=0).save_pretrained(target)
    real, looks = checkpoint.is_checkpoint_dir, []

    def mid_publish_once(d):
        looks.append(d)
        return False if len(looks) == 1 else real(d)

    monkeypatch.setattr(checkpoint, "is_checkpoint_dir", mid_publish_once)
    dsv3.Model(dsv3.Config.tiny(), seed=1).save_pretrained(target)
    monkeypatch.setattr(checkpoint, "is_checkpoint_dir", real)
    assert len(looks) >= 2
    assert checkpoint.is_checkpoint_dir(target)
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith(".")) == []
    # a directory that stays foreign is still refused, after the second look
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="mine is a non-empty directory that is not a dsv3"):
        dsv3.Model(dsv3.Config.tiny(), seed=1).save_pretrained(tmp_path / "mine")
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith(".")) == []
