"""GGUF export: round trips through transformers and llama.cpp, the rotary permutation, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader, TokenType

from quantbench.backends.gguf_arch import rope_row_order
from quantbench.backends.gguf_export import GGUFExportError, write_gguf
from quantbench.backends.gguf_tokenizer import TokenizerExportError
from quantbench.sources import load_reference

from . import needs_llama_cpp
from conftest import _tiny_tokenizer, tiny_llama  # tests/conftest.py

CASTS = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def test_rope_row_order_interleaves_the_two_halves_of_each_head():
    # one head of 4 rows [x0 x1 | y0 y1] -> [x0 y0 x1 y1]; two heads permute independently
    assert rope_row_order(4, 1).tolist() == [0, 2, 1, 3]
    assert rope_row_order(8, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    order = rope_row_order(576, 9)
    assert sorted(order.tolist()) == list(range(576))


@pytest.fixture(scope="module")
def tokenizer():
    return _tiny_tokenizer(512)


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_transformers_reads_back_every_tensor(arch, outtype, tokenizer, tmp_path):
    """Our file, loaded by transformers' GGUF reader (which undoes the rotary permutation), gives
    back every weight: bit for bit at F32, the same cast at F16/BF16 (1-D tensors stay F32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers import GPT2Config, GPT2LMHeadModel

    if arch == "llama":
        model = tiny_llama(vocab=len(tokenizer))
    else:  # transformers' GGUF reader takes gpt2.context_length as n_ctx, not n_positions: keep GPT-2's 1024
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4)).eval()
    write_gguf(model, tokenizer, tmp_path / "m.gguf", outtype)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for k, w in ours.items():
        expect = w.to(CASTS[outtype]).float() if w.dim() > 1 else w
        assert torch.equal(theirs[k], expect), k
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "Return the value of 42 + x, or None."
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]


@needs_llama_cpp
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_llama_cpp_runs_the_export_like_torch(arch, tiny_refs, tiny_f32_gguf):
    """llama.cpp loads our F32 file, tokenizes like the Hugging Face tokenizer and computes the
    same logits as the torch model up to float32 rounding."""
    from quantbench.backends.llamacpp import LlamaCppVariant

    ref = tiny_refs[arch]
    v = LlamaCppVariant(tiny_f32_gguf[arch], "f32", expected_vocab=ref.model.config.vocab_size)
    try:
        ids = torch.randint(0, ref.model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            want = ref.model(ids).logits
        got = v.logits(ids)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=2e-4 * want.abs().max().item(), rtol=0)
        assert v.generate(ids[:1, :16], 6) == ref.model.generate(
            ids[:1, :16], max_new_tokens=6, do_sample=False, pad_token_id=0
        )[0, 16:].tolist()
        import llama_cpp

        text = "def f(x):\n    return x ** 2  # 1234 squared"
        want_ids = ref.tokenizer(text, add_special_tokens=False)["input_ids"]
        n = llama_cpp.llama_tokenize(llama_cpp.llama_model_get_vocab(v._model), text.encode(), len(text.encode()),
                                     buf := (llama_cpp.llama_token * 256)(), 256, False, False)
        assert list(buf[:n]) == want_ids
    finally:
        v.close()


def test_unknown_architecture_is_refused(tokenizer, tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                     num_attention_heads=2, word_embed_proj_dim=32))
    with pytest.raises(GGUFExportError, match="cannot write architecture 'opt'.*exports gpt2, llama"):
        write_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_larger_than_the_embedding_is_refused_and_no_file_is_left(tokenizer, tmp_path):
    with pytest.raises(TokenizerExportError, match="512 tokens but the model's embedding has 256 rows"):
        write_gguf(tiny_llama(vocab=256), tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_tokenizer_smaller_than_the_embedding_is_padded_with_unused_tokens(tokenizer, tmp_path):
    write_gguf(tiny_llama(vocab=520), tokenizer, tmp_path / "m.gguf")
    r = GGUFReader(tmp_path / "m.gguf")
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == 520 and tokens[512:] == [f"[PAD{i}]" for i in range(512, 520)]
    assert types[512:] == [TokenType.UNUSED] * 8 and types[0] == TokenType.CONTROL  # "<s>" is special


def test_bad_tensor_types(tokenizer, tmp_path):
    model = tiny_llama(vocab=len(tokenizer))
    with pytest.raises(GGUFExportError, match="does not have: blk.9.attn_q.weight"):
        write_gguf(model, tokenizer, tmp_path / "m.gguf", tensor_types={"blk.9.attn_q.weight": "Q8_0"})
    with pytest.raises(GGUFExportError, match="1-D"):
        write_gguf(model, tokenizer, tmp_path / "m.gguf", tensor_types={"output_norm.weight": "Q8_0"})
    with pytest.raises(GGUFExportError, match="outtype 'f8' is not valid"):
        write_gguf(model, tokenizer, tmp_path / "m.gguf", outtype="f8")


@pytest.mark.slow
def test_embedded_model_export_equals_the_source_gguf(tmp_path):
    """The F32 export of the embedded model holds, tensor for tensor (Q/K permuted back to
    llama.cpp's layout), exactly gguf-py's dequantization of the source file, and its tokenizer."""
    from gguf.quants import dequantize

    from quantbench.backends.gguf_export import export_reference

    ref = load_reference("smollm2-135m")
    export_reference(ref, tmp_path / "f32.gguf")
    src, ours = GGUFReader(ref.info.gguf_file), GGUFReader(tmp_path / "f32.gguf")
    theirs = {t.name: t for t in ours.tensors}
    assert {t.name for t in src.tensors} == set(theirs)
    for t in src.tensors:
        want = dequantize(t.data, t.tensor_type).reshape(theirs[t.name].data.shape)
        assert np.array_equal(np.asarray(theirs[t.name].data), want), t.name
    for key, f in src.fields.items():
        if key.startswith("tokenizer."):
            assert ours.fields[key].contents() == f.contents(), key
    for key in ("llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.context_length",
                "llama.attention.head_count_kv", "llama.rope.dimension_count"):
        assert ours.fields[key].contents() == src.fields[key].contents(), key


@pytest.mark.parametrize("outtype", ["f32", "bf16"])
def test_header_reader_agrees_with_gguf_py(outtype, tokenizer, tmp_path):
    """The streaming header reader (what the llama.cpp variant reports) against GGUFReader."""
    from quantbench.backends.gguf_header import GGUFFileError, inspect_gguf

    write_gguf(tiny_llama(vocab=len(tokenizer)), tokenizer, tmp_path / "m.gguf", outtype)
    info, r = inspect_gguf(tmp_path / "m.gguf"), GGUFReader(tmp_path / "m.gguf")
    assert info.architecture == "llama" and info.n_vocab == len(tokenizer)
    assert info.tensor_bytes == sum(int(t.n_bytes) for t in r.tensors)
    assert info.n_elements == sum(int(t.n_elements) for t in r.tensors)
    assert info.tensor_types == {t.name: t.tensor_type.name for t in r.tensors if len(t.shape) >= 2}
    data = (tmp_path / "m.gguf").read_bytes()
    for cut in (len(data) - 1, 2000, 30):  # inside the data, inside the tokenizer, inside the counts
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(GGUFFileError, match="corrupt or truncated"):
            inspect_gguf(tmp_path / "cut.gguf")
