"""Static checks of the research notebooks. Executing them is CI's job
(.ci/notebooks.py, FAST=1); here: they exist, read the FAST switch, import only dsv3, numpy,
matplotlib and the standard library, are committed with the outputs of a full run (every code
cell executed, in order, no errors), and end with a finding that gives a verdict."""
import ast
import json
import sys
from pathlib import Path

import pytest

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["01_quickstart", "02_mla_kv_cache", "03_moe_balancing", "04_mtp", "05_fp8"]
ALLOWED = {"dsv3", "numpy", "matplotlib"} | set(sys.stdlib_module_names)


def cells(name):
    nb = json.loads((NB_DIR / f"{name}.ipynb").read_text(encoding="utf-8"))
    return nb["cells"]


def source(cell):
    s = cell["source"]
    return "".join(s) if isinstance(s, list) else s


@pytest.mark.parametrize("name", NAMES)
def test_notebook_reads_fast_and_imports_only_allowed_modules(name):
    code = [c for c in cells(name) if c["cell_type"] == "code"]
    assert code, f"{name}: no code cells"
    assert 'os.environ.get("FAST"' in source(code[0]), f"{name}: first code cell must read FAST"
    for c in code:
        for node in ast.walk(ast.parse(source(c))):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for m in mods:
                assert m.split(".")[0] in ALLOWED, f"{name}: imports {m}"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_committed_with_full_run_outputs(name):
    code = [c for c in cells(name) if c["cell_type"] == "code"]
    counts = [c.get("execution_count") for c in code]
    assert all(isinstance(n, int) for n in counts), f"{name}: unexecuted cells {counts}"
    assert counts == sorted(counts), f"{name}: cells executed out of order {counts}"
    outs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outs if o.get("output_type") == "error"], f"{name}: error outputs"
    run = json.loads((NB_DIR / f"{name}.ipynb").read_text(encoding="utf-8"))["metadata"]
    assert run.get("dsv3_run", {}).get("FAST") is False, \
        f"{name}: outputs must come from `.ci/notebooks.py --full --write` (FAST=0)"
    last = "".join(o.get("text", "") if isinstance(o.get("text", ""), str) else "".join(o["text"])
                   for o in code[-1].get("outputs", []))
    assert "Verdict" in last and "Claim" in last, f"{name}: the last cell must state claim + verdict"
