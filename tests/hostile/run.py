"""The hostile-input matrix: every case of cases.py in its own process with a timeout and an
address-space limit, classified as OK / CRASH / HANG / OOM / WRONG / BADEXC, with a table of
counts per family x outcome. Exits 1 if any case is not OK.

    python tests/hostile/run.py [-j 2] [--family crashes] [--name SUBSTRING] [--list]

OUTCOMES:
  OK      the expected outcome: no exception for "ok", else one of the expected types
  CRASH   the process died of a signal (or of one in a CLI it ran), or left no result
  HANG    it ran past the timeout (the whole process group is killed)
  OOM     MemoryError that is not dsv3's own up-front refusal ("[op] ... needs ..."), or the
          process was killed (SIGKILL) by the memory limit / OOM killer
  WRONG   no exception where one was due, or a result the case's own check found wrong
  BADEXC  another exception type than expected, a message not matching, or a CLI traceback
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cases import CASES, FAMILIES  # noqa: E402

OUTCOMES = ("OK", "CRASH", "HANG", "OOM", "WRONG", "BADEXC")
MEMORY_LIMIT = 4 << 30   # RLIMIT_AS of each case
TIMEOUT_S = 60


def _limits():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _env():
    env = dict(os.environ)
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__import__("dsv3").__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "1")  # -j N processes share the cores
    env["PYTHONFAULTHANDLER"] = "1"
    return env


def classify(case, rc, res):
    """(outcome, detail) of one finished case; res is the child's result dict or None."""
    if rc is None:
        return "HANG", f"killed after {TIMEOUT_S} s"
    if rc == -signal.SIGKILL:
        return "OOM", "killed (SIGKILL)"
    if rc < 0:
        return "CRASH", f"signal {signal.Signals(-rc).name}"
    if res is None:
        return "CRASH", f"exit {rc} without a result"
    if res["status"] == "ok":
        if case.expect == "ok" or "ok" in case.expect:
            return "OK", ""
        return "WRONG", f"no exception; expected {case.expect}"
    types, msg = res["types"], res["msg"]
    name = types[0]
    for special, outcome in (("ChildCrash", "CRASH"), ("ChildHang", "HANG"), ("Wrong", "WRONG"),
                             ("TracebackDump", "BADEXC")):
        if special in types:
            return outcome, f"{name}: {msg}"
    if case.expect != "ok" and any(t in types for t in case.expect):
        if case.match and not re.search(case.match, msg):
            if "MemoryError" in types:
                return "OOM", f"{name}: {msg}"
            return "BADEXC", f"{name} not matching {case.match!r}: {msg}"
        return "OK", ""
    if "MemoryError" in types and not re.match(r"\[[\w.]+\]", msg):
        return "OOM", f"{name}: {msg}"
    if "AssertionError" in types:
        return "WRONG", f"{name}: {msg} {res.get('where', [''])[0]}"
    return "BADEXC", f"{name}: {msg} (expected {case.expect})"


def run_case(case, env):
    with tempfile.TemporaryDirectory(prefix="dsv3-hostile-") as d:
        out = os.path.join(d, ".result.json")
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, os.path.join(HERE, "child.py"), out], cwd=d, env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, preexec_fn=_limits, start_new_session=True)
        try:
            _, err = p.communicate(case.code.encode(), timeout=TIMEOUT_S)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            rc, err = None, b""
        try:
            os.killpg(p.pid, signal.SIGKILL)  # CLI children a case may have left behind
        except ProcessLookupError:
            pass
        res = None
        if os.path.exists(out):
            with open(out) as f:
                res = json.load(f)
        outcome, detail = classify(case, rc, res)
        if outcome == "CRASH" and err:
            detail += " | " + err.decode(errors="replace").strip().splitlines()[-1][:200]
        return case, outcome, detail, time.perf_counter() - t0


def run(cases, jobs=2, progress=None):
    env = _env()
    with ThreadPoolExecutor(max_workers=jobs) as ex:
        results = []
        for r in ex.map(lambda c: run_case(c, env), cases):
            results.append(r)
            if progress:
                progress(r)
    return results


def table(results):
    counts = collections.Counter((c.family, o) for c, o, _, _ in results)
    fams = [f for f in FAMILIES if any(c.family == f for c, _, _, _ in results)]
    w = max(len(f) for f in fams + ["family", "total"])
    lines = [f"{'family':<{w}} " + " ".join(f"{o:>6}" for o in OUTCOMES) + "  total"]
    for f in fams + ["total"]:
        row = [sum(n for (ff, oo), n in counts.items() if (f == "total" or ff == f) and oo == o)
               for o in OUTCOMES]
        lines.append(f"{f:<{w}} " + " ".join(f"{n:>6}" for n in row) + f"  {sum(row):>5}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--family", action="append", choices=FAMILIES)
    ap.add_argument("--name", default=None, help="only cases whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case")
    a = ap.parse_args(argv)
    cases = [c for c in CASES if (not a.family or c.family in a.family)
             and (a.name is None or a.name in c.name)]
    if a.list:
        for c in cases:
            print(f"{c.family:12} {c.name:60} {c.expect}  {c.needs or ''}")
        return 0
    t0 = time.perf_counter()

    def show(r):
        c, o, d, s = r
        if a.verbose or o != "OK":
            print(f"{o:6} {c.family:12} {c.name} ({s:.1f} s) {d}"
                  + (f"  [needs {c.needs}]" if c.needs and o != "OK" else ""), flush=True)

    results = run(cases, a.jobs, show)
    print(table(results))
    print(f"{len(results)} cases in {time.perf_counter() - t0:.0f} s (-j {a.jobs})")
    return 0 if all(o == "OK" for _, o, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
