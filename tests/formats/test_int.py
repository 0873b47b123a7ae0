"""The integer RTN format: property tests of the math, packing, persistence and errors."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quantbench.formats import QTensor, get_format, quantize_tensor
from quantbench.formats.integer import (
    IntConfig, centered_bounds, choose_qparams, dequantize_codes, group_view, pack_bits, quantize_centered,
    quantize_codes, scale_bits, unpack_bits,
)
from quantbench.spec import SpecError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAGNITUDES = {"float32": (1e-30, 1e-3, 1.0, 1e4), "bfloat16": (1e-30, 1e-3, 1.0, 1e4), "float16": (1e-3, 1.0, 1e4)}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
dtypes = pytest.mark.parametrize("dtype", list(DTYPES))


@st.composite
def cases(draw, dtype: str) -> tuple[torch.Tensor, IntConfig]:
    """A weight (rows, groups * 32) and a config whose group divides its rows."""
    rows, groups = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    unit = draw(arrays(np.float32, (rows, 32 * groups), elements=st.floats(-1, 1, width=32)))
    w = (torch.from_numpy(unit) * draw(st.sampled_from(MAGNITUDES[dtype]))).to(DTYPES[dtype])
    cfg = IntConfig(
        bits=draw(st.integers(2, 8)),
        sym=draw(st.booleans()),
        group=draw(st.sampled_from([0, -1, 32])),
        scale_dtype=draw(st.sampled_from(["float16", "float32"])),
    )
    return w, cfg


def expanded(t: torch.Tensor, w: torch.Tensor, cfg: IntConfig) -> torch.Tensor:
    """Per-group parameters (R, G) broadcast to the group view (R, G, g) of `w`."""
    return t.float().reshape(group_view(w, cfg).shape[:2]).unsqueeze(-1)


@dtypes
@given(data=st.data())
@SETTINGS
def test_error_zero_and_order(dtype, device, data):
    """|w - deq| <= half a step (the group's scale), but for the top of an asymmetric group,
    where the rounded scale may leave the grid short of the range by (max - min) / scale - qmax
    steps; zero is exact; order is kept within a group."""
    w, cfg = data.draw(cases(dtype))
    mask = torch.from_numpy(data.draw(arrays(np.bool_, tuple(w.shape)))).to(device)
    w = torch.where(mask, torch.zeros_like(w.to(device)), w.to(device))
    q = quantize_tensor(w, cfg)
    deq = get_format("int").dequantize(q)
    wg, dg = group_view(w.float(), cfg), group_view(deq, cfg)
    step = expanded(q.scale, w, cfg)
    bound = step / 2 + (wg.abs() + dg.abs()) * 2**-22  # + float32 rounding of w / scale
    if not cfg.sym:
        lo, hi = wg.amin(-1, keepdim=True).clamp(max=0), wg.amax(-1, keepdim=True).clamp(min=0)
        short = ((hi - lo) / step - (2**cfg.bits - 1)).clamp(min=0)
        bound = bound + torch.where(wg == hi, short * step, 0)
        assert (short <= (2**cfg.bits - 1) * 2.0 ** (2 - scale_bits(cfg))).all()
    err = (wg - dg).abs()
    assert (err <= bound).all(), (wg[err > bound], dg[err > bound], step.expand_as(wg)[err > bound])
    assert (deq[mask] == 0).all()
    order = wg.argsort(dim=-1, stable=True)
    assert (dg.gather(-1, order).diff(dim=-1) >= 0).all()


@dtypes
@given(data=st.data())
@SETTINGS
def test_requantizing_the_dequantized_weight_is_identity(dtype, device, data):
    w, cfg = data.draw(cases(dtype))
    q = quantize_tensor(w.to(device), cfg)
    again = quantize_tensor(get_format("int").dequantize(q), cfg)
    for name, t in q.tensors().items():
        assert torch.equal(again.tensors()[name], t), name


@given(bits=st.integers(2, 8), sym=st.booleans(), data=st.data())
@settings(max_examples=80, deadline=None)
def test_centered_codes_are_the_codes_minus_zero(bits, sym, data):
    """GPTQ's column loop uses `quantize_centered`: it must be `quantize_codes` minus the zero
    exactly, and times the scale exactly `dequantize_codes`, for any weights and parameters,
    including weights beyond the range the parameters were chosen from (GPTQ's error feedback
    moves them there)."""
    cfg = IntConfig(bits=bits, sym=sym, group=0)
    rows, n = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 40))
    finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
    w = torch.from_numpy(data.draw(arrays(np.float32, (rows, n), elements=finite)))
    qp = choose_qparams(w, cfg)
    x = w * data.draw(st.floats(0.5, 3.0))  # past the chosen range: clamped alike
    codes = quantize_codes(x, qp, cfg)
    centered = quantize_centered(x, qp.scale, centered_bounds(qp, cfg))
    assert torch.equal(centered, codes - qp.zero)
    assert torch.equal(centered * qp.scale, dequantize_codes(codes, qp))


@given(bits=st.integers(2, 8), data=st.data())
@settings(max_examples=80, deadline=None)
def test_pack_unpack_round_trip(bits, data):
    rows, n = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 70))
    codes = torch.from_numpy(data.draw(arrays(np.uint8, (rows, n), elements=st.integers(0, 2**bits - 1))))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, -(-n * bits // 8))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def bit_serial_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The layout's definition, one bit at a time: code i fills bits [i*bits, (i+1)*bits) of a
    little-endian stream, zero-padded to whole bytes."""
    rows, n = codes.shape
    stream = ((codes.unsqueeze(-1) >> torch.arange(bits, dtype=torch.uint8)) & 1).reshape(rows, n * bits)
    stream = torch.nn.functional.pad(stream, (0, (-n * bits) % 8)).reshape(rows, -1, 8)
    return (stream << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


@given(bits=st.integers(1, 7), data=st.data())
@settings(max_examples=80, deadline=None)
def test_packing_is_the_documented_bit_stream(bits, data):
    rows, n = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 40))
    codes = torch.from_numpy(data.draw(arrays(np.uint8, (rows, n), elements=st.integers(0, 2**bits - 1))))
    assert torch.equal(pack_bits(codes, bits), bit_serial_pack(codes, bits))


