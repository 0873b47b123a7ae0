"""llama.cpp's whole-model GGUF mixtures as a method: ``gguf-mix:Q4_K_M`` (also Q5_K_M, Q6_K).

Every tensor of a copy of the reference gets the type llama.cpp's quantizer would give it
(`formats.gguf_mix.hf_tensor_types`, a transcription of `llama_tensor_get_type`), and is
quantized by our byte-exact GGUF codecs (`formats.gguf`):

  * every linear layer becomes a QLinear holding a GGUFQTensor of its type;
  * the token embedding becomes a QEmbedding of its type (llama.cpp quantizes token_embd too);
  * with tied embeddings (no output matrix, as llama.cpp's converter writes SmolLM2) the output
    head becomes a TiedQLinear that multiplies by the embedding's QTensor: stored and counted
    once, as in the GGUF file;
  * tensors the recipe leaves in float stay as they are in the reference: norms, biases,
    position embeddings (F32 in llama.cpp's file), and matrices whose rows fit no block of 32,
    which llama.cpp stores as F16 but which we keep in the reference dtype (no F16 format here).

So the weight bytes are llama.cpp's tensor data plus what the torch model keeps besides (RoPE's
inv_freq buffer), and each quantized tensor holds the very bytes llama.cpp writes for it (up to
the row order of attn_q/attn_k, which llama.cpp's converter permutes for its RoPE layout).
Rounding is the GGUF codecs' (ggml's `nearest_int`, halves to even; `roundf`, halves away from zero,
in Q8_0), stated in `formats.ggml_codec`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..formats import quantize_tensor
from ..formats.gguf_mix import DEFAULT_TYPE, Mixture, hf_tensor_types
from ..layers import Conv1D, QEmbedding, QLinear, TiedQLinear, get_weight, iter_linears, set_module
from ..sources import Calibration, Reference
from ..spec import SpecError, format_config
from . import copy_variant, register_method

FLOAT_TYPES = ("F32", "F16")  # what the recipe leaves unquantized


@dataclass(frozen=True)
class GGUFMixConfig:
    type: Mixture = "Q4_K_M"

    def __post_init__(self) -> None:
        if self.type not in DEFAULT_TYPE:
            raise SpecError(f"gguf-mix: unknown mixture {self.type!r}; choose one of {', '.join(DEFAULT_TYPE)}")


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None) if module is not None else None


def _tensor_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every parameter (a tied one under its first name) in nn.Linear orientation."""
    shapes, seen = {}, set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            transposed = isinstance(module, Conv1D) and pname == "weight"
            shapes[f"{mname}.{pname}" if mname else pname] = tuple(p.shape)[::-1] if transposed else tuple(p.shape)
    return shapes


def mixture_types(model: nn.Module, mixture: str) -> tuple[dict[str, str], bool]:
    """({HF parameter name: ggml type}, tied) for `model` under llama.cpp's `mixture`."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    n_layers = getattr(model.config, "num_hidden_layers", None)
    return hf_tensor_types(mixture, _tensor_shapes(model), tied_embeddings=tied, n_layers=n_layers), tied


def apply_mixture(model: nn.Module, mixture: str, float_spec: str) -> dict[str, str]:
    """Quantize `model` in place to llama.cpp's `mixture`; returns {module name: spec}."""
    types, tied = mixture_types(model, mixture)
    emb_name = _module_name(model, model.get_input_embeddings())
    head_name = _module_name(model, model.get_output_embeddings())
    specs: dict[str, str] = {}
    for name, m in list(iter_linears(model)):
        if tied and name == head_name:
            continue  # computed from the embedding below
        t = types[name + ".weight"]
        if t in FLOAT_TYPES:
            specs[name] = float_spec
            continue
        q = quantize_tensor(get_weight(m), f"gguf:{t}")
        set_module(model, name, QLinear(q, getattr(m, "bias", None)))
        specs[name] = q.config.spec()
    emb = model.get_submodule(emb_name)
    t = types[emb_name + ".weight"]
    if t in FLOAT_TYPES:
        specs[emb_name] = float_spec
        return specs
    qemb = QEmbedding(quantize_tensor(emb.weight, f"gguf:{t}"), getattr(emb, "padding_idx", None))
    set_module(model, emb_name, qemb)
    specs[emb_name] = qemb.qtensor.config.spec()
    if tied:
        set_module(model, head_name, TiedQLinear(qemb))
        specs[head_name] = specs[emb_name]
    return specs


@register_method("gguf-mix")
class GGUFMix:
    config_type = GGUFMixConfig
    description = "llama.cpp's whole-model mixtures (Q4_K_M, Q5_K_M, Q6_K): its type for every tensor, embeddings included"

    @staticmethod
    def build(ref: Reference, cfg: GGUFMixConfig, calib: Calibration | None):
        return copy_variant(ref, format_config(cfg, "gguf-mix"), lambda m: apply_mixture(m, cfg.type, ref.dtype))
