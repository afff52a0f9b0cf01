"""dsv3.distributed: data- and expert-parallel training over MPI.

Run the same script (or ``python -m dsv3 train``) on every rank under ``mpirun``::

    mpirun -np 4 python -m dsv3 train --config small --parallel dp=2,ep=2 ...

    par = dsv3.distributed.init("dp=2,ep=2")      # from the MPI environment
    trainer = dsv3.Trainer(model, cfg, parallel=par)

Layout (``dp * ep`` must equal the number of processes W): every rank trains on its own
``1/W`` of the GLOBAL batch (``TrainConfig.batch_size`` keeps its single-process meaning, so
the same command with and without mpirun trains the same model). Gradients, losses and the
expert loads are summed over the world inside the C++ step (GIL released) before clipping,
AdamW and the aux-loss-free bias update, so the replicas stay bit-identical. With ``ep > 1``
the ``ep`` consecutive ranks of a replica group share the routed experts: rank ``e`` of the
group computes experts ``[e*E/ep, (e+1)*E/ep)`` for the tokens of the whole group (all-to-all
dispatch and combine, optionally with FP8 dispatch of the activations). When ``ep`` divides
``n_group``, whole expert groups live on one rank and group-limited routing bounds the ranks a
token visits by ``topk_group``. Rank ``e`` also HOLDS only those experts (weights, gradients,
AdamW moments: the Trainer makes its model an expert shard); their gradients are summed over
the ``dp`` ranks holding the same experts, everything else over the world. Rank 0 writes logs
and checkpoints, which are ordinary single-process checkpoints (the EP group's experts are
gathered for it).

A rank whose C++ step fails before its backward (data parallel) makes every rank raise (it its
own error, the others RuntimeError) with nothing applied; later failures, failures with
``ep > 1`` and uncaught exceptions abort the job (``MPI_Abort``) instead of leaving the others
waiting in a collective; a rank that dies is detected by ``mpirun``, which ends the others.
"""
from __future__ import annotations

import sys
from typing import Dict, Optional, Tuple

import numpy as np

from . import _core

__all__ = ["Parallel", "init", "available", "parse_layout"]


def available() -> bool:
    """True when this dsv3 was built with MPI."""
    return bool(_core.mpi_available())


def parse_layout(layout: Optional[str], world: int) -> Tuple[int, int]:
    """``"dp=2,ep=2"`` -> (2, 2); a missing part is inferred from ``world`` (``"ep=2"`` on 4
    processes is dp=2); ``None`` / ``""`` is dp=world, ep=1. Raises ValueError when dp*ep is
    not the number of processes."""
    text = (layout or "").replace(" ", "")
    dp, ep = _core.parse_parallel_layout(text)
    has_dp, has_ep = "dp=" in text, "ep=" in text
    if not has_dp:
        if world % ep:
            raise ValueError(f"[parallel] ep={ep} does not divide the number of processes "
                             f"({world})")
        dp = world // ep
    if dp * ep != world:
        raise ValueError(f"[parallel] dp*ep = {dp}*{ep} = {dp * ep} must equal the number of "
                         f"processes ({world}); start with mpirun -np {dp * ep}"
                         + (" or change --parallel" if has_ep or has_dp else ""))
    return dp, ep


class Parallel:
    """The parallel layout of this process (see the module docstring). Build with :func:`init`."""

    def __init__(self, groups, fp8_dispatch: bool):
        self._g = groups
        self.fp8_dispatch = bool(fp8_dispatch)

    rank = property(lambda self: int(self._g.rank))
    size = property(lambda self: int(self._g.size))
    dp = property(lambda self: int(self._g.dp))
    ep = property(lambda self: int(self._g.ep))
    is_main = property(lambda self: self._g.rank == 0)
    ep_index = property(lambda self: int(self._g.ep_index))

    @property
    def expert_shard(self):
        """(ep, ep_index): the routed experts this rank holds (None with ep = 1)."""
        return (self.ep, self.ep_index) if self.ep > 1 else None

    def barrier(self) -> None:
        self._g.barrier()

    def allreduce_sum(self, x: np.ndarray) -> np.ndarray:
        """In-place world sum of a float64 / float32 / int64 array (identical on every rank)."""
        self._g.allreduce_sum(x)
        return x

    def local_rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of ``batch_size`` sequences."""
        n = batch_size // self.size
        return slice(self.rank * n, (self.rank + 1) * n)

    def check_batch(self, batch_size: int, grad_accum: int, who: str) -> None:
        if batch_size % (self.size * grad_accum):
            raise ValueError(f"[{who}] the global batch ({batch_size} sequences) must be divisible "
                             f"by processes x grad_accum = {self.size} x {grad_accum}")

    def stats(self) -> Dict[str, float]:
        """This rank's communication statistics since init: all-reduce and all-to-all bytes
        sent and seconds spent in them."""
        return dict(self._g.stats())

    def __repr__(self) -> str:
        return (f"Parallel(rank={self.rank}/{self.size}, dp={self.dp}, ep={self.ep}, "
                f"fp8_dispatch={self.fp8_dispatch})")


_installed_hook = False


def _abort_on_uncaught() -> None:
    """An uncaught exception on one rank aborts the whole job (the others may be waiting for
    it in a collective and would hang)."""
    global _installed_hook
    if _installed_hook:
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        sys.stderr.flush()
        _core.mpi_abort(1)

    sys.excepthook = hook
    _installed_hook = True


def init(layout: Optional[str] = None, fp8_dispatch: bool = False) -> Parallel:
    """Initialise MPI (if needed) and the groups of ``layout`` (``"dp=2,ep=2"``; default: pure
    data parallel over all processes). Raises RuntimeError when dsv3 was built without MPI,
    ValueError for a layout that does not fit the number of processes."""
    if not available():
        raise RuntimeError("[dsv3.distributed] this dsv3 was built without MPI: install an MPI "
                           "(e.g. apt-get install libopenmpi-dev openmpi-bin) and reinstall dsv3 "
                           "(pip install .)")
    world = int(_core.mpi_world_size())
    dp, ep = parse_layout(layout, world)
    par = Parallel(_core.ParallelGroups(dp, ep), fp8_dispatch)
    if par.size > 1:
        _abort_on_uncaught()
    return par
