"""dsv3: the DeepSeek-V3 architecture as a C++ engine for CPU research.

Public surface (semantics §3): ``Config``, ``Model``, ``Tokenizer``, ``Trainer``, ``TrainConfig``, ``data``,
``ops``, ``fp8``, ``build_info``, ``get_num_threads``,
``set_num_threads``. The compiled core lives in the private ``dsv3._core``.
"""
from __future__ import annotations

from typing import Any, Dict

from ._blas import load_core

_core = load_core()
from . import fp8
from . import ops
from .config import Config
from .ops import KVCache
from .model import Model
from .generate import GenerationOutput
from . import data
from .tokenizer import Tokenizer
from .train import TrainConfig, Trainer
from . import distributed

__version__ = "0.1.0"

__all__ = ["Config", "KVCache", "Model", "GenerationOutput", "Tokenizer", "Trainer",
           "TrainConfig", "data",
           "ops", "fp8", "build_info", "get_num_threads",
           "set_num_threads", "__version__"]


def build_info() -> Dict[str, Any]:
    """How the engine was built and how it runs: compiler; BLAS: ``blas_source`` (system |
    pypi), ``blas_library`` (linked), ``blas_loaded`` (the file in use), ``blas_variant``
    (openmp | pthreads | serial) and ``blas_threads`` (how dsv3 calls it); ``num_threads`` and
    ``threads_default`` (where the default came from), ``spin_us`` (the pool's wait policy) and
    ``spin_budget_us`` (the spin in effect now: 0 when the threads outnumber the CPUs the
    affinity mask or a fractional cgroup quota allows); the SIMD level the CPU gives the hot loops;
    ``mpi``: the MPI library dsv3.distributed uses ("" when built without MPI)."""
    info = dict(_core.build_info())
    info["version"] = __version__
    return info


def get_num_threads() -> int:
    """Threads used by dsv3's parallel loops and by BLAS."""
    return _core.get_num_threads()


def set_num_threads(n: int) -> None:
    """Set the thread count of dsv3's parallel loops and of BLAS together (process-wide)."""
    from ._args import integer
    _core.set_num_threads(integer(n, "n", "set_num_threads", lo=1))
