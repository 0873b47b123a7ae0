"""GGUF mixtures Q4_K_M, Q5_K_M, Q6_K: the type of every tensor, as llama.cpp's quantizer picks it.

Checked two ways: a table written from reading llama.cpp's llama_tensor_get_type for the
embedded model's shapes, and llama.cpp itself (`llama_model_quantize` in dry-run mode through
llama-cpp-python) on the embedded model's GGUF file and on small synthetic GGUF files.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import ggml_ref
from quantbench.formats.gguf_mix import gguf_name, hf_tensor_types, tensor_types, use_more_bits
from quantbench.spec import SpecError

MIXTURES = ("Q4_K_M", "Q5_K_M", "Q6_K")


def smollm2_tensors() -> dict[str, tuple[int, ...]]:
    """SmolLM2-135M in GGUF names: hidden 576, 9 heads of 64 (3 for k/v), MLP 1536, 30 layers,
    vocab 49152, tied embeddings (no output.weight). Shapes (rows, row length)."""
    t = {"token_embd.weight": (49152, 576), "output_norm.weight": (576,)}
    for i in range(30):
        b = f"blk.{i}."
        t |= {b + "attn_norm.weight": (576,), b + "ffn_norm.weight": (576,),
              b + "attn_q.weight": (576, 576), b + "attn_k.weight": (192, 576), b + "attn_v.weight": (192, 576),
              b + "attn_output.weight": (576, 576), b + "ffn_gate.weight": (1536, 576),
              b + "ffn_up.weight": (1536, 576), b + "ffn_down.weight": (576, 1536)}
    return t


MORE_BITS_30 = [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]  # n/8 = 3, 7n/8 = 26, (i - 3) % 3 == 2


def test_use_more_bits():
    assert [i for i in range(30) if use_more_bits(i, 30)] == MORE_BITS_30
    assert [i for i in range(12) if use_more_bits(i, 12)] == [0, 3, 6, 9, 10, 11]


# Read off llama-quant.cpp for these shapes: rows of 576 are not a multiple of 256, so every
# k-quant on them falls back (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0); the tied token_embd
# takes the output rule (Q8_0 since 576 % 256 != 0); ffn_down rows (1536) keep their k-quant.
EXPECTED = {
    # mixture: (plain 576-row matrices, attn_v in more-bits layers, ffn_down: more bits / other)
    "Q4_K_M": ("Q5_0", "Q8_0", "Q5_0", "Q6_K", "Q4_K"),
    "Q5_K_M": ("Q5_1", "Q8_0", "Q5_1", "Q6_K", "Q5_K"),
    "Q6_K": ("Q8_0", "Q8_0", "Q8_0", "Q6_K", "Q6_K"),
}


@pytest.mark.parametrize("mixture", MIXTURES)
def test_embedded_model_table(mixture):
    plain, v_more, v_other, down_more, down_other = EXPECTED[mixture]
    types = tensor_types(mixture, smollm2_tensors(), n_layers=30)
    assert types["token_embd.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    for i in range(30):
        b, more = f"blk.{i}.", i in MORE_BITS_30
        assert types[b + "attn_norm.weight"] == types[b + "ffn_norm.weight"] == "F32"
        for name in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert types[b + name + ".weight"] == plain, (b, name)
        assert types[b + "attn_v.weight"] == (v_more if more else v_other)
        assert types[b + "ffn_down.weight"] == (down_more if more else down_other)


@pytest.mark.parametrize("mixture", MIXTURES)
def test_embedded_model_matches_llama_cpp(mixture):
    """llama.cpp's own choice for the embedded model's file, tensor by tensor."""
    from quantbench.sources.models import embedded_gguf_path

    theirs = ggml_ref.llama_quantize_types(embedded_gguf_path(), mixture)
    assert set(theirs) == set(smollm2_tensors())
    assert all(shape == smollm2_tensors()[n] for n, (shape, _) in theirs.items())
    ours = tensor_types(mixture, {n: shape for n, (shape, _) in theirs.items()}, n_layers=30)
    assert ours == {n: t for n, (_, t) in theirs.items()}


def _write_gguf(path, arch: str, hparams: dict, tensors: dict[str, tuple[int, ...]]) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in hparams.items():
        getattr(w, f"add_{key}")(value)
    w.add_file_type(0)
    for name, shape in tensors.items():
        w.add_tensor(name, np.zeros(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_untied(n_layers: int = 16, hidden: int = 256, ff: int = 272) -> dict[str, tuple[int, ...]]:
    """A Llama with its own output matrix; ffn_down rows of 272 fit no block of 32 (-> F16)."""
    t = {"token_embd.weight": (1000, hidden), "output.weight": (1000, hidden), "output_norm.weight": (hidden,)}
    for i in range(n_layers):
        b = f"blk.{i}."
        t |= {b + "attn_norm.weight": (hidden,), b + "ffn_norm.weight": (hidden,),
              b + "attn_q.weight": (hidden, hidden), b + "attn_k.weight": (64, hidden), b + "attn_v.weight": (64, hidden),
              b + "attn_output.weight": (hidden, hidden), b + "ffn_gate.weight": (ff, hidden),
              b + "ffn_up.weight": (ff, hidden), b + "ffn_down.weight": (hidden, ff)}
    return t


def gpt2(n_layers: int = 12, hidden: int = 256) -> dict[str, tuple[int, ...]]:
    """GPT-2 in GGUF names: fused attn_qkv, biases, position embeddings, tied output."""
    t = {"token_embd.weight": (512, hidden), "position_embd.weight": (128, hidden),
         "output_norm.weight": (hidden,), "output_norm.bias": (hidden,)}
    for i in range(n_layers):
        b = f"blk.{i}."
        for name, shape in (("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_qkv", (3 * hidden, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_up", (4 * hidden, hidden)),
                            ("ffn_down", (hidden, 4 * hidden))):
            t[b + name + ".weight"] = shape
            t[b + name + ".bias"] = shape[:1]
    return t


SYNTHETIC = {
    "llama_untied": ("llama", dict(context_length=128, embedding_length=256, block_count=16, feed_forward_length=272,
                                   head_count=4, head_count_kv=1, layer_norm_rms_eps=1e-5), llama_untied),
    "gpt2": ("gpt2", dict(context_length=128, embedding_length=256, block_count=12, feed_forward_length=1024,
                          head_count=4, layer_norm_eps=1e-5), gpt2),
}


@pytest.mark.parametrize("mixture", MIXTURES)
@pytest.mark.parametrize("model", list(SYNTHETIC))
def test_synthetic_models_match_llama_cpp(model, mixture, tmp_path):
    """Untied output (output.weight gets the output rule, token_embd the default type), rows that
    fit no block (F16), fused attn_qkv (the attn_v rule in this llama.cpp), GPT-2's biases and
    position embeddings (kept)."""
    arch, hparams, make = SYNTHETIC[model]
    tensors = make()
    path = tmp_path / f"{model}.gguf"
    _write_gguf(path, arch, hparams, tensors)
    theirs = ggml_ref.llama_quantize_types(path, mixture)
    assert {n: s for n, (s, _) in theirs.items()} == tensors
    assert tensor_types(mixture, tensors, n_layers=hparams["block_count"]) == {n: t for n, (_, t) in theirs.items()}


def test_synthetic_table():
    """The rules the synthetic files exercise, as read from llama-quant.cpp."""
    t = tensor_types("Q4_K_M", llama_untied(), n_layers=16)
    assert t["output.weight"] == "Q6_K" and t["token_embd.weight"] == "Q4_K"
    assert t["blk.0.ffn_down.weight"] == "F16"  # 272 fits neither Q6_K nor its fallback Q8_0
    assert t["blk.0.attn_v.weight"] == "Q6_K" and t["blk.3.attn_v.weight"] == "Q4_K"
    g = tensor_types("Q5_K_M", gpt2(), n_layers=12)
    assert g["token_embd.weight"] == "Q6_K" and g["position_embd.weight"] == "F32"
    assert [g[f"blk.{i}.attn_qkv.weight"] for i in (0, 1, 3)] == ["Q6_K", "Q5_K", "Q6_K"]
    assert g["blk.0.attn_qkv.bias"] == "F32"


# -- Hugging Face names ---------------------------------------------------------------------

@pytest.mark.parametrize("hf, expected", [
    ("model.layers.7.self_attn.q_proj", "blk.7.attn_q.weight"),
    ("model.layers.7.self_attn.k_proj.weight", "blk.7.attn_k.weight"),
    ("model.layers.7.self_attn.v_proj", "blk.7.attn_v.weight"),
    ("model.layers.7.self_attn.o_proj", "blk.7.attn_output.weight"),
    ("model.layers.12.mlp.gate_proj", "blk.12.ffn_gate.weight"),
    ("model.layers.12.mlp.up_proj", "blk.12.ffn_up.weight"),
    ("model.layers.12.mlp.down_proj.weight", "blk.12.ffn_down.weight"),
    ("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head", "output.weight"),
    ("transformer.h.3.attn.c_attn", "blk.3.attn_qkv.weight"),
    ("transformer.h.3.attn.c_attn.bias", "blk.3.attn_qkv.bias"),
    ("transformer.h.3.attn.c_proj", "blk.3.attn_output.weight"),
    ("transformer.h.3.mlp.c_fc", "blk.3.ffn_up.weight"),
    ("transformer.h.3.mlp.c_proj", "blk.3.ffn_down.weight"),
    ("transformer.wte.weight", "token_embd.weight"),
    ("transformer.wpe.weight", "position_embd.weight"),
    ("model.layers.1.self_attn.rotary_emb.inv_freq", None),
])
def test_gguf_name(hf, expected):
    assert gguf_name(hf) == expected


def _linear_shapes(model) -> dict[str, tuple[int, ...]]:
    """Parameter shapes in nn.Linear orientation (GPT-2's Conv1D weights transposed)."""
    from transformers.pytorch_utils import Conv1D

    shapes = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            shape = tuple(p.shape)
            if isinstance(module, Conv1D) and pname == "weight":
                shape = shape[::-1]
            shapes[f"{mname}.{pname}" if mname else pname] = shape
    return shapes


@pytest.mark.parametrize("mixture", MIXTURES)
def test_hf_llama_names_give_the_embedded_model_types(mixture):
    """SmolLM2's architecture built from its config (on the meta device, no weights): the types
    by HF name equal the GGUF table, and the tied lm_head shares token_embd's type."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    shapes = _linear_shapes(model)
    shapes["lm_head.weight"] = tuple(model.lm_head.weight.shape)
    types = hf_tensor_types(mixture, shapes, tied_embeddings=True, n_layers=30)
    gguf_types = tensor_types(mixture, smollm2_tensors(), n_layers=30)
    for hf, t in types.items():
        assert t == gguf_types["token_embd.weight" if hf == "lm_head.weight" else gguf_name(hf)], hf


def test_hf_gpt2_names():
    from conftest import tiny_gpt2

    model = tiny_gpt2(hidden=256, layers=12)
    types = hf_tensor_types("Q4_K_M", _linear_shapes(model), tied_embeddings=True, n_layers=12)
    ref = tensor_types("Q4_K_M", {**gpt2(12, 256), "token_embd.weight": (256, 256)}, n_layers=12)
    assert types["transformer.h.0.attn.c_attn.weight"] == ref["blk.0.attn_qkv.weight"] == "Q6_K"
    assert types["transformer.h.1.mlp.c_proj.weight"] == ref["blk.1.ffn_down.weight"] == "Q4_K"
    assert types["lm_head.weight"] == types["transformer.wte.weight"] == "Q6_K"
    assert types["transformer.h.1.ln_1.bias"] == "F32"


def test_errors():
    with pytest.raises(SpecError, match="unknown GGUF mixture 'Q4_K_S'; choose one of Q4_K_M, Q5_K_M, Q6_K"):
        tensor_types("Q4_K_S", smollm2_tensors())
    with pytest.raises(SpecError, match="no GGUF name known for 'encoder.block.0.layer.0.weight'"):
        hf_tensor_types("Q4_K_M", {"encoder.block.0.layer.0.weight": (4, 256)}, tied_embeddings=False)
    # a tied output whose rows fit no 32-block: Q8_0 has no fallback in llama.cpp either
    with pytest.raises(SpecError, match="llama.cpp defines no fallback for Q8_0"):
        tensor_types("Q6_K", {"token_embd.weight": (1000, 100)})


@pytest.mark.slow  # llama.cpp quantizes the 135M model, then we do: ~30 s
def test_embedded_model_q4_k_m_same_bytes_as_llama_cpp(tmp_path):
    """End to end: llama.cpp's own Q4_K_M of the embedded model (requantized from its Q4_1 file)
    and ours of the same weights (the file's tensors dequantized as llama.cpp dequantizes them,
    each quantized to the type `tensor_types` gives it) agree on every tensor's type and bytes."""
    from quantbench import quantize_tensor
    from quantbench.sources.models import embedded_gguf_path

    src = ggml_ref.read_gguf(embedded_gguf_path())
    ggml_ref.llama_quantize_file(embedded_gguf_path(), tmp_path / "q4_k_m.gguf", "Q4_K_M")
    theirs = ggml_ref.read_gguf(tmp_path / "q4_k_m.gguf")
    shapes = smollm2_tensors()
    types = tensor_types("Q4_K_M", shapes, n_layers=30)
    assert set(src) == set(theirs) == set(shapes)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, (qtype, data) in src.items():
            their_type, their_bytes = theirs[name]
            assert gguf.GGMLQuantizationType(their_type).name == types[name], name
            if types[name] == "F32":
                assert np.array_equal(their_bytes, data), name
                continue
            w = gguf.quants.dequantize(np.asarray(data).reshape(shapes[name][0], -1), gguf.GGMLQuantizationType(qtype))
            ours = quantize_tensor(torch.from_numpy(w), f"gguf:{types[name]}").blocks.numpy()
            assert np.array_equal(ours.reshape(-1), their_bytes), name
    finally:
        torch.set_num_threads(n)
