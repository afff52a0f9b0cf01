"""A dsv3 built without MPI (CMake found none, or -DDSV3_MPI=OFF; .ci/run builds one): single-
process training is unchanged and dsv3.distributed says how to get the parallel training.
Skipped in a build with MPI (tests/test_distributed.py covers that one)."""
import numpy as np
import pytest

import dsv3

pytestmark = pytest.mark.skipif(dsv3.distributed.available(),
                                reason="this dsv3 was built with MPI")


def test_init_explains_how_to_get_mpi():
    assert dsv3.build_info()["mpi"] == ""  # no MPI library named
    with pytest.raises(RuntimeError, match="built without MPI: install an MPI"):
        dsv3.distributed.init("dp=2")


def test_single_process_training_needs_no_mpi():
    cfg = dsv3.Config.tiny()
    t = dsv3.Trainer(dsv3.Model(cfg, seed=0),
                     dsv3.TrainConfig(batch_size=2, seq_len=8, warmup_steps=0,
                                      schedule="constant"))
    st = t.step(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)))
    assert np.isfinite(st["loss"]) and "time_split" not in st
