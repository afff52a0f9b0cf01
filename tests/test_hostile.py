"""The hostile-input matrix (tests/hostile/: cases.py is the data, run.py the runner) as one
pytest test per case: the whole matrix runs once, two cases at a time, each in its own
process with a timeout and a memory limit; each test then asserts its case's outcome is OK.

KNOWN_OPEN lists the cases still failing on this branch, each waiting for a fix on another
branch (cases.py's ``needs`` says which); they xfail (not strict) until the lead merges those
fixes and empties the set. Run ``python tests/hostile/run.py`` for the table per family."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "hostile"))
import run as hostile  # noqa: E402

BY_KEY = {f"{c.family}: {c.name}": c for c in hostile.CASES}

# The cases failing on this branch: those cases.py marks with `needs` (the fix each waits for:
# h20c bindings/ops.py/train.py, h20d checkpoint/files/CLI). The lead empties this set after
# merging those branches (KNOWN_OPEN = set()), reruns, and drops the fixed entries of NEEDS.
KNOWN_OPEN = {key for key, c in BY_KEY.items() if c.needs}


@pytest.fixture(scope="module")
def outcomes():
    return {f"{c.family}: {c.name}": (o, d) for c, o, d, _ in hostile.run(hostile.CASES, jobs=2)}


def test_matrix_is_large_and_covers_every_family():
    assert len(hostile.CASES) >= 320
    assert {c.family for c in hostile.CASES} == set(hostile.FAMILIES)
    assert len(BY_KEY) == len(hostile.CASES), "case names must be unique per family"
    assert KNOWN_OPEN <= set(BY_KEY), sorted(KNOWN_OPEN - set(BY_KEY))


@pytest.mark.parametrize("key", [pytest.param(k, marks=pytest.mark.xfail(
    reason=f"known open: needs {BY_KEY[k].needs}", strict=False)) if k in KNOWN_OPEN else k
    for k in BY_KEY])
def test_hostile_case(outcomes, key):
    outcome, detail = outcomes[key]
    assert outcome == "OK", f"{key}: {outcome} {detail}"
