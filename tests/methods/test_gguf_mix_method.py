"""gguf-mix: llama.cpp's whole-model mixtures as a method, on tiny models and (slow) on the
embedded model against llama.cpp's own Q4_K_M file, tensor by tensor and byte by byte."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from torch import nn

import ggml_ref
from conftest import tiny_gpt2, tiny_llama
from methods.conftest import make_ref
from quantbench.formats import quantize_tensor
from quantbench.formats.gguf import GGUFQTensor
from quantbench.formats.gguf_mix import hf_tensor_types
from quantbench.layers import QEmbedding, QLinear, TiedQLinear, weight_bytes
from quantbench.methods import parse_method
from quantbench.spec import SpecError

MIXTURES = ("Q4_K_M", "Q5_K_M", "Q6_K")


def small_llama(tied: bool = True, intermediate: int = 32):
    """Rows of 256 (k-quants fit) but few of them, so the k-quant search stays quick: 2 heads of
    16, o_proj and down_proj with rows of 32 (legacy fallback)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def small_gpt2():
    """One GPT-2 block with rows of 256 (use_more_bits(0, 1): Q6_K for attn_qkv and ffn_down)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=256, n_layer=1, n_head=4, n_inner=32, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


# hidden 64: every 64-long row falls back to a legacy type (fast, all mixtures); rows of 256:
# the k-quants themselves (slower on a busy CPU: Q4_K_M only)
CASES = [("llama64", tiny_llama, m) for m in MIXTURES] + [("gpt2_64", tiny_gpt2, m) for m in MIXTURES] + [
    ("llama256", small_llama, "Q4_K_M"), ("gpt2_256", small_gpt2, "Q4_K_M")]


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter shapes (tied ones once) in nn.Linear orientation: GPT-2's Conv1D transposed."""
    from transformers.pytorch_utils import Conv1D

    conv = {n + ".weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}
    return {n: tuple(p.shape)[::-1] if n in conv else tuple(p.shape) for n, p in model.named_parameters()}


def _stored_type(m: nn.Module) -> str | None:
    return m.qtensor.config.type if isinstance(m, (QLinear, QEmbedding, TiedQLinear)) else None


@pytest.mark.parametrize("arch, make, mixture", CASES, ids=[f"{a}-{m}" for a, _, m in CASES])
def test_every_tensor_gets_the_recipes_type(arch, make, mixture):
    ref = make_ref(make())
    expected = hf_tensor_types(mixture, _shapes(ref.model), tied_embeddings=True,
                               n_layers=ref.model.config.num_hidden_layers)
    v = parse_method(f"gguf-mix:{mixture}").build(ref)
    model = v.model
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, QEmbedding) and isinstance(head, TiedQLinear) and head.embedding is emb
    emb_key = emb_name(model) + ".weight"  # a tied head has no weight of its own: token_embd's
    checked = 0
    for name, m in model.named_modules():
        t = _stored_type(m)
        if t is None:
            continue
        assert t == expected[emb_key if m is head else name + ".weight"], name
        assert v.layer_specs[name] == f"gguf:{t}", name
        checked += 1
    assert checked == len(v.layer_specs) and set(v.layer_specs) >= {emb_name(model), "lm_head"}
    if arch.endswith("256"):  # the more-bits layers and the k-quants show up
        assert {"Q6_K", "Q4_K"} <= {_stored_type(m) for _, m in model.named_modules()}
    # bytes: every QTensor once (the tied head adds nothing), the float tensors as they are
    q_bytes = sum(m.qtensor.nbytes + (0 if m.bias is None else m.bias.numel() * 4)
                  for m in model.modules() if isinstance(m, QLinear))
    q_bytes += model.get_input_embeddings().qtensor.nbytes
    float_bytes = sum(
        t.numel() * t.element_size() for m in model.modules() if not isinstance(m, (QLinear, QEmbedding))
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]
    )
    assert v.weight_bytes() == weight_bytes(model) == q_bytes + float_bytes


def emb_name(model: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is model.get_input_embeddings())


