"""Architectures the GGUF export knows: hyperparameters as llama.cpp reads them, row layouts.

One registered entry per transformers `model_type`: the llama.cpp architecture it becomes, a
function writing its hyperparameters (the keys llama.cpp's loader reads for that architecture,
src/llama-model.cpp), and, where the layouts differ, the row permutation a tensor needs.

Rotary layout (Llama): Hugging Face Llama checkpoints order each head's query/key rows as two
halves (rotate_half), llama.cpp as interleaved pairs. convert_hf_to_gguf.py permutes the rows of
q_proj and k_proj on the way to GGUF (`LlamaModel.permute`), and transformers' GGUF loader
undoes it on load; `rope_row_order` is that permutation. It moves whole rows only, so it applies
to a row of ggml blocks exactly as to a row of floats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from gguf import MODEL_ARCH, GGUFWriter, RopeScalingType


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
