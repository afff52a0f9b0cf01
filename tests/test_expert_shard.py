"""Expert shards (csrc/model/shard.h) in one process: an EP rank's model holds the replicated
weights and only its E/ep routed experts per MoE block, under their global names, with the
same values as the full model of the same seed; it refuses to compute or save on its own and
takes its experts of a full state dict. The parallel behaviour (training, gathering, saving and
loading across world sizes) is in tests/test_distributed.py."""
import re

import numpy as np
import pytest

import dsv3

EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


def split_counts(shapes):
    """(replicated parameters, routed-expert parameters) of {name: shape}."""
    rep = sum(int(np.prod(s)) for n, s in shapes.items() if not EXPERT.search(n))
    ex = sum(int(np.prod(s)) for n, s in shapes.items() if EXPERT.search(n))
    return rep, ex


@pytest.mark.parametrize("ep", [2, 4])
def test_shard_holds_replicated_plus_its_experts(ep):
    cfg = dsv3.Config.tiny()
    E = cfg.n_routed_experts
    full = dsv3.Model(cfg, seed=3)
    rep, ex = split_counts(full.parameter_shapes())
    assert rep + ex == full.num_local_parameters()
    fs = full.state_dict()
    for index in range(ep):
        m = dsv3.Model(cfg, seed=3, expert_shard=(ep, index))
        assert m.expert_shard == (ep, index)
        assert m.num_local_parameters() == rep + ex // ep
        assert m.num_parameters() == full.num_parameters()  # the model's, not this rank's
        owned = {int(EXPERT.search(n).group(1)) for n in m.parameter_shapes() if EXPERT.search(n)}
        assert owned == set(range(index * E // ep, (index + 1) * E // ep))
        s = m.state_dict()
        for n, a in s.items():  # drawn as in the full model: values depend on (seed, name)
            np.testing.assert_array_equal(a, fs[n])
    assert full.expert_shard is None


def test_shard_refuses_to_compute_or_save_alone(tmp_path):
    cfg = dsv3.Config.tiny()
    m = dsv3.Model(cfg, seed=0, expert_shard=(2, 0))
    tokens = np.zeros((1, 8), dtype=np.int64)
    with pytest.raises(ValueError, match="expert-parallel shard"):
        m.forward(tokens)
    with pytest.raises(ValueError, match="expert-parallel shard"):
        m.loss(tokens)
    with pytest.raises(ValueError, match="expert shard"):
        m.save_pretrained(str(tmp_path / "x"))


def test_shard_takes_its_experts_of_a_full_state():
    cfg = dsv3.Config.tiny()
    full = dsv3.Model(cfg, seed=5).state_dict()
    m = dsv3.Model(cfg, seed=0, expert_shard=(2, 1))
    missing, unexpected = m.load_state_dict(full, strict=True)
    assert missing == [] and unexpected == []
    for n, a in m.state_dict().items():
        np.testing.assert_array_equal(a, full[n])
    # its own experts must be there
    del full["model.layers.1.mlp.experts.5.up_proj.weight"]
    with pytest.raises(KeyError, match="experts.5.up_proj"):
        m.load_state_dict(full, strict=True)


def test_bad_expert_shard_arguments():
    cfg = dsv3.Config.tiny()
    with pytest.raises(ValueError, match="ep=3 must divide n_routed_experts"):
        dsv3.Model(cfg, expert_shard=(3, 0))
    with pytest.raises(ValueError, match="index 2 must be < ep=2"):
        dsv3.Model(cfg, expert_shard=(2, 2))
    with pytest.raises(TypeError, match="expert_shard must be a tuple"):
        dsv3.Model(cfg, expert_shard=2)
    with pytest.raises(ValueError, match="expert_shard\\[0\\]"):
        dsv3.Model(cfg, expert_shard=(0, 0))


def test_trainer_without_parallel_refuses_a_shard():
    cfg = dsv3.Config.tiny()
    m = dsv3.Model(cfg, seed=0, expert_shard=(2, 0))
    with pytest.raises(ValueError, match="expert shard .* parallel layout"):
        dsv3.Trainer(m, dsv3.TrainConfig(batch_size=2, seq_len=8))


@pytest.mark.parametrize("ep", [2, 4])
def test_shard_count_and_memory_guards_use_the_shard(ep, monkeypatch):
    from dsv3 import _memory
    cfg = dsv3.Config.small()  # MoE blocks in the main model and the MTP module
    E, h, mi = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    moe_blocks = cfg.num_hidden_layers - cfg.first_k_dense_replace + cfg.num_nextn_predict_layers
    # independent count: every routed expert is gate + up (mi x h) and down (h x mi)
    dropped = moe_blocks * (E - E // ep) * 3 * h * mi
    full = cfg.num_parameters(mtp=True)
    assert cfg.num_parameters(mtp=True, ep=ep) == full - dropped
    m = dsv3.Model(cfg, seed=1, expert_shard=(ep, 0))
    assert m.num_local_parameters() == full - dropped
    # a budget between the shard's weights and the full model's: the shard is built, the full
    # model is refused
    need = []
    monkeypatch.setattr(_memory, "require", lambda op, what, n: need.append((op, n)))
    dsv3.Model(cfg, seed=1, expert_shard=(ep, 1))
    dsv3.Model(cfg, seed=1)
    assert need == [("Model", 4 * (full - dropped)), ("Model", 4 * full)]
    for bad in (3, 0, True, 2.0):
        with pytest.raises(ValueError, match="ep must be a positive divisor"):
            cfg.num_parameters(ep=bad)
    with pytest.raises(ValueError, match="active=True"):
        cfg.num_parameters(active=True, ep=2)


def test_a_model_sharded_behind_its_trainer_is_refused(tmp_path):
    """A Trainer whose model another Trainer has since made an expert shard (what
    Trainer(model, ..., parallel=ep>1) does to the model it is given) refuses every use of its
    moments, which are laid out for the model as it was, instead of stepping on wrong
    offsets."""
    cfg = dsv3.Config.tiny()
    m = dsv3.Model(cfg, seed=0)
    t = dsv3.Trainer(m, dsv3.TrainConfig(batch_size=2, seq_len=8, warmup_steps=0,
                                         schedule="constant"))
    batch = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9))
    t.step(batch)
    m._m.shard_experts(2, 1)  # the second Trainer's doing (dsv3/train.py)
    m._set_info()
    msg = "made an expert shard .* after this Trainer was created"
    with pytest.raises(RuntimeError, match=msg):
        t.step(batch)
    with pytest.raises(RuntimeError, match=msg):
        t.save(str(tmp_path / "ck"))
    with pytest.raises(RuntimeError, match=msg):
        t.save_pretrained(str(tmp_path / "sp"))
    with pytest.raises(RuntimeError, match=msg):
        t.full_state_dict()
    with pytest.raises(RuntimeError, match=msg):
        t._t.moments()
    with pytest.raises(RuntimeError, match=msg):
        t._t.eval_loss(batch, 0.0, 0.0)  # the loss an expert shard's evaluate computes
    assert not (tmp_path / "ck").exists() and not (tmp_path / "sp").exists()
    assert t.step_count == 1


def test_cached_decoding_after_the_model_is_sharded_uses_the_new_slab():
    """Cached decoding keeps every block's weight views from its first call; making the model
    an expert shard afterwards (a new slab) drops them: decoding the sharded model is then
    refused for its missing experts, as on a model sharded before its first decode, instead
    of reading the old slab."""
    cfg = dsv3.Config.tiny()
    m = dsv3.Model(cfg, seed=0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 4))
    before = m.forward(tokens, cache=m.new_cache(1, 8))
    np.testing.assert_array_equal(m.forward(tokens, cache=m.new_cache(1, 8)), before)
    m._m.shard_experts(2, 1)
    m._set_info()
    with pytest.raises(Exception, match="expert-parallel shard"):
        m.forward(tokens, cache=m.new_cache(1, 8))
    fresh = dsv3.Model(cfg, seed=0, expert_shard=(2, 1))
    with pytest.raises(Exception, match="expert-parallel shard"):
        fresh.forward(tokens, cache=fresh.new_cache(1, 8))


def test_cached_decoding_of_a_shard_checks_only_the_blocks_it_runs():
    """A shard whose main layers are all dense decodes with a cache (only an MTP block is
    MoE); the MTP module itself is refused, its experts being elsewhere."""
    cfg = dsv3.Config.tiny()
    cfg.first_k_dense_replace = cfg.num_hidden_layers
    m = dsv3.Model(cfg, seed=0, expert_shard=(2, 1))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 4))
    full = dsv3.Model(cfg, seed=0)
    np.testing.assert_array_equal(m.forward(tokens, cache=m.new_cache(1, 8)),
                                  full.forward(tokens, cache=full.new_cache(1, 8)))
    logits, hidden = m.forward_with_hidden(tokens, m.new_cache(1, 8), 0)
    with pytest.raises(Exception, match="expert-parallel shard"):
        m.mtp_forward(hidden, tokens, m.new_mtp_cache(1, 8), 0)
