"""Fuzz targets for the checkpoint reader and the config loader (atheris, coverage-guided).

    python tests/fuzz/fuzz_checkpoint.py safetensors [-max_total_time=60] [corpus_dir ...]
    python tests/fuzz/fuzz_checkpoint.py config ...

Contract under test: any byte string either loads or raises ValueError/TypeError/KeyError/
IndexError/FileNotFoundError with a message; never another exception, a crash or a hang.
The seed corpus is made from real files (see make_seeds); crashes found become regression
tests in tests/test_fuzz_regressions.py.
"""
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ALLOWED = (ValueError, TypeError, KeyError, IndexError, FileNotFoundError)


def make_seeds(directory):
    """Real files: a tiny model's safetensors (f32, bf16, fp8) and configs."""
    import dsv3
    from dsv3 import checkpoint, safetensors_io as st
    os.makedirs(directory, exist_ok=True)
    m = dsv3.Model(dsv3.Config.tiny().replace(num_hidden_layers=1, first_k_dense_replace=0,
                                              num_nextn_predict_layers=0), seed=0)
    sd = m.state_dict()
    for dt in ("float32", "bfloat16", "fp8"):
        path = os.path.join(directory, f"seed-{dt}.safetensors")
        st.write(path, checkpoint.encode_state({k: sd[k] for k in list(sd)[:6]}, dt))
    for name in ("tiny", "small", "deepseek_v3", "deepseek_v2_lite"):
        with open(os.path.join(directory, f"seed-{name}.json"), "w") as f:
            f.write(getattr(dsv3.Config, name)().to_json())


def target_safetensors(data: bytes):
    from dsv3 import safetensors_io as st
    with tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False) as f:
        f.write(data)
        path = f.name
    try:
        tensors, _ = st.read(path)
        for t in tensors.values():  # touch every byte the header claims
            np.asarray(t.data).sum()
            if t.dtype in ("F32", "BF16", "F16"):
                t.to_float32()
    except ALLOWED:
        pass
    finally:
        os.remove(path)


def target_config(data: bytes):
    import dsv3
    try:
        d = json.loads(data.decode("utf-8", errors="replace"))
        cfg = dsv3.Config.from_dict(d)
        cfg.num_parameters(active=True, mtp=True)
        cfg.kv_cache_bytes_per_token()
        cfg.softmax_scale
        dsv3.Config.from_dict(json.loads(cfg.to_json()))
    except ALLOWED + (json.JSONDecodeError, RecursionError):
        pass


TARGETS = {"safetensors": target_safetensors, "config": target_config}


def main():
    import atheris
    which = sys.argv.pop(1)
    seeds = os.path.join(tempfile.gettempdir(), "dsv3-fuzz-seeds")
    if not os.path.isdir(seeds):  # in a child, so that dsv3 is first imported instrumented
        import subprocess
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r}); "
                        f"import fuzz_checkpoint as f; f.make_seeds({seeds!r})"], check=True)
    with atheris.instrument_imports():
        import dsv3  # noqa: F401
        from dsv3 import safetensors_io, config  # noqa: F401
    ext = ".safetensors" if which == "safetensors" else ".json"
    corpus = os.path.join(tempfile.gettempdir(), f"dsv3-fuzz-{which}")
    os.makedirs(corpus, exist_ok=True)
    for f in os.listdir(seeds):
        if f.endswith(ext):
            with open(os.path.join(seeds, f), "rb") as src, open(os.path.join(corpus, f), "wb") as dst:
                dst.write(src.read())
    atheris.Setup(sys.argv + [corpus], TARGETS[which])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
