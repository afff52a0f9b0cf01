"""python -m dsv3 info."""
import json
import subprocess
import sys

import numpy as np
import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "dsv3", *args], capture_output=True, text=True,
                          timeout=120)


def test_info_default_is_v3():
    r = run("info")
    assert r.returncode == 0, r.stderr
    assert "671,026,419,200" in r.stdout
    assert "70,272 B" in r.stdout and "4,997,120 B" in r.stdout and "249,856 B" in r.stdout
    assert "OpenBLAS" in r.stdout


def test_info_json_small_and_path(tmp_path, v3_config_path):
    r = run("info", "--config", "small", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["parameters"]["total"] > 5e6 and d["config"]["hidden_size"] == 256
    r = run("info", v3_config_path, "--json")
    assert json.loads(r.stdout)["parameters"]["total"] == 671_026_419_200


def test_info_bad_config():
    r = run("info", "--config", "nonsense")
    assert r.returncode != 0 and "nonsense" in r.stderr


def test_help():
    r = run("--help")
    assert r.returncode == 0 and "info" in r.stdout


def test_info_resident_bytes_on_checkpoint(tmp_path):
    import dsv3
    m = dsv3.Model(dsv3.Config.tiny(), seed=1)
    ck = str(tmp_path / "ck")
    m.save_pretrained(ck, dtype="fp8")
    r = run("info", ck, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    cfg = dsv3.Config.tiny()
    per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert d["kv_cache_bytes_per_token_latent"] == {
        "float32": per_layer * cfg.num_hidden_layers * 4,
        "bfloat16": per_layer * cfg.num_hidden_layers * 2}
    assert d["checkpoint_format"] == "fp8"
    res = d["resident_bytes"]
    # fp8 from an fp8 checkpoint: the linear weights' codes and scales are mapped (kv_b_proj's
    # too: the decode reads them; its float32 copy is anonymous), counted here from the names
    # and shapes (not from the loader)
    shapes = m.parameter_shapes()
    fp8_bytes = sum(s[0] * s[1] + 4 * -(-s[0] // 128) * -(-s[1] // 128)
                    for n, s in shapes.items() if len(s) == 2 and (".self_attn." in n or ".mlp."
                    in n) and not n.endswith("mlp.gate.weight"))
    bf16_bytes = sum(2 * s[0] * s[1] for n, s in shapes.items()
                     if n.endswith(("embed_tokens.weight", "lm_head.weight", "eh_proj.weight")))
    assert res["fp8"]["mapped"] == fp8_bytes + bf16_bytes
    small = sum(4 * int(np.prod(s)) for n, s in shapes.items() if len(s) == 1 or
                n.endswith(("mlp.gate.weight", "kv_b_proj.weight")))
    assert res["fp8"]["anonymous"] == small
    assert res["fp32"]["mapped"] == 0 and res["fp32"]["anonymous"] == 4 * sum(
        int(np.prod(s)) for s in shapes.values())
    assert all(isinstance(v["fits"], bool) for v in res.values())
    r = run("info", ck)
    assert r.returncode == 0, r.stderr
    assert "Resident weights" in r.stdout and "(own format)" in r.stdout
    assert "MLA latent cache per token" in r.stdout


def test_info_preset_resident_bytes():
    r = run("info", "--config", "deepseek_v2_lite", "--json")
    d = json.loads(r.stdout)
    assert d["checkpoint_format"] is None
    res = d["resident_bytes"]
    assert res["fp8"]["total"] < res["bf16"]["total"] < res["fp32"]["total"]
    assert d["kv_cache_bytes_per_token_latent"]["bfloat16"] == (512 + 64) * 27 * 2


def test_generate_weights_flag():
    r = run("generate", "--help")
    assert r.returncode == 0 and "--weights" in r.stdout and "auto" in r.stdout
    r = run("generate", "/nonexistent", "--weights", "int4")
    assert r.returncode == 2 and "--weights" in r.stderr


def test_generate_fp8_checkpoint_runs_resident_by_default(tmp_path):
    import dsv3
    m = dsv3.Model(dsv3.Config.tiny(), seed=4)
    ck = str(tmp_path / "ck")
    m.save_pretrained(ck, dtype="fp8")
    args = ("generate", ck, "--prompt-ids", "3,4,5", "--max-new-tokens", "6",
            "--eos-token-id", "-1", "--no-stats")
    want = {w: " ".join(map(str, dsv3.Model.from_pretrained(ck, weights=w).generate(
        np.array([3, 4, 5]), max_new_tokens=6).tokens)) for w in ("fp8", "fp32")}
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == want["fp8"]
    assert dsv3.Model.from_pretrained(ck, weights="auto").weight_format(
        "model.layers.0.self_attn.q_b_proj.weight") == "fp8"
    r = run(*args, "--weights", "fp32")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == want["fp32"]
