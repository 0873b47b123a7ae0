"""llama.cpp's whole-model GGUF mixtures Q4_K_M, Q5_K_M and Q6_K: which tensor gets which type.

A pure transcription of `llama_tensor_get_type` in llama.cpp's src/llama-quant.cpp (the version
llama-cpp-python 0.3.36 ships), for these three file types and dense models without an
importance matrix or user overrides:

  * Only tensors of 2 or more dimensions whose name ends in "weight" are quantized; norms,
    biases and the other names llama.cpp skips (position embeddings, ...) keep their type.
  * The output matrix, and the token embedding when it doubles as the output (no
    `output.weight`: tied embeddings), get Q6_K, or Q8_0 when their rows are not a multiple of
    the default type's block (256).
  * attn_v (and every attn_v-like tensor: fused attn_qkv, attn_kv_b) and ffn_down get Q6_K in
    the layers `use_more_bits` picks, in Q4_K_M and Q5_K_M: the first and last eighth of the
    layers and every third one between. (This version tests attn_v-like tensors before its
    attn_qkv branch, so a fused attn_qkv follows the attn_v rule.)
  * Everything else gets the default type (Q4_K, Q5_K, Q6_K).
  * Finally, a k-quant whose row length is not a multiple of 256 falls back to a legacy type:
    Q2_K, Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; F16 if even that block of 32
    does not divide the row. SmolLM2's hidden size 576 sends every matrix with 576-long rows
    down this path.
The layer counters run over the tensors in llama.cpp's order (by layer, then name), as its
quantizer visits them. Not covered: MoE (n_expert > 1), Falcon, 70B special cases, imatrix.

Names are GGUF's (`blk.N.attn_q.weight`, `token_embd.weight`, ...); `gguf_name` maps Hugging
Face module or parameter names of Llama-style and GPT-2 models to them. Shapes are given in
`nn.Linear` orientation (rows, row length), so GGUF's ne[0] is the last dimension.
"""

from __future__ import annotations

import re
from typing import Literal, Mapping, Sequence

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..spec import SpecError

Mixture = Literal["Q4_K_M", "Q5_K_M", "Q6_K"]
DEFAULT_TYPE = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}  # llama_ftype_get_default_type

# tensor_type_fallback: the type used when a row is not a whole number of blocks
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# substrings of names llama.cpp never quantizes (tensor_allows_quantization)
_NOT_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight", "time_mix_first.weight",
    "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight",
    "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
_NOT_QUANTIZED_EXACT = ("position_embd.weight", "token_types.weight")

# tensor_get_category: the first match wins, in this order
_CATEGORIES = (
    ("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"),
)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    return next((cat for key, cat in _CATEGORIES if key in name), "other")