@pytest.mark.parametrize("spec", ["int:bits=4,sym=false,group=32", "int:bits=3", "int:bits=8,group=-1,scale_dtype=float32"])
@dtypes
def test_save_load_is_bit_exact(spec, dtype, device):
    torch.manual_seed(0)
    q = quantize_tensor(torch.randn(12, 96).to(DTYPES[dtype]).to(device), spec)
    with tempfile.TemporaryDirectory() as d:
        q.save(Path(d) / "q.safetensors")
        back = QTensor.load(Path(d) / "q.safetensors")
    assert back.equal(q.to("cpu")) and back.dtype == DTYPES[dtype]
    assert q.bits_per_weight == pytest.approx(q.config.bits_per_weight((12, 96)))


def test_non_finite_weights_are_a_clear_error():
    for bad in (float("nan"), float("inf")):
        w = torch.randn(4, 64)
        w[2, 5] = bad
        with pytest.raises(ValueError, match="1 NaN or Inf"):
            quantize_tensor(w, "int:bits=4")


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_all_zero_and_constant_groups(sym, device):
    w = torch.zeros(3, 64, device=device)
    w[1] = 0.3  # two constant groups
    w[2, :32] = -7.0
    q = quantize_tensor(w, IntConfig(bits=4, sym=sym, group=32))
    deq = q.dequantize()
    assert (deq[0] == 0).all() and (deq[2, 32:] == 0).all()
    assert torch.allclose(deq, w, rtol=2**-10)  # a constant group lands on its end code
    assert torch.isfinite(q.scale.float()).all() and (q.scale.float() > 0).all()


def test_huge_and_tiny_magnitudes():
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="overflows float16; use scale_dtype=float32"):
        quantize_tensor(w * 1e9, "int:bits=8")
    huge = quantize_tensor(w * 1e30, "int:bits=8,scale_dtype=float32")
    assert torch.allclose(huge.dequantize(), w * 1e30, rtol=0, atol=1e30 * w.abs().max().item() / 127)
    with pytest.raises(ValueError, match="range of float32"):
        quantize_tensor(torch.tensor([[-3e38, 3e38]]), "int:bits=8,sym=false,scale_dtype=float32")
    tiny = quantize_tensor(w * 1e-20, "int:bits=8")  # below float16's smallest scale: rounds to 0
    assert (tiny.dequantize() == 0).all() and (tiny.scale > 0).all()


def test_bad_parameters_say_what_is_valid():
    with pytest.raises(SpecError, match="group=128 does not divide the row length 576; valid here: 32, 64, 0, -1"):
        quantize_tensor(torch.randn(4, 576), "int:group=128")
    with pytest.raises(SpecError, match="bits=9 is not supported; choose 2 to 8"):
        quantize_tensor(torch.randn(4, 576), "int:bits=9")
    with pytest.raises(SpecError, match="group=100 does not divide the row length 576"):
        quantize_tensor(torch.randn(4, 576), "int:group=100")


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_clip_search_never_increases_the_squared_error(sym):
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    w[:, 0] *= 8  # an outlier per row: clipping it pays off
    plain = quantize_tensor(w, IntConfig(bits=3, sym=sym, group=64)).dequantize()
    clipped = quantize_tensor(w, IntConfig(bits=3, sym=sym, group=64, clip_search=True)).dequantize()
    err = lambda d: (d - w).pow(2).view(16, 2, 64).sum(-1)  # noqa: E731
    assert (err(clipped) <= err(plain) * (1 + 1e-6)).all() and (err(clipped) < err(plain)).any()
