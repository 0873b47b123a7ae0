"""LLM.int8(): the weight format (properties, bytes of bnb's Int8Params) and the runtime
decomposition (outputs of bnb's Linear8bitLt on the CPU), plus the `llm-int8` method."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quantbench.formats import QTensor, get_format, quantize_tensor
from quantbench.formats.llm_int8 import LLMInt8Config, mixed_linear
from quantbench.layers import LayerRule, weight_bytes
from quantbench.methods import parse_method
from quantbench.methods.llm_int8 import Int8Linear, int8_layers

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
dtypes = pytest.mark.parametrize("dtype", list(DTYPES))
# What Linear8bitLt gave on this machine's CPU in every case measured (random layers with
# outlier features, three dtypes, K up to 1536; a layer of SmolLM2-135M on real text): the same
# bits. The tolerance asserted is therefore zero; see the README paragraphs for other devices.


@st.composite
def weights(draw, dtype: str) -> torch.Tensor:
    rows, cols = draw(st.integers(1, 8)), draw(st.integers(1, 130))
    unit = draw(arrays(np.float32, (rows, cols), elements=st.floats(-1, 1, width=32)))
    scale = draw(st.sampled_from((1e-3, 1.0, 100.0)))
    return (torch.from_numpy(unit) * scale).to(DTYPES[dtype])


# -- the weight format ---------------------------------------------------------------------
@dtypes
@given(data=st.data())
@SETTINGS
def test_format_properties(dtype, device, data):
    """Error <= half a step (absmax / 127) of the float16-rounded weight; zero exact; order kept
    within a row; quantize(dequantize(q)) == q."""
    w = data.draw(weights(dtype)).to(device)
    mask = torch.from_numpy(data.draw(arrays(np.bool_, tuple(w.shape)))).to(device)
    w = torch.where(mask, torch.zeros_like(w), w)
    q = quantize_tensor(w, "llm-int8")
    deq = get_format("llm-int8").dequantize(q)  # float32
    w16 = w.to(torch.float16).float()
    step = w16.abs().amax(1, keepdim=True) / 127
    assert ((deq - w16).abs() <= step / 2 + deq.abs() * 2**-22).all()  # + float32 rounding
    assert (deq[mask] == 0).all()
    order = w16.argsort(dim=1, stable=True)
    assert (deq.gather(1, order).diff(dim=1) >= 0).all()
    again = quantize_tensor(deq, "llm-int8")
    assert torch.equal(again.codes, q.codes) and torch.equal(again.absmax, q.absmax)


@dtypes
def test_save_load_and_nbytes(dtype, device):
    w = torch.randn(33, 70).to(DTYPES[dtype]).to(device)
    q = quantize_tensor(w, "llm-int8")
    with tempfile.TemporaryDirectory() as d:
        q.save(Path(d) / "q.safetensors")
        back = QTensor.load(Path(d) / "q.safetensors")
    assert back.equal(q.to("cpu")) and back.dtype == DTYPES[dtype]
    assert q.codes.dtype == torch.int8 and q.nbytes == 33 * 70 + 4 * 33
    assert q.bits_per_weight == pytest.approx(LLMInt8Config().bits_per_weight((33, 70)))


def test_bad_weights_are_a_clear_error():
    w = torch.randn(4, 8)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_tensor(w, "llm-int8")
    with pytest.raises(ValueError, match="float16's range"):
        quantize_tensor(torch.full((2, 8), 1e5), "llm-int8")
    with pytest.raises(ValueError, match="no parameter"):
        quantize_tensor(torch.randn(2, 8), "llm-int8:bits=4")


def test_huge_and_tiny_weights():
    """Near float16's top the codes are still exact; below its smallest subnormal (6e-8) a
    weight rounds to 0 before quantization, and a row of them is a zero row."""
    w = torch.tensor([[60000.0, -30000.0, 1.0, 0.0], [1e-9, -3e-9, 0.0, 2e-9], [1e-6, 2e-6, -4e-6, 0.0]])
    q = quantize_tensor(w, "llm-int8")
    assert q.codes[0].tolist() == [127, -64, 0, 0] and q.absmax[0] == 60000.0
    assert (q.codes[1] == 0).all() and q.absmax[1] == 0 and (q.dequantize()[1] == 0).all()
    assert q.codes[2].tolist() == [32, 64, -127, 0]  # float16 subnormals still carry their ratios


# -- golden: bitsandbytes ------------------------------------------------------------------
@pytest.fixture
def bnb():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its cast-to-float16 warning
    return bnb


def bnb_linear(bnb, w: torch.Tensor, bias: torch.Tensor | None, threshold: float):
    out_f, in_f = w.shape
    lin = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False, threshold=threshold)
    lin.weight = bnb.nn.Int8Params(w.detach().clone(), requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
    return lin.to("cpu").eval()  # moving to a device is what quantizes an Int8Params


@dtypes
def test_weights_are_bnb_int8params(bnb, dtype):
    torch.manual_seed(0)
    w = torch.randn(48, 96).to(DTYPES[dtype])
    w[3] = 0.0  # a zero row: codes 0, absmax 0
    w[5] = 0.25  # a constant row
    lin = bnb_linear(bnb, w, None, 6.0)
    q = quantize_tensor(w, "llm-int8")
    assert torch.equal(q.codes, lin.weight.CB) and torch.equal(q.absmax, lin.weight.SCB)
    theirs = bnb.functional.int8_vectorwise_dequant(lin.weight.CB, lin.weight.SCB)
    assert torch.equal(get_format("llm-int8").dequantize(q), theirs)


def with_outliers(shape: tuple[int, ...], features: list[int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Activations with a few large-magnitude feature dimensions, as in the paper's Figure 3."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., features] *= 5 + 20 * torch.rand(len(features), generator=g)
    return x.to(dtype)


@dtypes
@pytest.mark.parametrize(
    "in_f,out_f,x_shape,threshold",
    [
        (256, 384, (3, 17), 6.0),
        (576, 192, (40,), 6.0),  # 2-D input
        (1536, 576, (2, 9), 6.0),  # K > 1024: the integer matmul runs in slices
        (576, 192, (1, 1), 6.0),  # one token
        (256, 128, (4, 8), 0.0),  # no decomposition
    ],
    ids=["256x384", "2d", "k1536", "one-token", "threshold0"],
)
def test_outputs_are_bnb_linear8bitlt(bnb, dtype, in_f, out_f, x_shape, threshold):
    torch.manual_seed(in_f + out_f)
    w, bias = torch.randn(out_f, in_f) * 0.05, torch.randn(out_f) * 0.1
    x = with_outliers((*x_shape, in_f), [3, 100, in_f - 1], DTYPES[dtype], seed=in_f)
    q = quantize_tensor(w, "llm-int8")
    ours = Int8Linear(q, bias, threshold)(x)
    with torch.no_grad():
        theirs = bnb_linear(bnb, w, bias.to(DTYPES[dtype]), threshold)(x)
    assert ours.dtype == theirs.dtype == DTYPES[dtype] and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)
    if threshold:  # the decomposition did something: without it the output differs
        assert not torch.equal(mixed_linear(x, q, 0.0, bias), ours)


def test_every_feature_an_outlier_is_the_float_product():
    torch.manual_seed(0)
    w, x = torch.randn(64, 128), torch.randn(5, 128)
    q = quantize_tensor(w, "llm-int8")
    expected = torch.nn.functional.linear(x, get_format("llm-int8").dequantize(q))
    torch.testing.assert_close(mixed_linear(x, q, threshold=1e-30), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.slow
def test_a_real_layer_on_real_text_is_bnb_linear8bitlt(bnb):
    """The input of layer 2's down_proj in SmolLM2-135M on 256 tokens of text holds 3 outlier
    features (|x| up to 63)."""
    from quantbench.sources import load_reference, load_text

    ref = load_reference()
    ids = ref.tokenizer(load_text().text[:4000], return_tensors="pt").input_ids[:, :256]
    layer = ref.model.model.layers[2].mlp.down_proj

    class Seen(Exception):
        pass

    def keep_input(module, args):
        raise Seen(args[0].detach())  # and skip the rest of the forward

    handle = layer.register_forward_pre_hook(keep_input)
    with torch.no_grad(), pytest.raises(Seen) as seen:
        ref.model(input_ids=ids)
    handle.remove()
    x = seen.value.args[0]  # (1, 256, 1536)
    assert (x.abs() >= 6.0).any(dim=(0, 1)).sum() >= 1  # real outlier features are there
    q = quantize_tensor(layer.weight, "llm-int8")
    ours = Int8Linear(q, None, 6.0)(x)
    with torch.no_grad():
        theirs = bnb_linear(bnb, layer.weight, None, 6.0)(x)
        exact = layer(x)
    assert torch.equal(ours, theirs)
    assert (ours - exact).norm() / exact.norm() < 0.03  # close to the float layer


# -- the method ----------------------------------------------------------------------------
def test_method_swaps_every_selected_linear_layer(tiny_model):
    model = tiny_model
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    before = weight_bytes(model)
    names = LayerRule().select(model)
    specs = int8_layers(model, names, threshold=6.0)
    assert specs == {n: "llm-int8" for n in names}
    assert all(isinstance(model.get_submodule(n), Int8Linear) for n in names)
    assert not isinstance(model.get_output_embeddings(), Int8Linear)  # lm_head left alone
    assert LayerRule().select(model) == names  # the swapped layers are still linear layers
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert weight_bytes(model) < before


def test_method_spec():
    spec = parse_method("llm-int8:threshold=3.5")
    assert spec.config.threshold == 3.5 and str(spec) == "llm-int8:threshold=3.5"
    assert str(parse_method("llm-int8")) == "llm-int8"
    with pytest.raises(ValueError, match="threshold=-1.0 is not valid"):
        parse_method("llm-int8:threshold=-1")