def _block(t: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[t]][0]


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits: first and last eighth, every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def quantizable(name: str, shape: Sequence[int]) -> bool:
    """tensor_allows_quantization: 2-D or more (ggml_n_dims, trailing ones of ne ignored), a
    name ending in "weight", and none of the names llama.cpp keeps as they are."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:  # ggml_n_dims ignores trailing ne of 1: leading here
        dims.pop(0)
    return (
        len(dims) >= 2 and name.endswith("weight") and name not in _NOT_QUANTIZED_EXACT
        and not any(s in name for s in _NOT_QUANTIZED)
    )


def _fallback(name: str, ncols: int, t: str) -> str:
    if ncols % _block(t) == 0:
        return t
    if t not in FALLBACK:
        raise SpecError(f"{name}: rows of {ncols} do not fit {t} and llama.cpp defines no fallback for {t}")
    t = FALLBACK[t]
    return t if ncols % _block(t) == 0 else "F16"


def tensor_types(
    mixture: Mixture, tensors: Mapping[str, Sequence[int]], n_layers: int | None = None, source_type: str = "F32"
) -> dict[str, str]:
    """The ggml type llama.cpp's `mixture` gives each tensor: {GGUF name: type name}.

    `tensors` maps GGUF names to shapes in nn.Linear orientation; `n_layers` is the model's
    block count (default: one more than the largest blk.N). Tensors llama.cpp does not quantize
    keep `source_type`, the type they have in the input file (norms are F32 in converted files).
    """
    if mixture not in DEFAULT_TYPE:
        raise SpecError(f"unknown GGUF mixture {mixture!r}; choose one of {', '.join(DEFAULT_TYPE)}")
    default = DEFAULT_TYPE[mixture]
    layers = [_layer(n) for n in tensors]
    n_layers = n_layers if n_layers is not None else max(layers, default=-1) + 1
    order = sorted(tensors, key=lambda n: (_layer(n), n))  # llama.cpp's weight_name_comparer
    tied = "output.weight" not in tensors
    n_attn_v = sum(_category(n) == "attn_v" for n in tensors)
    i_attn_v = i_ffn_down = 0
    out: dict[str, str] = {}
    for name in order:
        shape = tuple(tensors[name])
        if not quantizable(name, shape):
            out[name] = source_type
            continue
        cat, ncols, t = _category(name), shape[-1], default
        if cat == "output" or (tied and cat == "token_embd"):
            t = "Q8_0" if ncols % _block(default) else "Q6_K"
        elif cat == "attn_v":
            if mixture in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_attn_v, n_attn_v):
                t = "Q6_K"
            i_attn_v += 1
        elif cat == "ffn_down":
            if mixture in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_ffn_down, n_layers):
                t = "Q6_K"
            i_ffn_down += 1
        out[name] = _fallback(name, ncols, t)
    return {n: out[n] for n in tensors}


# Hugging Face names -> GGUF names (llama.cpp's convert_hf_to_gguf tensor map, for the two
# families quantbench loads). Keys match module names with the parameter suffix removed.
_HF_BLOCKS = (
    (r"model\.layers\.(\d+)\.self_attn\.q_proj", "attn_q"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj", "attn_k"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj", "attn_v"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj", "attn_output"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj", "ffn_gate"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj", "ffn_up"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj", "ffn_down"),
    (r"model\.layers\.(\d+)\.input_layernorm", "attn_norm"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm", "ffn_norm"),
    (r"transformer\.h\.(\d+)\.attn\.c_attn", "attn_qkv"),
    (r"transformer\.h\.(\d+)\.attn\.c_proj", "attn_output"),
    (r"transformer\.h\.(\d+)\.mlp\.c_fc", "ffn_up"),
    (r"transformer\.h\.(\d+)\.mlp\.c_proj", "ffn_down"),
    (r"transformer\.h\.(\d+)\.ln_1", "attn_norm"),
    (r"transformer\.h\.(\d+)\.ln_2", "ffn_norm"),
)
_HF_GLOBAL = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm",
}


def gguf_name(hf_name: str) -> str | None:
    """`model.layers.3.mlp.down_proj(.weight)` -> `blk.3.ffn_down.weight`; None if unknown."""
    base, suffix = hf_name, "weight"
    for s in (".weight", ".bias"):
        if hf_name.endswith(s):
            base, suffix = hf_name[: -len(s)], s[1:]
    if base in _HF_GLOBAL:
        return f"{_HF_GLOBAL[base]}.{suffix}"
    for pattern, short in _HF_BLOCKS:
        m = re.fullmatch(pattern, base)
        if m:
            return f"blk.{m.group(1)}.{short}.{suffix}"
    return None


def hf_tensor_types(
    mixture: Mixture, tensors: Mapping[str, Sequence[int]], tied_embeddings: bool, n_layers: int | None = None
) -> dict[str, str]:
    """`tensor_types` for a Hugging Face model: {HF name: type}, shapes in nn.Linear orientation
    (transpose GPT-2's Conv1D weights). With tied embeddings llama.cpp's converter writes no
    output matrix; the lm_head then shares token_embd's type, as it shares its weight."""
    names = {}
    for hf in tensors:
        g = gguf_name(hf)
        if g is None:
            raise SpecError(f"no GGUF name known for {hf!r}: only Llama-style and GPT-2 names are mapped")
        names[hf] = g
    gg = {g: tensors[hf] for hf, g in names.items() if not (tied_embeddings and g == "output.weight")}
    types = tensor_types(mixture, gg, n_layers)
    return {hf: types["token_embd.weight" if g == "output.weight" and tied_embeddings else g] for hf, g in names.items()}
