"""Write a model quantbench can load as a GGUF file that llama.cpp loads and runs.

The file is written with gguf-py's `GGUFWriter` (llama.cpp's own Python writer), tensor by
tensor, so a model is never held twice in memory. What goes in:

  * metadata: the architecture's hyperparameters as llama.cpp's loader reads them (context
    length, widths, heads, norm epsilon, rope base and dimension, vocabulary size), the file
    type, and the tokenizer (`gguf_tokenizer`);
  * tensors, named by gguf-py's `TensorNameMap` (the table convert_hf_to_gguf.py uses):
      - float weights at `outtype` (F32, F16 or BF16); 1-D tensors (norms, biases) stay F32,
        as convert_hf_to_gguf.py keeps them;
      - a `QLinear` whose QTensor holds ggml blocks (the `gguf` format: `blocks`, a (rows,
        bytes_per_row) uint8 tensor, and `ggml_type`) is written as those bytes with that type,
        unchanged: llama.cpp then runs exactly the weights quantbench made;
      - a `QLinear` of any other format is written dequantized, at `outtype`;
      - `tensor_types` may name a ggml type for any float tensor (GGUF name -> "Q8_0", "Q6_K",
        "F16", ...): it is then quantized on the way out by quantbench's `gguf` format, which is
        byte-exact with libggml. This is how a whole llama.cpp mixture such as Q4_K_M, token
        embedding included, is written from quantbench's own quantizers (`gguf_mix`);
      - GPT-2's `Conv1D` weights are written in `nn.Linear` orientation (out, in).

Llama's query/key rows are permuted to llama.cpp's rotary layout on the way out, as
convert_hf_to_gguf.py does (`gguf_arch`).

Architectures: Llama (and models transformers loads as `llama`, e.g. SmolLM2) and GPT-2. Any
other is refused with the list, rather than written into a file llama.cpp cannot run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    get_tensor_name_map,
)
from torch import nn

from ..layers import Conv1D, QLinear
from .gguf_arch import ARCHS, Arch, GGUFExportError  # noqa: F401  (GGUFExportError: re-exported)
from .gguf_tokenizer import write_tokenizer

OutType = Literal["f32", "f16", "bf16"]
OUT_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16}


@dataclass
class _Tensor:
    """One tensor of the file: known in full before its data is produced."""

    name: str  # GGUF name
    module: str  # the torch module it came from
    shape: tuple[int, ...]  # numpy shape of the data as written
    np_dtype: np.dtype
    nbytes: int
    ggml_type: GGMLQuantizationType
    data: Callable[[], np.ndarray]


def _float_tensor(t: torch.Tensor, ggml_type: GGMLQuantizationType, order: torch.Tensor | None) -> Callable[[], np.ndarray]:
    def data() -> np.ndarray:
        x = t.detach()
        if order is not None:
            x = x[order.to(x.device)]
        if ggml_type == GGMLQuantizationType.F32:
            return x.to(torch.float32).cpu().contiguous().numpy()
        if ggml_type == GGMLQuantizationType.F16:
            return x.to(torch.float16).cpu().contiguous().numpy()
        return x.to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy()  # raw BF16 bits

    return data


def _plan(model: nn.Module, arch: Arch, outtype: OutType, types: dict[str, str]) -> list[_Tensor]:
    cfg = model.config
    names = get_tensor_name_map(arch.gguf_arch, cfg.num_hidden_layers if hasattr(cfg, "num_hidden_layers") else cfg.n_layer)
    seen: set[int] = set()  # storages already written: a tied output head shares the embedding's
    plan: list[_Tensor] = []
    for mod_name, mod in model.named_modules():
        items: list[tuple[str, Any]] = list(mod.named_parameters(recurse=False))
        if isinstance(mod, QLinear):
            items.insert(0, ("weight", mod.qtensor))
        for pname, t in items:
            full = f"{mod_name}.{pname}" if mod_name else pname
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key in seen:
                    continue
                seen.add(key)
                if isinstance(mod, Conv1D) and pname == "weight":
                    t = t.t()  # Conv1D stores (in, out); GGUF wants nn.Linear's (out, in)
            gname = names.get_name(full, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise GGUFExportError(f"tensor {full!r} has no GGUF name for llama.cpp's {MODEL_ARCH_NAMES[arch.gguf_arch]}")
            order = arch.row_order(gname, cfg)
            plan.append(_entry(gname, mod_name, t, types.get(gname, outtype.upper()), order))
    unknown = set(types) - {e.name for e in plan}
    if unknown:
        raise GGUFExportError(f"tensor_types names tensors the model does not have: {', '.join(sorted(unknown)[:5])}")
    return plan


def _entry(gname: str, module: str, t: Any, type_name: str, order: torch.Tensor | None) -> _Tensor:
    """How tensor `t` (a float tensor or a QTensor) is written under GGUF name `gname`."""
    blocks = getattr(t, "blocks", None)
    if blocks is not None and hasattr(t, "ggml_type"):  # ggml blocks: written as they are
        b = blocks.detach()
        qtype = GGMLQuantizationType(int(t.ggml_type))
        if type_name.upper() not in (qtype.name, "F32", "F16", "BF16"):  # an explicit, different type
            raise GGUFExportError(f"{gname} holds {qtype.name} blocks; it cannot be written as {type_name}")

        def raw() -> np.ndarray:
            return (b[order.to(b.device)] if order is not None else b).cpu().contiguous().numpy()

        return _Tensor(gname, module, tuple(b.shape), np.dtype(np.uint8), b.numel(), qtype, raw)
    if not isinstance(t, torch.Tensor):
        t = t.dequantize()  # a QTensor of another format: its float weights
    try:
        qtype = GGMLQuantizationType[type_name.upper()]
    except KeyError:
        raise GGUFExportError(f"{gname}: {type_name!r} is not a ggml type") from None
    if t.dim() < 2:  # norms and biases: F32, as llama.cpp keeps them
        if type_name.upper() not in ("F32", "F16", "BF16"):
            raise GGUFExportError(f"{gname} is 1-D; llama.cpp keeps 1-D tensors in float, not {type_name}")
        qtype = GGMLQuantizationType.F32
    if qtype in FLOAT_NP:
        np_dtype = FLOAT_NP[qtype]
        return _Tensor(gname, module, tuple(t.shape), np_dtype, t.numel() * np_dtype.itemsize, qtype, _float_tensor(t, qtype, order))
    return _quantized_entry(gname, module, t, qtype, order)


FLOAT_NP = {
    GGMLQuantizationType.F32: np.dtype(np.float32),
    GGMLQuantizationType.F16: np.dtype(np.float16),
    GGMLQuantizationType.BF16: np.dtype(np.int16),  # raw bf16 bits
}


def _quantized_entry(gname: str, module: str, t: torch.Tensor, qtype: GGMLQuantizationType, order) -> _Tensor:
    """A float tensor quantized on the way out by quantbench's `gguf` format."""
    from ..formats import formats, quantize_tensor

    if "gguf" not in formats():
        raise GGUFExportError(f"writing {gname} as {qtype.name} needs quantbench's gguf format, which is not installed")
    block, size = GGML_QUANT_SIZES[qtype]
    rows, cols = t.shape
    if cols % block:
        raise GGUFExportError(f"{gname}: rows of {cols} are not a whole number of {qtype.name} blocks ({block})")

    def data() -> np.ndarray:
        x = t.detach() if order is None else t.detach()[order.to(t.device)]
        return quantize_tensor(x.float(), f"gguf:{qtype.name}").blocks.cpu().contiguous().numpy()

    return _Tensor(gname, module, (rows, cols // block * size), np.dtype(np.uint8), rows * cols // block * size, qtype, data)


def get_arch(model: nn.Module) -> Arch:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHS:
        raise GGUFExportError(
            f"cannot write architecture {model_type!r} as GGUF: quantbench exports {', '.join(sorted(ARCHS))} "
            "(the architectures llama.cpp runs that quantbench has a tensor map for)"
        )
    return ARCHS[model_type]


def _file_type(plan: list[_Tensor], outtype: OutType) -> LlamaFileType:
    quantized = {e.ggml_type for e in plan} - {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
    return LlamaFileType.GUESSED if quantized else OUT_TYPES[outtype]


def write_gguf(
    model: nn.Module,
    tokenizer: Any,
    path: str | os.PathLike[str],
    outtype: OutType = "f32",
    source_gguf: str | None = None,
    name: str | None = None,
    tensor_types: dict[str, str] | None = None,
) -> dict[str, str]:
    """Write `model` (a transformers causal LM, possibly with QLinear layers) to `path`.

    `source_gguf`: the GGUF file the model was loaded from, whose tokenizer is copied.
    `tensor_types`: GGUF tensor name -> ggml type name for float tensors (default: `outtype`).
    Returns GGUF tensor name -> torch module name. The file appears only when complete.
    """
    if outtype not in OUT_TYPES:
        raise GGUFExportError(f"outtype {outtype!r} is not valid; choose one of {', '.join(OUT_TYPES)}")
    arch = get_arch(model)
    plan = _plan(model, arch, outtype, dict(tensor_types or {}))
    emb = model.get_input_embeddings().weight
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = GGUFWriter(tmp, MODEL_ARCH_NAMES[arch.gguf_arch])
    try:
        writer.add_name(name or getattr(model.config, "name_or_path", "") or "quantbench export")
        arch.hparams(writer, model.config)
        writer.add_file_type(int(_file_type(plan, outtype)))
        writer.add_quantization_version(GGML_QUANT_VERSION)
        write_tokenizer(writer, tokenizer, emb.shape[0], source_gguf)
        for e in plan:
            writer.add_tensor_info(e.name, e.shape, e.np_dtype, e.nbytes, raw_dtype=e.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for e in plan:
            writer.write_tensor_data(e.data())
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return {e.name: e.module for e in plan}


def export_reference(ref: Any, path: str | os.PathLike[str], outtype: OutType = "f32") -> dict[str, str]:
    """Write a loaded `Reference` (its model and tokenizer; a GGUF source's own tokenizer)."""
    return write_gguf(ref.model, ref.tokenizer, path, outtype, source_gguf=ref.info.gguf_file, name=ref.info.source)
