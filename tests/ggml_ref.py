"""libggml, the byte-exact reference for every ggml type, through ctypes.

llama-cpp-python ships libggml; `ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row,
imatrix)` with imatrix=NULL runs llama.cpp's reference quantizers (`quantize_row_*_ref`), the
same code `llama-quantize` uses without an importance matrix. Tests that need it call
`require_ggml()`, which skips with the reason when llama-cpp-python is not installed.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import numpy as np
import pytest


@functools.cache
def _lib() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    libdir = Path(spec.origin).parent / "lib"
    for name in ("libggml-base.so", "libggml.so", "libggml-base.dylib", "libggml.dylib"):
        path = libdir / name
        if path.exists():
            lib = ctypes.CDLL(str(path))
            if hasattr(lib, "ggml_quantize_chunk"):
                lib.ggml_quantize_chunk.restype = ctypes.c_size_t
                lib.ggml_quantize_chunk.argtypes = [
                    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                    ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                ]
                lib.ggml_row_size.restype = ctypes.c_size_t
                lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
                return lib
    return None


def available() -> bool:
    return _lib() is not None


def require_ggml() -> ctypes.CDLL:
    lib = _lib()
    if lib is None:
        pytest.skip("llama-cpp-python (which ships libggml) is not installed")
    return lib


def quantize_chunk(w: np.ndarray, ggml_type: int) -> np.ndarray:
    """Quantize a (rows, n) float32 array with libggml on one thread: (rows, bytes_per_row) uint8."""
    lib = require_ggml()
    src = np.ascontiguousarray(w, dtype=np.float32)
    rows, n = src.shape
    row_bytes = lib.ggml_row_size(int(ggml_type), n)
    dst = np.empty((rows, row_bytes), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(int(ggml_type), src.ctypes.data, dst.ctypes.data, 0, rows, n, None)
    assert written == dst.nbytes, (written, dst.nbytes)
    return dst
