"""Our own GGUF writer for quantbench's gguf QTensors: a model quantbench quantized to Q4_K_M,
written by us, holds the very tensors llama.cpp's quantizer writes for Q4_K_M of the F32 export."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from quantbench.backends.gguf_export import export_reference, write_gguf
from quantbench.layers import QLinear, iter_linears, quantize_layers

from . import needs_llama_cpp

gguf_mix = pytest.importorskip(
    "quantbench.formats.gguf_mix", reason="quantbench's gguf format and mixtures (branch gguf) are not in this checkout"
)
pytestmark = needs_llama_cpp


def quantbench_mixture(model, f32_path: str, names: dict[str, str], mixture: str):
    """The model with every linear layer a QLinear of the gguf format, typed as llama.cpp's
    `mixture` types it, plus the types of the tensors that are not linear layers (embeddings)."""
    shapes = {t.name: tuple(int(d) for d in t.shape[::-1]) for t in GGUFReader(f32_path).tensors}
    types = gguf_mix.tensor_types(mixture, shapes, model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer)
    by_module = {names[g]: t for g, t in types.items() if g.endswith(".weight")}
    q = copy.deepcopy(model)
    linear = [n for n, _ in iter_linears(q) if by_module.get(n, "F32") not in ("F32", "F16")]
    done = quantize_layers(q, linear, lambda n, w: f"gguf:{by_module[n]}")
    rest = {g: t for g, t in types.items() if names[g] not in done}
    return q, rest


def _tensors(path) -> dict[str, tuple[str, np.ndarray]]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).view(np.uint8).reshape(-1)) for t in GGUFReader(path).tensors}


def _assert_same_tensors(ours, theirs):
    a, b = _tensors(ours), _tensors(theirs)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][0] == b[name][0], (name, a[name][0], b[name][0])
        assert np.array_equal(a[name][1], b[name][1]), name


def _tiny_reference(arch: str, tokenizer):
    """A tiny model 256 wide, so the k-quants apply without llama.cpp's fallbacks."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from quantbench.sources.models import ModelInfo, Reference

    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256)).eval()
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=256, n_layer=2, n_head=4)).eval()
    info = ModelInfo("tiny", "directory", "-", "-", arch, 256, len(tokenizer))
    return Reference(model=model, tokenizer=tokenizer, info=info, dtype="fp32", device=torch.device("cpu"))


@pytest.fixture(scope="module")
def tokenizer():
    from conftest import _tiny_tokenizer  # tests/conftest.py

    return _tiny_tokenizer(512)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_quantbench_q4_k_m_file_equals_llama_cpp_q4_k_m(arch, tokenizer, tmp_path):
    from quantbench.backends.llamacpp_quantize import quantize_gguf

    ref = _tiny_reference(arch, tokenizer)
    names = export_reference(ref, tmp_path / "f32.gguf")
    quantize_gguf(tmp_path / "f32.gguf", tmp_path / "llama.cpp.gguf", "Q4_K_M")
    qmodel, rest = quantbench_mixture(ref.model, str(tmp_path / "f32.gguf"), names, "Q4_K_M")
    assert any(isinstance(m, QLinear) and m.qtensor.ggml_type.name == "Q4_K" for m in qmodel.modules())
    write_gguf(qmodel, ref.tokenizer, tmp_path / "ours.gguf", tensor_types=rest)
    _assert_same_tensors(tmp_path / "ours.gguf", tmp_path / "llama.cpp.gguf")


@pytest.mark.slow
def test_embedded_model_q4_k_m_equals_llama_cpp(tmp_path):
    from quantbench.backends.llamacpp import LlamaCppVariant
    from quantbench.backends.llamacpp_quantize import quantize_gguf
    from quantbench.sources import load_reference

    ref = load_reference("smollm2-135m")
    names = export_reference(ref, tmp_path / "f32.gguf")
    quantize_gguf(tmp_path / "f32.gguf", tmp_path / "llama.cpp.gguf", "Q4_K_M")
    qmodel, rest = quantbench_mixture(ref.model, str(tmp_path / "f32.gguf"), names, "Q4_K_M")
    (tmp_path / "f32.gguf").unlink()
    write_gguf(qmodel, ref.tokenizer, tmp_path / "ours.gguf", source_gguf=ref.info.gguf_file, tensor_types=rest)
    _assert_same_tensors(tmp_path / "ours.gguf", tmp_path / "llama.cpp.gguf")
    v = LlamaCppVariant(tmp_path / "ours.gguf", "ours", expected_vocab=49152)  # llama.cpp runs our file
    try:
        assert len(v.generate(torch.tensor([[504, 3458, 282]]), 4)) == 4
    finally:
        v.close()
