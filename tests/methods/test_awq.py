"""AWQ: scale folding, the two searches, and the method against RTN on tiny models."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantbench.formats import quantize_tensor
from quantbench.formats.integer import IntConfig
from quantbench.layers import QLinear, get_module, get_weight
from quantbench.methods import parse_method
from quantbench.methods.awq import architecture, fake_quant, fold_scale, foldable, search_clip, search_scale
from quantbench.methods.calibrate import decoder_blocks
from quantbench.spec import SpecError

from .conftest import make_calib, make_ref, mean_kl
from .test_gptq import correlated_inputs


def mha_llama() -> LlamaForCausalLM:
    """A tiny Llama without grouped-query attention, so the v -> o scale applies."""
    torch.manual_seed(3)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


def qtensors(model) -> dict:
    return {n: m.qtensor for n, m in model.named_modules() if isinstance(m, QLinear)}


@pytest.mark.parametrize("mha", [False, True], ids=["gqa", "mha"])
def test_folding_scales_leaves_the_float_model_unchanged(tiny_ref, mha):
    model = mha_llama() if mha and tiny_ref.info.architecture == "llama" else tiny_ref.model
    ids = make_calib(2, 24).input_ids
    with torch.inference_mode():
        want = model(input_ids=ids).logits
    g = torch.Generator().manual_seed(0)
    folded = 0
    for block in decoder_blocks(model)[1]:
        for group in architecture(model).groups:
            if foldable(block, group):
                n = get_weight(get_module(block, group.linears[0])).shape[1]
                fold_scale(block, group, torch.exp(torch.randn(n, generator=g)))
                folded += 1
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    llama = tiny_ref.info.architecture == "llama"
    assert folded == (8 if mha and llama else 6)  # 2 blocks; v -> o only without GQA
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_alpha_zero_without_clipping_equals_rtn(tiny_ref):
    awq = parse_method("awq:bits=4,group=32,alpha=0,clip=false").build(tiny_ref, make_calib())
    rtn = parse_method("int:bits=4,group=32,sym=false").build(tiny_ref, None)
    a, b = qtensors(awq.model), qtensors(rtn.model)
    assert a.keys() == b.keys() and all(a[n].equal(b[n]) for n in a)
    with torch.inference_mode():  # and the norms were left alone: the two models are one
        ids = make_calib(2, 16).input_ids
        assert torch.equal(awq.model(input_ids=ids).logits, rtn.model(input_ids=ids).logits)


def test_scale_search_minimises_the_exact_output_error():
    X = correlated_inputs(4, 512, 64)
    W = torch.randn(32, 64)
    cfg = IntConfig(bits=3, sym=False, group=32)
    alphas = [i / 20 for i in range(20)]
    s = search_scale(W, X.T @ X / len(X), X.abs().mean(0), cfg, alphas)

    def loss(s):
        return ((fake_quant(W * s, cfg) / s - W) @ X.T).pow(2).mean().item()

    from quantbench.methods.awq import grid_scales

    losses = [loss(row) for row in grid_scales(X.abs().mean(0), alphas)]
    assert loss(s) == pytest.approx(min(losses), rel=1e-4)
    assert loss(s) < losses[0]  # alpha = 0 is plain RTN; the inputs have loud channels
    # on a sample of rows the search still lands near the best of the grid
    sampled = search_scale(W, X.T @ X / len(X), X.abs().mean(0), cfg, alphas, rows=16)
    assert loss(sampled) <= sorted(losses)[3]


def test_clip_search_never_increases_the_group_error():
    X = correlated_inputs(5, 512, 64)
    W = torch.randn(16, 64)
    W[0, 3] = 8.0  # an outlier the clip should cut
    cfg = IntConfig(bits=3, sym=False, group=32)
    G = X.T @ X / len(X)
    Wc = search_clip(W, G, cfg)
    assert Wc.abs().amax() <= W.abs().amax()

    def err(w):
        return ((fake_quant(w, cfg) - W) @ X.T).pow(2).sum().item()

    assert err(Wc) <= err(W) * (1 + 1e-5)
    assert torch.equal(fake_quant(W, cfg), quantize_tensor(W, cfg).dequantize())


def test_awq_model_beats_rtn(tiny_ref):
    calib, ids = make_calib(8, 32), make_calib(4, 32, seed=9).input_ids
    awq = parse_method("awq:bits=3,group=32").build(tiny_ref, calib)
    rtn = parse_method("int:bits=3,group=32,sym=false").build(tiny_ref, None)
    assert awq.layer_specs == rtn.layer_specs
    assert mean_kl(tiny_ref.model, awq.model, ids) < mean_kl(tiny_ref.model, rtn.model, ids)
    assert not any(isinstance(m, QLinear) for m in tiny_ref.model.modules())


def test_bad_awq_arguments():
    for bad in ("awq:group=-1", "awq:alpha=1.5", "awq:grid=0", "awq:bits=1"):
        with pytest.raises(SpecError):
            parse_method(bad)
    model = mha_llama()
    model.config.model_type = "opt"
    with pytest.raises(SpecError, match="supported: gpt2, llama"):
        parse_method("awq:group=32").build(make_ref(model), make_calib())
