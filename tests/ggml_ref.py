"""llama.cpp as a reference, through llama-cpp-python: libggml's quantizers and the type choices
of its whole-model quantizer.

llama-cpp-python ships libggml; `ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row,
imatrix)` with imatrix=NULL runs llama.cpp's reference quantizers (`quantize_row_*_ref`), the
same code `llama-quantize` uses without an importance matrix. Tests that need it call
`require_ggml()`, which skips with the reason when llama-cpp-python is not installed.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import re
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


_LLAMA_FTYPES = {"Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K"}
_DRY_RUN_LINE = re.compile(
    r"\[\s*\d+/\s*\d+\]\s+(?P<name>\S+)\s+- \[(?P<ne>[^\]]*)\], type =\s*(?P<cur>\S+), size =[^\n]*?(?:\((?P<new>\S+)\))?\n"
)


def llama_quantize_types(path: str | Path, mixture: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """What llama.cpp's quantizer would make of a GGUF file: {name: (shape, type)}.

    Runs `llama_model_quantize` with `dry_run` (types are chosen, nothing is written) and reads
    its log, which prints every tensor with its ne and, when the type changes, the new one.
    Shapes are returned in nn.Linear orientation (ne reversed, trailing ones of ne dropped).
    """
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    import llama_cpp

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode(errors="replace"))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _LLAMA_FTYPES[mixture])
    params.allow_requantize = True
    params.dry_run = True
    params.nthread = 1
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(path).encode(), b"unused-dry-run.gguf", ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(llama_cpp.llama_log_callback(), ctypes.c_void_p(0))  # NULL: back to stderr
    text = "".join(lines)
    assert rc == 0, text[-2000:]
    out = {}
    for m in _DRY_RUN_LINE.finditer(text):
        ne = [int(v) for v in m["ne"].split(",")]
        while len(ne) > 1 and ne[-1] == 1:
            ne.pop()
        out[m["name"]] = (tuple(reversed(ne)), (m["new"] or m["cur"]).upper())
    return out


class _GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def read_gguf(path: str | Path) -> dict[str, tuple[int, np.ndarray]]:
    """{tensor name: (ggml type, its bytes)} of a GGUF file, read by libggml's own parser (fast:
    gguf-py's reader spends seconds on tokenizer metadata). The bytes are a read-only memmap."""
    lib = require_ggml()
    if not hasattr(lib, "_gguf_ready"):
        lib.gguf_init_from_file.restype = ctypes.c_void_p
        lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GGUFInitParams]
        for name, res in (("gguf_get_n_tensors", ctypes.c_int64), ("gguf_get_data_offset", ctypes.c_size_t)):
            getattr(lib, name).restype, getattr(lib, name).argtypes = res, [ctypes.c_void_p]
        for name, res in (("gguf_get_tensor_name", ctypes.c_char_p), ("gguf_get_tensor_type", ctypes.c_int),
                          ("gguf_get_tensor_offset", ctypes.c_size_t), ("gguf_get_tensor_size", ctypes.c_size_t)):
            getattr(lib, name).restype, getattr(lib, name).argtypes = res, [ctypes.c_void_p, ctypes.c_int64]
        lib.gguf_free.argtypes = [ctypes.c_void_p]
        lib._gguf_ready = True
    ctx = lib.gguf_init_from_file(str(path).encode(), _GGUFInitParams(True, None))
    assert ctx, f"libggml cannot read {path}"
    try:
        base = lib.gguf_get_data_offset(ctx)
        data = np.memmap(path, dtype=np.uint8, mode="r")
        out = {}
        for i in range(lib.gguf_get_n_tensors(ctx)):
            start = base + lib.gguf_get_tensor_offset(ctx, i)
            out[lib.gguf_get_tensor_name(ctx, i).decode()] = (
                lib.gguf_get_tensor_type(ctx, i), data[start : start + lib.gguf_get_tensor_size(ctx, i)]
            )
        return out
    finally:
        lib.gguf_free(ctx)


def llama_quantize_file(src: str | Path, dst: str | Path, mixture: str, nthread: int = 2) -> None:
    """Run llama.cpp's quantizer for real (requantizing a quantized source is allowed)."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _LLAMA_FTYPES[mixture])
    params.allow_requantize = True
    params.nthread = nthread
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed for {mixture}"
