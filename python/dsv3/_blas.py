"""Loading the compiled core with its OpenBLAS.

A build against PyPI's OpenBLAS (scipy-openblas32, CMakeLists.txt DSV3_BLAS) finds the library
through its run path when dsv3 and scipy-openblas32 share a site-packages directory. When they
do not (e.g. one in the user site, one in the system's), importing scipy_openblas32 loads the
library into the process by its soname first, and the core then links against it.
"""
from __future__ import annotations

import importlib


def load_core():
    try:
        return importlib.import_module("dsv3._core")
    except ImportError as e:
        if "libscipy_openblas" not in str(e):
            raise
        try:
            import scipy_openblas32  # noqa: F401  (loads libscipy_openblas.so globally)
        except ImportError:
            raise ImportError(f"{e}: dsv3 was built against PyPI's OpenBLAS; "
                              "pip install scipy-openblas32") from e
        return importlib.import_module("dsv3._core")
