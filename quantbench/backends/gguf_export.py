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
      - GPT-2's `Conv1D` weights are written in `nn.Linear` orientation (out, in).

Rotary layout (Llama): Hugging Face Llama checkpoints order each head's query/key rows as two
halves (rotate_half), llama.cpp as interleaved pairs. convert_hf_to_gguf.py permutes the rows
of q_proj and k_proj on the way to GGUF, and transformers' GGUF loader undoes it on load; we
apply the same row permutation on export. It permutes whole rows only, so it applies to a row
of ggml blocks as well as to a row of floats.

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
    GGML_QUANT_VERSION,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
    get_tensor_name_map,
)
from torch import nn

from ..layers import Conv1D, QLinear
from .gguf_tokenizer import write_tokenizer

OutType = Literal["f32", "f16", "bf16"]
OUT_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
}


class GGUFExportError(ValueError):
    """The model cannot be written as a GGUF file llama.cpp would run; the message says why."""


@dataclass(frozen=True)
class Arch:
    """How one transformers architecture maps onto a llama.cpp architecture."""

    gguf_arch: MODEL_ARCH
    hparams: Callable[[GGUFWriter, Any], None]  # (writer, transformers config)
    row_order: Callable[[str, Any], torch.Tensor | None] = lambda name, cfg: None  # GGUF name -> row permutation


ARCHS: dict[str, Arch] = {}


def register_arch(model_type: str, gguf_arch: MODEL_ARCH):
    def deco(cls: type) -> type:
        ARCHS[model_type] = Arch(gguf_arch, cls.hparams, getattr(cls, "row_order", Arch.row_order))
        return cls

    return deco


def rope_row_order(n_rows: int, n_head: int) -> torch.Tensor:
    """Row permutation from Hugging Face's rotary layout to llama.cpp's, per head.

    Each head's rows [x_0 .. x_{d/2-1} | y_0 .. y_{d/2-1}] become [x_0, y_0, x_1, y_1, ...]:
    `w_gguf = w_hf[order]` (convert_hf_to_gguf.py's `LlamaModel.permute`).
    """
    head_dim = n_rows // n_head
    return torch.arange(n_rows).reshape(n_head, 2, head_dim // 2).transpose(1, 2).reshape(-1)


@register_arch("llama", MODEL_ARCH.LLAMA)
class _Llama:
    @staticmethod
    def hparams(w: GGUFWriter, cfg: Any) -> None:
        if cfg.hidden_act != "silu":
            raise GGUFExportError(f"llama with hidden_act={cfg.hidden_act!r}: llama.cpp's llama runs SiLU only")
        rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads or cfg.num_attention_heads)
        w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", None) or 10000.0)))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_rope_dimension_count(head_dim)
        if head_dim != cfg.hidden_size // cfg.num_attention_heads:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_vocab_size(cfg.vocab_size)
        if rope_type == "linear":
            w.add_rope_scaling_type(RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rope["factor"]))
        elif rope_type != "default":
            raise GGUFExportError(f"llama with rope_type={rope_type!r}: quantbench exports default and linear rope only")

    @staticmethod
    def row_order(name: str, cfg: Any) -> torch.Tensor | None:
        heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads or cfg.num_attention_heads}
        kind = name.split(".")[-2]  # blk.N.attn_q.weight -> attn_q
        if kind not in heads:
            return None
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return rope_row_order(heads[kind] * head_dim, heads[kind])


@register_arch("gpt2", MODEL_ARCH.GPT2)
class _GPT2:
    @staticmethod
    def hparams(w: GGUFWriter, cfg: Any) -> None:
        if cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise GGUFExportError(f"gpt2 with activation {cfg.activation_function!r}: llama.cpp's gpt2 runs tanh GELU only")
        if cfg.scale_attn_by_inverse_layer_idx or cfg.reorder_and_upcast_attn:
            raise GGUFExportError("gpt2 with scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn: llama.cpp has neither")
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(float(cfg.layer_norm_epsilon))
        w.add_vocab_size(cfg.vocab_size)


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


def _plan(model: nn.Module, arch: Arch, outtype: OutType) -> list[_Tensor]:
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
            plan.append(_entry(gname, mod_name, t, outtype, order))
    return plan


def _entry(gname: str, module: str, t: Any, outtype: OutType, order: torch.Tensor | None) -> _Tensor:
    blocks = getattr(t, "blocks", None)
    if blocks is not None and hasattr(t, "ggml_type"):  # ggml blocks: written as they are
        b = blocks.detach()

        def data() -> np.ndarray:
            return (b[order.to(b.device)] if order is not None else b).cpu().contiguous().numpy()

        return _Tensor(gname, module, tuple(b.shape), np.dtype(np.uint8), b.numel(), GGMLQuantizationType(int(t.ggml_type)), data)
    if not isinstance(t, torch.Tensor):
        t = t.dequantize()  # a QTensor of another format: its float weights
    ggml_type = OUT_TYPES[outtype][0] if t.dim() >= 2 else GGMLQuantizationType.F32
    size = 4 if ggml_type == GGMLQuantizationType.F32 else 2
    np_dtype = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}.get(ggml_type, np.int16)
    return _Tensor(gname, module, tuple(t.shape), np.dtype(np_dtype), t.numel() * size, ggml_type, _float_tensor(t, ggml_type, order))


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
    return LlamaFileType.GUESSED if quantized else OUT_TYPES[outtype][1]


def write_gguf(
    model: nn.Module,
    tokenizer: Any,
    path: str | os.PathLike[str],
    outtype: OutType = "f32",
    source_gguf: str | None = None,
    name: str | None = None,
) -> dict[str, str]:
    """Write `model` (a transformers causal LM, possibly with QLinear layers) to `path`.

    `source_gguf`: the GGUF file the model was loaded from, whose tokenizer is copied. Returns
    GGUF tensor name -> torch module name. The file appears only when complete.
    """
    if outtype not in OUT_TYPES:
        raise GGUFExportError(f"outtype {outtype!r} is not valid; choose one of {', '.join(OUT_TYPES)}")
    arch = get_arch(model)
    plan = _plan(model, arch, outtype)
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
