"""Public numeric arguments -> the Python int / float the engine takes (one rule each).

Integers (sizes, positions, indices, seeds, counts): ``int``, any ``numbers.Integral`` (numpy
integers included), never ``bool`` and never a float, not even 2.0 (as PyTorch refuses floats
for sizes: a float here is almost always a computation gone wrong, and truncating 1.5 or 8.7
would silently change the request) -> ``TypeError`` naming the argument. Out of range ->
``ValueError`` naming the argument and the allowed range; beyond int64 (what the engine takes)
-> ``OverflowError``, never a wrap-around or pybind11's overload dump.

Reals (weights, rates, temperatures): any ``numbers.Real`` but ``bool``, finite, within the
field's bounds -> ``ValueError`` naming the argument otherwise.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1


def integer(value, name: str, op: str, lo: Optional[int] = 0, hi: int = INT64_MAX) -> int:
    """``value`` as a Python int in ``[lo, hi]`` (``lo=None``: down to int64's minimum)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"[{op}] {name} must be an integer, got {type(value).__name__} "
                        f"{value!r}")
    v = int(value)
    lo = INT64_MIN if lo is None else lo
    if lo <= v <= hi:
        return v
    kind = OverflowError if not INT64_MIN <= v <= INT64_MAX else ValueError
    raise kind(f"[{op}] {name} must be an integer in [{lo}, {hi}], got {v}")


def real(value, name: str, op: str, lo: float = -math.inf, hi: float = math.inf,
         lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a finite Python float in the interval (``lo_open``/``hi_open``: excluded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"[{op}] {name} must be a real number, got {type(value).__name__} "
                        f"{value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"[{op}] {name} must be finite, got {v}")
    if (v < lo or (lo_open and v == lo)) or (v > hi or (hi_open and v == hi)):
        raise ValueError(f"[{op}] {name} must be in {'(' if lo_open else '['}{lo}, {hi}"
                         f"{')' if hi_open else ']'}, got {v}")
    return v
