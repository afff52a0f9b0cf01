"""python -m dsv3 info."""
import json
import subprocess
import sys

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
