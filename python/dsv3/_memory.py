"""The memory budget: what dsv3 may still allocate, and the up-front refusals of sizes above it.

Every entry point that allocates in proportion to its arguments (a model's weights, a
trainer's optimizer state, a decoding cache, the activations of a forward / loss / training
step, the arrays of the ops that size their output from an argument) estimates its bytes from
the config and the shapes with exact integer arithmetic, and calls :func:`require` before the
C++ allocates anything. Above the budget it raises :class:`MemoryBudgetError` (a MemoryError
and a ValueError), ``"[op] <what> needs N bytes (x GiB), M available (y GiB: <limit>)"``,
instead of failing halfway (std::bad_alloc) or being killed by the kernel. Calls under
UNCHECKED bytes are not checked.

The budget (:func:`available`) is the smallest of the limits that apply to this process:

* the physical memory available (``MemAvailable`` of /proc/meminfo, else all of it);
* ``RLIMIT_AS`` minus the address space the process already maps (``VmSize``);
* the cgroup's ``memory.max - memory.current`` (v2, over the process's cgroup and its
  ancestors) or ``memory.limit_in_bytes - memory.usage_in_bytes`` (v1).

The estimates are upper bounds within about 2x of what the C++ really allocates (tested
against the peak resident size in tests/test_hardening_files.py), so a refusal means the call
could not have fit, and everything that fits is run.
"""
from __future__ import annotations

import os
import resource
from typing import List, Optional, Tuple

INT64_MAX = 2**63 - 1
CGROUP_ROOT = "/sys/fs/cgroup"


# ---------------------------------------------------------------------- the budget
def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _proc_kb(path: str, key: str) -> Optional[int]:
    """``key:  N kB`` of a /proc status-style file, in bytes."""
    text = _read(path) or ""
    for line in text.splitlines():
        if line.startswith(key + ":"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
    return None


def _ram() -> Optional[Tuple[int, str]]:
    avail = _proc_kb("/proc/meminfo", "MemAvailable")
    if avail is not None:
        return avail, "physical memory available"
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "physical memory"
    except (ValueError, OSError, AttributeError):
        return None


def _address_space() -> Optional[Tuple[int, str]]:
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft == resource.RLIM_INFINITY:
        return None
    mapped = _proc_kb("/proc/self/status", "VmSize") or 0
    return max(0, soft - mapped), f"RLIMIT_AS {soft} minus {mapped} mapped"


def _number(text: Optional[str]) -> Optional[int]:
    text = (text or "").strip()
    return int(text) if text.isdigit() else None


def cgroup_limit(root: str = CGROUP_ROOT, proc_cgroup: str = "/proc/self/cgroup"
                 ) -> Optional[Tuple[int, str]]:
    """The memory the process's cgroup may still use: min over the cgroup and its ancestors
    of v2 ``memory.max - memory.current``, or v1 ``memory.limit_in_bytes -
    memory.usage_in_bytes``; None without a limit. ``root`` / ``proc_cgroup``: for tests."""
    best: Optional[Tuple[int, str]] = None
    for line in (_read(proc_cgroup) or "").splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and controllers == "":  # v2 unified hierarchy
            base, files = root, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):  # v1 memory controller
            base, files = os.path.join(root, "memory"), ("memory.limit_in_bytes",
                                                         "memory.usage_in_bytes")
        else:
            continue
        parts = [p for p in path.strip().split("/") if p]
        for depth in range(len(parts), -1, -1):
            d = os.path.join(base, *parts[:depth])
            limit = _number(_read(os.path.join(d, files[0])))  # "max": None
            if limit is None or limit >= INT64_MAX // 2:  # v1 "unlimited" is ~2**63
                continue
            used = _number(_read(os.path.join(d, files[1]))) or 0
            have = max(0, limit - used)
            if best is None or have < best[0]:
                best = have, f"cgroup {files[0]} {limit} minus {used} in use"
    return best


def available() -> Optional[Tuple[int, str]]:
    """(bytes this process may still allocate, which limit decides it), or None when no limit
    is known (then nothing is refused)."""
    limits = [x for x in (_ram(), _address_space(), cgroup_limit()) if x is not None]
    return min(limits) if limits else None


class MemoryBudgetError(MemoryError, ValueError):
    """A size refused before allocating because it does not fit :func:`available`: a
    MemoryError (what it prevents), and a ValueError (the argument or config asked for it)."""


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


# Below this a call does not consult the limits: reading them (/proc, cgroup files) releases
# the GIL and costs more than such a call risks, and a training step that paused there would
# lose the race for the model against a forward loop in another thread.
UNCHECKED = 256 << 20


def require(op: str, what: str, need: int) -> None:
    """:class:`MemoryBudgetError` naming ``op`` and ``what`` when ``need`` bytes exceed the
    budget (or int64)."""
    if need <= UNCHECKED:
        return
    have = available()
    if need > INT64_MAX:
        raise MemoryBudgetError(f"[{op}] {what} needs {need} bytes, beyond int64 (and any memory)")
    if have is not None and need > have[0]:
        raise MemoryBudgetError(f"[{op}] {what} needs {need} bytes ({_gib(need)}), {have[0]} "
                          f"available ({_gib(have[0])}: {have[1]})")


