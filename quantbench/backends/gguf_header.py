"""What a GGUF file holds, read from its header alone, and whether its tensor data is all there.

gguf-py's `GGUFReader` parses every key into Python objects (49,152 token strings and 48,900
merges for SmolLM2), which leaves some 20 MB of heap behind in the process that measures a
llama.cpp variant's memory. This reader streams the header instead, keeps only what the
variant reports (architecture, vocabulary size, each tensor's type, shape and byte size) and
skips the rest. The layout (GGUF v2/v3, llama.cpp's ggml/docs/gguf.md), little-endian:

    u32 magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x   { string key | u32 value_type | value }          string = u64 length + bytes
                                                              array  = u32 type + u64 count + items
    n_tensors x { string name | u32 n_dims | u64 dims[n_dims] | u32 ggml_type | u64 offset }
    padding to `general.alignment` (32 by default) | tensor data, each at data_start + offset

A tensor's bytes are dims[0] / block * type_size * dims[1] * ... (gguf-py's GGML_QUANT_SIZES).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

# Byte sizes of the fixed-size value types (gguf-py's GGUFValueType numbering).
_SCALAR = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}  # fmt: skip
_MAX_STRING = 1 << 24  # longer "strings" only come from corrupt lengths


class GGUFFileError(ValueError):
    """A GGUF file that cannot be used; the message says why."""


@dataclass(frozen=True)
class GGUFInfo:
    path: str
    architecture: str
    file_bytes: int
    tensor_bytes: int  # the tensors' data as stored: what the weights take
    n_elements: int
    n_vocab: int | None  # entries of tokenizer.ggml.tokens
    tensor_types: dict[str, str] = field(default_factory=dict)  # name -> ggml type, tensors of 2+ dims


class _Stream:
    def __init__(self, f: BinaryIO):
        self.f = f

    def take(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise EOFError("the file ends inside its header")
        return b

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> bytes:
        n = self.u64()
        if n > _MAX_STRING:
            raise ValueError(f"a string of {n} bytes")
        return self.take(n)

    def skip(self, vtype: int) -> None:
        if vtype == GGUFValueType.STRING:
            self.f.seek(self.u64(), os.SEEK_CUR)
        elif vtype == GGUFValueType.ARRAY:
            item, count = self.u32(), self.u64()
            if item in _SCALAR:
                self.f.seek(_SCALAR[GGUFValueType(item)] * count, os.SEEK_CUR)
            else:
                for _ in range(count):
                    self.skip(item)
        elif vtype in _SCALAR:
            self.f.seek(_SCALAR[GGUFValueType(vtype)], os.SEEK_CUR)
        else:
            raise ValueError(f"unknown value type {vtype}")


def inspect_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read a GGUF file's header and check that every tensor's data lies inside the file."""
    p = Path(path)
    if not p.is_file():
        raise GGUFFileError(f"GGUF file {str(p)!r} does not exist")
    size = p.stat().st_size
    with open(p, "rb", buffering=1 << 20) as f:
        if f.read(4) != b"GGUF":
            raise GGUFFileError(f"{p} is not a GGUF file (no GGUF magic)")
        try:
            return _read(_Stream(f), p, size)
        except (EOFError, ValueError, KeyError, struct.error) as e:
            raise GGUFFileError(f"{p} is a corrupt or truncated GGUF file: {e}") from e


def _read(s: _Stream, p: Path, size: int) -> GGUFInfo:
    version = s.u32()
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (llama.cpp reads versions 2 and 3)")
    n_tensors, n_kv = s.u64(), s.u64()
    arch, n_vocab, alignment = "?", None, 32
    for _ in range(n_kv):
        key, vtype = s.string().decode("utf-8", "replace"), s.u32()
        if key == "general.architecture" and vtype == GGUFValueType.STRING:
            arch = s.string().decode("utf-8", "replace")
        elif key == "general.alignment" and vtype == GGUFValueType.UINT32:
            alignment = s.u32()
        elif key == "tokenizer.ggml.tokens" and vtype == GGUFValueType.ARRAY:
            item, n_vocab = s.u32(), s.u64()
            for _ in range(n_vocab):
                s.skip(item)
        else:
            s.skip(vtype)
    types, total, n_elements, end = {}, 0, 0, 0
    for _ in range(n_tensors):
        name = s.string().decode("utf-8", "replace")
        dims = [s.u64() for _ in range(s.u32())]
        code, offset = s.u32(), s.u64()
        if code not in GGMLQuantizationType._value2member_map_:
            raise ValueError(f"tensor {name} has ggml type {code}, which this gguf-py does not know")
        qtype = GGMLQuantizationType(code)
        block, type_size = GGML_QUANT_SIZES[qtype]
        count = 1
        for d in dims:
            count *= d
        nbytes = count // block * type_size
        total, n_elements, end = total + nbytes, n_elements + count, max(end, offset + nbytes)
        if len(dims) >= 2:
            types[name] = qtype.name
    data_start = -(-s.f.tell() // alignment) * alignment
    if data_start + end > size:
        raise ValueError(f"its tensors need {data_start + end} bytes, the file has {size}")
    return GGUFInfo(str(p), arch, size, total, n_elements, n_vocab, types)
