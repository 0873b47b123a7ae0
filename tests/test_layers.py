"""Layer plumbing: nn.Linear and GPT-2's transposed Conv1D read, quantized and swapped alike."""

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from quantbench.formats import quantize_tensor
from quantbench.layers import LayerRule, QLinear, get_weight, iter_linears, quantize_layers, weight_bytes
from quantbench.spec import SpecError

from conftest import tiny_gpt2, tiny_llama


def test_conv1d_weight_is_read_in_linear_orientation():
    conv = Conv1D(nf=12, nx=8)  # in 8, out 12; weight stored (8, 12)
    lin = torch.nn.Linear(8, 12)
    lin.weight.data = get_weight(conv).clone()
    lin.bias.data = conv.bias.data.clone()
    x = torch.randn(3, 8)
    assert get_weight(conv).shape == (12, 8)
    torch.testing.assert_close(lin(x), conv(x))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_quantized_model_computes_with_its_dequantized_weights(make):
    model = make()
    ref = make()  # same seed, same weights
    names = LayerRule().select(model)
    specs = quantize_layers(model, names, lambda n, w: "int:bits=4,group=32")
    assert set(specs) == set(names) and names
    x = torch.randint(0, 256, (1, 16))
    # write the dequantized weights into the float copy: both must give the same logits
    for name, m in iter_linears(ref):
        if name in specs:
            q = quantize_tensor(get_weight(m), "int:bits=4,group=32")
            w = q.dequantize()
            with torch.no_grad():
                m.weight.copy_(w.t() if isinstance(m, Conv1D) else w)
    torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)
    assert all(isinstance(model.get_submodule(n), QLinear) for n in names)


def test_lm_head_is_left_alone_unless_asked():
    model = tiny_llama()
    assert "lm_head" not in LayerRule().select(model)
    assert "lm_head" in LayerRule(lm_head=True).select(model)


def test_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(SpecError, match="matches no linear layer"):
        LayerRule(include=("*.nonexistent",)).select(tiny_llama())


def test_a_model_without_linear_layers_is_an_error():
    with pytest.raises(SpecError, match="no linear layer"):
        LayerRule().select(torch.nn.Sequential(torch.nn.ReLU()))


def test_weight_bytes_shrink_to_the_packed_size():
    model = tiny_llama()
    before = weight_bytes(model)
    names = LayerRule().select(model)
    packed = sum(quantize_tensor(get_weight(model.get_submodule(n)), "int:bits=4,group=32").nbytes for n in names)
    floats = sum(get_weight(model.get_submodule(n)).numel() * 4 for n in names)
    quantize_layers(model, names, lambda n, w: "int:bits=4,group=32")
    assert weight_bytes(model) == before - floats + packed
