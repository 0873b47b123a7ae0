"""Importance matrices for llama.cpp's quantizer: read from a file, or measured on calibration.

An importance matrix gives, for each weight matrix, one number per input column: the mean of
the squared activation entering that column (llama.cpp PR #4861, `llama-imatrix`). The
quantizer weighs each weight's rounding error by it. llama.cpp's quantizer takes it as an array
of {tensor name, values} (`llama_model_imatrix_data`, ended by a null name).

Files, both as llama.cpp's `llama-quantize` reads them:
  * GGUF (current `llama-imatrix` output): tensors `<name>.in_sum2` (sum of squares per column)
    and `<name>.counts` (activations seen, one per expert); values = in_sum2 / count, 1.0
    where the count is 0 (tools/quantize/quantize.cpp);
  * the legacy binary `.dat`: int32 n_entries, then per entry int32 name length, the name,
    int32 ncall, int32 nval, nval float32 sums; values = sums / ncall.

`from_calibration` measures the same statistic with forward hooks on the torch reference over
quantbench's calibration tokens, so `llamacpp:type=Q4_K_M,imatrix=calib` uses the very tokens
every other calibrated method sees.
"""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..layers import Conv1D

Imatrix = dict[str, np.ndarray]  # GGUF tensor name -> (in_features,) float32


class ImatrixError(ValueError):
    pass


def _load_gguf(path: Path) -> Imatrix:
    from gguf import GGUFReader

    r = GGUFReader(path)
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in r.tensors}
    out: Imatrix = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name.removesuffix(".in_sum2")
        counts = tensors.get(base + ".counts")
        if counts is None:
            raise ImatrixError(f"{path}: {name} has no matching {base}.counts")
        sums = sums.reshape(counts.size, -1)  # (experts, columns)
        safe = np.where(counts.reshape(-1, 1) > 0, counts.reshape(-1, 1), 1.0)
        out[base] = np.where(counts.reshape(-1, 1) > 0, sums / safe, 1.0).reshape(-1).astype(np.float32)
    return out


def _load_dat(path: Path) -> Imatrix:
    data = path.read_bytes()
    out: Imatrix = {}
    try:
        (n,), at = struct.unpack_from("<i", data, 0), 4
        for _ in range(n):
            (length,) = struct.unpack_from("<i", data, at)
            name = data[at + 4 : at + 4 + length].decode()
            at += 4 + length
            ncall, nval = struct.unpack_from("<ii", data, at)
            at += 8
            sums = np.frombuffer(data, dtype="<f4", count=nval, offset=at).astype(np.float32)
            at += 4 * nval
            out[name] = sums / ncall if ncall > 0 else sums
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ImatrixError(f"{path} is neither a GGUF nor a legacy .dat importance matrix ({e})") from e
    return out


def load_imatrix(path: str | Path) -> Imatrix:
    p = Path(path)
    if not p.is_file():
        raise ImatrixError(f"importance matrix {str(p)!r} does not exist")
    with open(p, "rb") as f:
        magic = f.read(4)
    data = _load_gguf(p) if magic == b"GGUF" else _load_dat(p)
    if not data:
        raise ImatrixError(f"{p} holds no importance-matrix entries")
    for name, v in data.items():
        if not np.isfinite(v).all():
            raise ImatrixError(f"{p}: entry {name} holds non-finite values")
    return data


@torch.inference_mode()
def from_calibration(model: nn.Module, input_ids: torch.Tensor, names: dict[str, str]) -> Imatrix:
    """Mean squared input activation per column of each linear layer named in `names`
    (torch module name -> GGUF tensor name), over (N, L) calibration sequences."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, in_features)
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return fn

    for mod_name, mod in model.named_modules():
        if mod_name in names and isinstance(mod, (nn.Linear, Conv1D)):
            hooks.append(mod.register_forward_pre_hook(hook(mod_name)))
    try:
        device = next(model.parameters()).device
        for row in input_ids:
            model(input_ids=row[None].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {names[m]: (s / counts[m]).cpu().numpy().astype(np.float32) for m, s in sums.items()}


def as_c_array(data: Imatrix):
    """The null-terminated `llama_model_imatrix_data` array llama_model_quantize reads, and the
    buffers it points into (keep both alive during the call)."""
    import llama_cpp

    keep = [(name.encode(), np.ascontiguousarray(v, dtype=np.float32)) for name, v in sorted(data.items())]
    arr = (llama_cpp.llama_model_imatrix_data * (len(keep) + 1))()
    for i, (name, v) in enumerate(keep):
        arr[i].name = name
        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = v.size
    arr[len(keep)].name = None
    return arr, keep