# ---------------------------------------------------------------------- estimates
def _ints(*xs) -> Optional[List[int]]:
    """The arguments as Python ints, or None when one is not an integer >= 0 (then the
    estimate is skipped: the argument checks of the call itself refuse it)."""
    import numpy as np
    out = []
    for x in xs:
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 0:
            return None
        out.append(int(x))
    return out


def model(config, ep: int = 1) -> None:
    """A model's fp32 weights (one slab of every parameter, MTP modules included; an expert
    shard of ``ep`` holds only its routed experts)."""
    require("Model", "the config's fp32 weights", 4 * config.num_parameters(mtp=True, ep=ep))


def trainer(config, bf16_moments: bool, ep: int = 1) -> None:
    """What a Trainer adds to its model: two AdamW moments (fp32 or bf16), the gradient slab
    (allocated by the first step, then kept) and one mode byte per parameter (of the shard
    when ``ep > 1``)."""
    n = config.num_parameters(mtp=True, ep=ep)
    require("Trainer", "the optimizer state (2 moments + gradients)",
            n * ((4 if bf16_moments else 8) + 4 + 1))


def cache(op: str, config, batch, max_len, mtp: bool = False, dtype: str = "float32") -> None:
    """A decoding cache: fp32 (or bf16) rows per token of every main layer (``mtp``: of every
    MTP module)."""
    v = _ints(batch, max_len)
    L = config.num_hidden_layers
    if v is None or L <= 0:
        return
    per_layer = config.kv_cache_bytes_per_token(dtype) // L
    require(op, f"a cache of batch {v[0]} x max_len {v[1]}",
            v[0] * v[1] * per_layer * (config.num_nextn_predict_layers if mtp else L))


def _block_floats(c, T: int, backward: bool) -> int:
    """Floats per token row that one block keeps (norms, attention, FFN; loss.cpp's
    BlockActs), plus its largest transients (the routed rows of the MoE workspace)."""
    D, H = c.hidden_size, c.num_attention_heads
    dn, dr, dv = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    if c.attention_type == "mla":
        attn = (2 * (c.q_lora_rank or 0) + H * (dn + dr) + 2 * c.kv_lora_rank + dr
                + H * (dn + dv) + 16 + H * dv + H + 2 + (c.kv_lora_rank + dr))
    else:
        kvh = c.kv_heads
        attn = H * (dn + dr) + kvh * (dn + dr + dv) + H * dv + H
    if backward and H * T <= 8192:  # kept attention probabilities (attention.h's policy)
        attn += H * (T // 2 + 17)
    K, F, E = c.num_experts_per_tok, c.moe_intermediate_size, c.n_routed_experts
    moe = (K + E + 2 * K * F + 2 * c.n_shared_experts * F + 6 * K + K * D) if E else 0
    dense = 3 * c.intermediate_size
    return 3 * D + 2 + attn + max(moe, dense)


def _rows(tokens, micro: int = 1) -> Optional[Tuple[int, int]]:
    """(B, N) of a token array (1-D: one sequence), B divided into ``micro`` micro-batches;
    None for anything else (the call's own checks refuse it)."""
    shape = getattr(tokens, "shape", None)
    if not isinstance(shape, tuple) or len(shape) not in (1, 2):
        return None
    B, N = (1,) + shape if len(shape) == 1 else shape
    return -(-B // max(1, micro)), N


def activations(op: str, config, tokens, kind: str = "forward", micro: int = 1) -> None:
    """The activations of a call on ``tokens`` (B, N). ``kind`` "forward": one block's
    activations at a time and the logits; "loss" (N-1 targets per sequence): every block's
    activations, the hidden states between blocks, the main and MTP heads' logits; "grad":
    the loss plus the logits' gradient and one block's backward transients. ``micro``: the
    batch runs in that many micro-batches (a training step's grad_accum)."""
    v = _rows(tokens, micro)
    if v is None:
        return
    c = config
    B, T = v[0], v[1] - (kind != "forward")
    D, V, R = c.hidden_size, c.vocab_size, B * max(T, 0)
    block = _block_floats(c, T, kind == "grad")
    if kind == "forward":
        per_row = 4 * D + 2 * block + V  # the block's transients are about its saved size
    else:
        blocks = c.num_hidden_layers + c.num_nextn_predict_layers
        heads = 1 + c.num_nextn_predict_layers
        per_row = blocks * (block + D) + heads * (V + 4 + 6 * D)
        if kind == "grad":
            per_row += V + block + 4 * D
    require(op, f"the activations of {B} x {T} tokens", 4 * R * per_row)


def array(op: str, what: str, count, itemsize: int, rows_of=None) -> None:
    """An output array of ``count`` elements (rows of ``rows_of``'s last dimension when
    given) of ``itemsize`` bytes."""
    v = _ints(count)
    if v is None:
        return
    shape = getattr(rows_of, "shape", None)
    width = shape[-1] if isinstance(shape, tuple) and shape else 1
    require(op, f"{what} = {v[0]}", v[0] * width * itemsize)


def parameters(op: str, shapes) -> None:
    """float32 parameter arrays of these shapes, each drawn through a float64 temporary."""
    sizes = [_prod(s) for s in shapes]
    require(op, f"{len(sizes)} parameter arrays", 4 * sum(sizes) + 8 * max(sizes, default=0))


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
