"""One hostile case, run in its own process by run.py: ``python child.py RESULT_JSON`` with the
case's Python snippet on stdin. The snippet runs in a namespace holding the helpers below; the
outcome (no exception, or the exception's type names and first message line) is written to
RESULT_JSON, which run.py classifies. A crash leaves no result file; a hang is killed."""
import json
import os
import subprocess
import sys
import threading
import traceback

import numpy as np

import dsv3


class Wrong(AssertionError):
    """A silently wrong result (the snippet checked it)."""


class TracebackDump(Exception):
    """A CLI printed a Python traceback (or a multi-line error) instead of one line."""


class ChildCrash(Exception):
    """A CLI run by the snippet died of a signal."""


class ChildHang(Exception):
    """A CLI run by the snippet did not finish in time."""


def check(cond, what="result"):
    if not cond:
        raise Wrong(what)


def tiny(**changes):
    return dsv3.Config.tiny().replace(**changes)


def model(seed=0, **changes):
    return dsv3.Model(tiny(**changes), seed=seed)


def tokens(b=2, t=9, vocab=None, seed=0):
    return np.random.default_rng(seed).integers(0, vocab or tiny().vocab_size, size=(b, t))


def ckpt(path="ck", seed=0, **changes):
    """A saved tiny checkpoint; returns (path, model)."""
    m = model(seed, **changes)
    m.save_pretrained(path)
    return path, m


def run_threads(fns):
    """tests/test_concurrency.run_threads, catching BaseException too (a case's thread may
    exit or be interrupted); kept here so each case's process imports no test module."""
    out, errs = [None] * len(fns), [None] * len(fns)

    def wrap(i, f):
        try:
            out[i] = f()
        except BaseException as e:  # noqa: BLE001 - reported to the case
            errs[i] = e

    ts = [threading.Thread(target=wrap, args=(i, f)) for i, f in enumerate(fns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out, errs


def only_busy_errors(errs, words=("in use", "busy", "another thread")):
    """Each error is None or a RuntimeError about the object being in use."""
    for e in errs:
        if e is not None and not (isinstance(e, RuntimeError)
                                  and any(w in str(e) for w in words)):
            raise e


def cli(*args, timeout=50, ok=False):
    """Run ``python -m dsv3 ARGS``. ok=False: it must fail with exit status != 0 and one line
    on stderr, no traceback. ok=True: it must succeed. Returns (rc, stdout, stderr)."""
    try:
        r = subprocess.run([sys.executable, "-m", "dsv3", *map(str, args)], capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ChildHang(f"dsv3 {' '.join(map(str, args))}") from None
    if r.returncode < 0:
        raise ChildCrash(f"signal {-r.returncode}: {r.stderr[-300:]}")
    err = r.stderr.strip()
    if "Traceback (most recent call last)" in err:
        raise TracebackDump(err.splitlines()[-1][:200])
    if ok:
        check(r.returncode == 0, f"exit {r.returncode}: {err[-300:]}")
    else:
        check(r.returncode != 0, "exit status 0 for bad arguments")
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if len(lines) != 1:
            raise TracebackDump(f"{len(lines)} lines on stderr: {err[:300]!r}")
    return r.returncode, r.stdout, r.stderr


def write_safetensors(path, tensors, header_json=None):
    """tensors: list of (name, float32 array) written in order (duplicates allowed);
    header_json replaces the generated header text when given."""
    meta, blobs, off = [], [], 0
    for name, a in tensors:
        b = np.ascontiguousarray(a, dtype=np.float32).tobytes()
        meta.append(f'"{name}": {{"dtype": "F32", "shape": {list(a.shape)}, '
                    f'"data_offsets": [{off}, {off + len(b)}]}}')
        blobs.append(b)
        off += len(b)
    head = (header_json if header_json is not None else "{" + ", ".join(meta) + "}").encode()
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def edit_header(path, edit):
    """Rewrite a safetensors file with edit(header_dict) applied to its JSON header (the data
    bytes are kept as they are)."""
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    h = json.loads(raw[8:8 + n])
    edit(h)
    head = json.dumps(h).encode()
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + raw[8 + n:])


def main(result_path):
    code = sys.stdin.read()
    ns = {k: v for k, v in globals().items() if not k.startswith("__")}
    try:
        exec(compile(code, "<case>", "exec"), ns)
        res = {"status": "ok"}
    except BaseException as e:  # noqa: BLE001 - the outcome is the point
        res = {"status": "raised", "types": [c.__name__ for c in type(e).__mro__],
               "msg": (str(e).strip().splitlines() or [""])[0][:300],
               "where": traceback.format_exc().strip().splitlines()[-3:]}
    with open(result_path, "w") as f:
        json.dump(res, f)
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: a thread still running must not turn into a hang


if __name__ == "__main__":
    main(sys.argv[1])
