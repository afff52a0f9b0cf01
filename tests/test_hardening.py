"""Hostile arguments (issue family of docs: bad input raises, never crashes or misleads)."""
import subprocess
import sys

import numpy as np
import pytest

import dsv3


def test_uint64_ids_do_not_crash():
    # ensure() returned a null array for uint64 (numpy refuses the "unsafe" cast): SIGSEGV
    code = ("import numpy as np, dsv3; m = dsv3.Model(dsv3.Config.tiny()); "
            "a = m.forward(np.arange(5, dtype=np.uint64)); b = m.forward(np.arange(5)); "
            "assert np.array_equal(a, b); "
            "dsv3.ops.embedding(np.arange(5, dtype=np.uint64), np.ones((10, 4), np.float32))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    with pytest.raises(IndexError, match="out of range"):
        dsv3.ops.embedding(np.array([2 ** 64 - 1], np.uint64), np.ones((10, 4), np.float32))


@pytest.mark.parametrize("field,value", [("lr", float("inf")), ("lr", float("nan")),
                                         ("grad_clip", -1.0), ("grad_clip", float("nan")),
                                         ("weight_decay", float("inf")), ("eps", float("inf"))])
def test_trainconfig_refuses_nonfinite_and_negative(field, value):
    with pytest.raises(ValueError, match=field):
        dsv3.TrainConfig(**{field: value})


def test_eos_token_id_must_be_an_integer():
    m = dsv3.Model(dsv3.Config.tiny())
    with pytest.raises(TypeError, match="eos_token_id"):
        m.generate(np.arange(3), max_new_tokens=2, eos_token_id=18.5)


@pytest.mark.parametrize("block", [(1.5, 2), (True, 2), (1,), "ab"])
def test_fp8_block_must_be_two_ints(block):
    with pytest.raises(ValueError, match="block"):
        dsv3.fp8.quantize(np.ones((2, 4), np.float32), block=block)


def test_fp8_block_beyond_int64_is_the_whole_tensor():
    x = np.arange(8, dtype=np.float32).reshape(2, 4) + 1
    c, s = dsv3.fp8.quantize(x, block=(1, 2 ** 64))
    c2, s2 = dsv3.fp8.quantize(x, block=(1, 4))
    assert np.array_equal(c, c2) and np.array_equal(s, s2)


# ---------------------------------------------------------------- the memory budget (_memory)
from dsv3 import _memory  # noqa: E402
from conftest import child_env  # noqa: E402


def _cgroup_tree(tmp, lines, files):
    (tmp / "cgroup").write_text(lines)
    for rel, text in files.items():
        p = tmp / "fs" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return dict(root=str(tmp / "fs"), proc_cgroup=str(tmp / "cgroup"))


def test_cgroup_v2_limit_min_over_ancestors(tmp_path):
    kw = _cgroup_tree(tmp_path, "0::/a/b\n", {
        "a/memory.max": "1000000\n", "a/memory.current": "100000\n",
        "a/b/memory.max": "max\n", "a/b/memory.current": "5\n"})
    have, why = _memory.cgroup_limit(**kw)
    assert have == 900000 and "memory.max" in why


def test_cgroup_v1_limit_and_unlimited(tmp_path):
    kw = _cgroup_tree(tmp_path, "4:memory:/x\n3:cpu:/\n", {
        "memory/x/memory.limit_in_bytes": "3000\n", "memory/x/memory.usage_in_bytes": "1000\n",
        "memory/memory.limit_in_bytes": "9223372036854771712\n"})
    assert _memory.cgroup_limit(**kw)[0] == 2000
    kw = _cgroup_tree(tmp_path, "4:memory:/\n", {})
    assert _memory.cgroup_limit(**kw) is None


def _under_rlimit(code, extra_bytes):
    """Run code in a child whose RLIMIT_AS is what it maps at start plus extra_bytes."""
    pre = ("import resource, dsv3, numpy as np\n"
           "vm = int([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmSize')][0]) * 1024\n"
           f"resource.setrlimit(resource.RLIMIT_AS, (vm + {extra_bytes}, resource.RLIM_INFINITY))\n")
    return subprocess.run([sys.executable, "-c", pre + code], capture_output=True, text=True,
                          timeout=120, env=child_env(OMP_NUM_THREADS="1"))


def test_model_refused_under_address_space_limit():
    # 6.4 GB of weights under 2 GiB of address space: refused up front (it used to compare
    # with the machine's RAM only and then die in the allocator)
    r = _under_rlimit("try:\n    dsv3.Model(dsv3.Config.tiny().replace(vocab_size=2**24))\n"
                      "except MemoryError as e:\n    print(e)\n", 2 << 30)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("[Model] the config's fp32 weights needs") and "RLIMIT_AS" in r.stdout


def test_trainer_counts_its_optimizer_state():
    # 400 MB of weights fit in 1.5 GiB; the moments + gradients (another ~1.3 GB) do not
    r = _under_rlimit("m = dsv3.Model(dsv3.Config.tiny().replace(vocab_size=2**20))\n"
                      "try:\n    dsv3.Trainer(m)\nexcept MemoryError as e:\n    print(e)\n",
                      3 << 29)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("[Trainer] the optimizer state"), r.stdout


@pytest.fixture
def budget(monkeypatch):
    monkeypatch.setattr(_memory, "available", lambda: (1 << 30, "a test budget"))


@pytest.mark.parametrize("call", [
    lambda m: m.new_cache(batch=2**15, max_len=2**10),
    lambda m: m.new_mtp_cache(batch=2**15, max_len=2**10),
    lambda m: m.forward(np.zeros((2**16, 255), np.int64)),
    lambda m: m.loss(np.zeros((2**15, 255), np.int64)),
    lambda m: m.loss_and_grad(np.zeros((2**13, 255), np.int64)),
    lambda m: dsv3.Trainer(m, dsv3.TrainConfig(schedule="constant")).step(np.zeros((2**13, 255), np.int64)),
    lambda m: dsv3.ops.embedding_backward(np.ones((2, 4), np.float32), np.arange(2), 2**40),
    lambda m: dsv3.ops.expert_load(np.arange(4), 2**40),
    lambda m: dsv3.ops.rope_table(2**40),
    lambda m: dsv3.ops.init_moe_params(m.config.replace(n_routed_experts=2**14, n_group=1, topk_group=1,
                                                        moe_intermediate_size=2**10)),
])
def test_sizes_refused_before_allocating(budget, call):
    m = dsv3.Model(dsv3.Config.tiny())
    with pytest.raises(MemoryError, match=r"^\[[\w.]+\] .* needs \d+ bytes .* available"):
        call(m)


def test_generate_cache_within_budget_is_sized_by_max_position(budget):
    # generate's cache is capped by max_position_embeddings: a huge max_new_tokens still runs
    m = dsv3.Model(dsv3.Config.tiny())
    assert len(m.generate(np.arange(3), max_new_tokens=10**12).tokens) >= 1


@pytest.mark.parametrize("kind", ["forward", "grad"])
def test_activation_estimate_is_an_upper_bound_within_2x(kind):
    # peak resident growth of the call vs the estimate (an upper bound within ~2x). VmHWM, not
    # ru_maxrss: Linux keeps ru_maxrss across fork + exec, so it would start at pytest's size
    code = (
        "import numpy as np, dsv3\nfrom dsv3 import _memory\n"
        "hwm = lambda: _memory._proc_kb('/proc/self/status', 'VmHWM')\n"
        "m = dsv3.Model(dsv3.Config.small()); t = np.zeros((8, 257), np.int64)\n"
        "need = []; _memory.require = lambda op, what, n: need.append(n)\n"
        "base = hwm()\n"
        f"m.{'forward' if kind == 'forward' else 'loss_and_grad'}(t)\n"
        "peak = hwm()\n"
        "print(need[0] / (peak - base))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env=child_env(OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert 1.0 <= float(r.stdout) <= 2.0, r.stdout
