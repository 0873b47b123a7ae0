"""The GPTQ checkpoint layout: what is written unpacks to the very weights quantbench holds."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from quantbench.formats import quantize_tensor
from quantbench.formats.integer import IntConfig
from quantbench.layers import QLinear
from quantbench.methods import parse_method
from quantbench.methods.gptq_export import bytes_to_words, export_gptq, from_gptq, to_gptq, words_to_bytes
from quantbench.spec import SpecError

from .conftest import make_calib


def test_words_are_little_endian_and_round_trip():
    b = torch.tensor([[0x01, 0x23, 0x45, 0x87, 0xFF, 0, 0, 0]], dtype=torch.uint8)
    w = bytes_to_words(b)
    assert w.dtype == torch.int32 and w.tolist() == [[0x87452301 - 2**32, 0xFF]]
    assert torch.equal(words_to_bytes(w), b)


def test_four_bit_word_layout():
    """Eight 4-bit codes per word, the first in the low bits (q0 | q1 << 4 | ...)."""
    W = torch.arange(8 * 32, dtype=torch.float32).reshape(8, 32).t().contiguous()  # (32, 8)
    q = quantize_tensor(W, IntConfig(bits=4, sym=False, group=0))
    t = to_gptq(q)
    codes = [int(c) for c in torch.round(W[0] / q.scale[0].float()) + q.zero[0].float()]
    word = sum(c << (4 * k) for k, c in enumerate(codes))
    assert t["qweight"].shape == (1, 32) and t["qweight"][0, 0].item() == (word if word < 2**31 else word - 2**32)


@pytest.mark.parametrize(
    "cfg",
    [IntConfig(bits=b, sym=s, group=g) for b, s, g in [(4, False, 32), (3, False, 32), (2, True, 64), (8, False, 0), (4, True, -1)]],
    ids=lambda c: c.spec(),
)
def test_layer_round_trip(cfg):
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(cfg.bits))
    q = quantize_tensor(W, cfg)
    assert torch.equal(from_gptq(to_gptq(q), cfg.bits), q.dequantize())


@pytest.mark.parametrize("spec", ["gptq:bits=4,group=32,act_order=true", "gptq:bits=3,group=32,sym=true"])
def test_exported_model_unpacks_to_the_same_weights(tiny_ref, spec, tmp_path):
    v = parse_method(spec).build(tiny_ref, make_calib())
    cfg = parse_method(spec).config
    out = export_gptq(v.model, tmp_path / "ckpt", act_order=cfg.act_order)
    tensors = load_file(str(out / "model.safetensors"))
    qcfg = json.loads((out / "quantize_config.json").read_text())
    assert qcfg == json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qcfg["bits"], qcfg["group_size"], qcfg["sym"], qcfg["desc_act"]) == (cfg.bits, 32, cfg.sym, cfg.act_order)
    qlinears = {n: m for n, m in v.model.named_modules() if isinstance(m, QLinear)}
    for name, m in qlinears.items():
        t = {k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        assert t["qweight"].dtype == torch.int32 and t["scales"].dtype == torch.float16
        assert t["qweight"].shape == (m.in_features * cfg.bits // 32, m.out_features)
        assert torch.equal(from_gptq(t, cfg.bits), m.qtensor.dequantize().float())
        if cfg.act_order:
            assert torch.equal(t["g_idx"], m.qtensor.g_idx)
    # everything else is there, float, and tied weights are stored once
    for key, p in v.model.state_dict().items():
        if key.rpartition(".")[0] not in qlinears and key in tensors:
            assert torch.equal(tensors[key], p)
    assert not any(k.endswith(".codes") for k in tensors)


def test_export_refuses_what_the_layout_cannot_hold(tiny_ref, tmp_path):
    with pytest.raises(SpecError, match="stores 2, 3, 4, 8 bits"):
        to_gptq(quantize_tensor(torch.randn(32, 64), IntConfig(bits=5, group=32)), "x")
    with pytest.raises(SpecError, match="float16 scales"):
        to_gptq(quantize_tensor(torch.randn(32, 64), IntConfig(bits=4, group=32, scale_dtype="float32")), "x")
    with pytest.raises(SpecError, match="32-bit words"):
        to_gptq(quantize_tensor(torch.randn(32, 48), IntConfig(bits=3, group=16)), "x")
    with pytest.raises(SpecError, match="no quantized linear layers"):
        export_gptq(tiny_ref.model, tmp_path)
