"""Execute the research notebooks headless (nbclient).

    python .ci/notebooks.py                 # CI: every notebook with FAST=1, outputs discarded
    python .ci/notebooks.py --full --write  # regenerate the committed outputs (FAST=0)
    python .ci/notebooks.py 03_moe_balancing.ipynb   # just one (names or paths)

Each notebook reads FAST from the environment. A cell that raises fails the run (nbclient's
CellExecutionError names the notebook and cell); the run prints each notebook's wall time and
fails if the total exceeds --budget seconds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"


def run(path: Path, fast: bool, write: bool, timeout: int) -> float:
    nb = nbformat.read(path, as_version=4)
    env_fast = os.environ.get("FAST")
    os.environ["FAST"] = "1" if fast else "0"
    t0 = time.perf_counter()
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if env_fast is None:
            os.environ.pop("FAST", None)
        else:
            os.environ["FAST"] = env_fast
    dt = time.perf_counter() - t0
    if write:
        nb.metadata["dsv3_run"] = {"FAST": fast, "seconds": round(dt, 1)}
        nbformat.write(nb, path)
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="notebooks to run (default: notebooks/*.ipynb)")
    ap.add_argument("--full", action="store_true", help="FAST=0 (the committed setting)")
    ap.add_argument("--write", action="store_true", help="save the executed outputs in place")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    ap.add_argument("--budget", type=float, default=None,
                    help="fail if the total wall time exceeds this many seconds")
    a = ap.parse_args()
    paths = ([Path(n) if Path(n).exists() else NB_DIR / n for n in a.names]
             or sorted(NB_DIR.glob("*.ipynb")))
    if not paths:
        print("no notebooks found", file=sys.stderr)
        return 1
    total = 0.0
    for p in paths:
        dt = run(p, fast=not a.full, write=a.write, timeout=a.timeout)
        total += dt
        print(f"{p.name:32s} {dt:7.1f} s", flush=True)
    print(f"{'total':32s} {total:7.1f} s")
    if a.budget is not None and total > a.budget:
        print(f"notebooks took {total:.0f} s, over the budget of {a.budget:.0f} s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