def test_quantized_model_stays_close_and_generates():
    ref = make_ref(tiny_llama())
    v = parse_method("gguf-mix:Q6_K").build(ref)  # rows of 64: Q8_0 everywhere
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = torch.log_softmax(ref.model(input_ids=ids).logits, -1)
        q = torch.log_softmax(v.logits(ids), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert 0 < kl < 1e-3
    assert len(v.generate(ids[:1], 5)) == 5
    # the reference is untouched
    assert isinstance(ref.model.model.embed_tokens, nn.Embedding) and isinstance(ref.model.lm_head, nn.Linear)


def test_untied_output_gets_the_output_rule_and_unfit_rows_stay_float():
    """An untied Llama: lm_head is output.weight (Q6_K), token_embd the default type; an MLP of
    80 (no block of 32 divides it) makes down_proj F16 in llama.cpp, kept float here."""
    ref = make_ref(small_llama(tied=False, intermediate=80))
    v = parse_method("gguf-mix:Q4_K_M").build(ref)
    m = v.model
    assert isinstance(m.lm_head, QLinear) and m.lm_head.qtensor.config.type == "Q6_K"
    assert isinstance(m.model.embed_tokens, QEmbedding) and m.model.embed_tokens.qtensor.config.type == "Q4_K"
    assert m.model.layers[0].mlp.up_proj.qtensor.config.type == "Q4_K"
    down = m.model.layers[0].mlp.down_proj
    assert type(down) is nn.Linear and torch.equal(down.weight, ref.model.model.layers[0].mlp.down_proj.weight)
    assert v.layer_specs["model.layers.0.mlp.down_proj"] == "fp32"


@pytest.mark.parametrize("fmt", ["gguf:Q4_K", "gguf:Q8_0", "int:bits=4,group=64"])
def test_qembedding_lookup_equals_the_dequantized_matrix(fmt):
    """Row-wise dequantization (GGUF) and the whole-matrix path (int: no select_rows) agree
    exactly with F.embedding on the dequantized matrix; repeated ids too."""
    w = torch.randn(50, 256)
    q = quantize_tensor(w, fmt)
    emb = QEmbedding(q)
    ids = torch.tensor([[3, 7, 3, 49], [0, 0, 12, 7]])
    assert torch.equal(emb(ids), nn.functional.embedding(ids, q.dequantize()))
    if isinstance(q, GGUFQTensor):
        sub = q.select_rows(torch.tensor([7, 3]))
        assert sub.shape == (2, 256) and torch.equal(sub.dequantize(), q.dequantize()[[7, 3]])
    assert weight_bytes(emb) == q.nbytes


@pytest.mark.parametrize("spec", ["gguf-mix:Q4_K_S", "gguf-mix:type=Q4_K"])
def test_bad_mixture_lists_the_valid_ones(spec):
    with pytest.raises(SpecError, match="choose one of Q4_K_M, Q5_K_M, Q6_K"):
        parse_method(spec)


def test_bare_value_and_listed(capsys):
    from quantbench.cli import main

    assert parse_method("gguf-mix:Q5_K_M").config.type == "Q5_K_M"
    assert parse_method("gguf-mix").config.type == "Q4_K_M"
    assert main(["list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("gguf-mix "))
    assert "type=Q4_K_M" in line and "yes" in line


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_run_end_to_end(tiny_model_dirs, arch):
    from quantbench.run import RunConfig, run

    cfg = RunConfig(model=tiny_model_dirs[arch], tokens=256, context=64, calib_samples=0,
                    measure_speed=False, generate=False)
    doc = run(cfg, ["gguf-mix:Q4_K_M", "fp32"])
    mix, fp32 = doc["results"]
    assert mix["spec"] == "gguf-mix" and mix["method"] == "gguf-mix"
    # hidden 64: Q4_K falls back to Q5_0, the tied embedding and more-bits layers to Q8_0;
    # GPT-2's c_proj has rows of 4 x 64 = 256, which keep their k-quant
    types = {"Q5_0", "Q8_0"} | ({"Q4_K", "Q6_K"} if arch == "gpt2" else set())
    assert set(mix["layer_specs"].values()) == {f"gguf:{t}" for t in types}
    assert "lm_head" in mix["layer_specs"]
    assert 0 < mix["kld_mean"] < 0.05 and mix["top1_agreement"] > 0.8
    assert mix["weight_bytes"] < fp32["weight_bytes"] / 3


# -- the embedded model against llama.cpp ---------------------------------------------------

def _gguf_row_order(blocks: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutes attn_q/attn_k rows for its RoPE layout (convert_hf_to_gguf
    `LlamaModel.permute`); rows are whole blocks, so permuting our block rows gives its bytes."""
    rows = blocks.shape[0]
    return blocks.reshape(n_head, 2, rows // n_head // 2, -1).swapaxes(1, 2).reshape(blocks.shape)


@pytest.mark.slow  # loads the 135M model, then llama.cpp and we quantize it: ~5 min on a busy 2-core box
def test_embedded_model_same_types_and_bytes_as_llama_cpp(tmp_path):
    from quantbench.formats.gguf_mix import gguf_name
    from quantbench.sources import load_reference
    from quantbench.sources.models import embedded_gguf_path

    ggml_ref.require_ggml()
    ggml_ref.llama_quantize_file(embedded_gguf_path(), tmp_path / "q4_k_m.gguf", "Q4_K_M")
    theirs = ggml_ref.read_gguf(tmp_path / "q4_k_m.gguf")
    ref = load_reference("smollm2-135m")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # ggml's float sums are sequential; keep ours in one thread too
    try:
        v = parse_method("gguf-mix:Q4_K_M").build(ref)
    finally:
        torch.set_num_threads(n)
    cfg = ref.model.config
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    seen = set()
    for name, m in v.model.named_modules():
        if not isinstance(m, (QLinear, QEmbedding)):
            continue
        g = gguf_name(name)
        their_type, their_bytes = theirs[g]
        assert m.qtensor.ggml_type == their_type, name
        ours = m.qtensor.blocks.numpy()
        kind = g.split(".")[-2]
        if kind in heads:
            ours = _gguf_row_order(ours, heads[kind])
        assert np.array_equal(ours.reshape(-1), their_bytes), name
        seen.add(g)
    quantized = {k for k, (t, _) in theirs.items() if gguf.GGMLQuantizationType(t).name != "F32"}
    assert seen == quantized and "output.weight" not in theirs  # tied: token_embd is the output
    file_bytes = sum(b.size for _, b in theirs.values())
    # ours = llama.cpp's tensor data + RoPE's inv_freq buffer (32 fp32)
    assert v.weight_bytes() - file_bytes == sum(b.numel() * 4 for n, b in v.model.named_buffers() if "inv_freq" in n)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_memory_gate_counts_a_tied_head_once(tied):
    """The memory gate's theoretical size of a gguf-mix variant equals its stored bytes: a tied
    output head computes with the embedding's QTensor and adds nothing of its own."""
    from quantbench import gates

    ref = make_ref(small_llama(tied=tied))
    v = parse_method("gguf-mix:Q4_K_M").build(ref)
    expected, _ = gates.theoretical_bytes(v, ref.model)
    assert expected == v.weight_bytes()
    assert isinstance(v.model.lm_head, TiedQLinear) == tied
