"""NF4/FP4: golden tests against bitsandbytes on the CPU, property tests for the math."""

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
from quantbench.formats.nf4 import (
    BLOCKS,
    CODEBOOKS,
    FP4Config,
    NF4Config,
    block_absmax,
    pack_nibbles,
    unpack_nibbles,
)
from quantbench.spec import SpecError

KINDS = {"nf4": NF4Config, "fp4": FP4Config}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Magnitudes each dtype holds without overflow (float16 tops out at 65504).
MAGNITUDES = {"float32": (1e-30, 1e-3, 1.0, 1e30), "bfloat16": (1e-30, 1e-3, 1.0, 1e30), "float16": (1e-3, 1.0, 1e4)}
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def make(kind: str, **kw):
    return KINDS[kind](**kw)


def raw_dequantize(q: QTensor) -> torch.Tensor:
    """The format's float32 output, before the cast to the original dtype."""
    return get_format(q.config.name).dequantize(q)


@st.composite
def weights(draw, dtype: str, max_rows: int = 6, max_cols: int = 200) -> torch.Tensor:
    rows, cols = draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols))
    unit = draw(arrays(np.float32, (rows, cols), elements=st.floats(-1, 1, width=32)))
    scale = draw(st.sampled_from(MAGNITUDES[dtype]))
    return (torch.from_numpy(unit) * scale).to(DTYPES[dtype])


def blocks_of(t: torch.Tensor, block: int) -> torch.Tensor:
    """(n,) -> (n_blocks, block), the last block padded with NaN (bnb's flattening)."""
    flat = t.reshape(-1).float()
    pad = -flat.numel() % block
    return torch.nn.functional.pad(flat, (0, pad), value=float("nan")).view(-1, block)


grid = pytest.mark.parametrize("kind", list(KINDS))
dtypes = pytest.mark.parametrize("dtype", list(DTYPES))


# -- properties ----------------------------------------------------------------------------
@grid
@dtypes
@given(data=st.data())
@SETTINGS
def test_error_at_most_half_a_step(kind, dtype, device, data):
    """|w - deq| <= half the gap between the two codebook entries around w / absmax, times absmax.

    Except where absmax < 1e-38 (float32 subnormals): bnb floors the absmax at 1e-38 before
    taking its reciprocal, so those values shrink toward 0, by at most the block's absmax."""
    w = data.draw(weights(dtype)).to(device)
    block = data.draw(st.sampled_from(BLOCKS[:3]))
    q = quantize_tensor(w, make(kind, block=block))
    deq = raw_dequantize(q)
    wb, db = blocks_of(w, block), blocks_of(deq, block)
    absmax = wb.nan_to_num().abs().amax(1, keepdim=True)
    s = (wb / absmax).nan_to_num(nan=0.0).clamp(-1, 1)  # an all-zero block: s = 0
    code = torch.tensor(sorted(set(CODEBOOKS[kind])), device=device)
    hi = code[torch.searchsorted(code, s).clamp(max=len(code) - 1)]
    lo = code[(torch.searchsorted(code, s, right=True) - 1).clamp(min=0)]
    rounding = (wb.abs() + db.abs()) * 2**-22  # float32 rounding of w / absmax and of code * absmax
    bound = torch.where(absmax < 1e-38, absmax, (hi - lo) / 2 * absmax + rounding)
    ok = ((wb - db).abs() <= bound) | wb.isnan()
    assert ok.all(), (wb[~ok], db[~ok], bound.expand_as(wb)[~ok])


@grid
@dtypes
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@given(data=st.data())
@SETTINGS
def test_requantizing_the_dequantized_weight_is_identity(kind, dtype, double_quant, device, data):
    """quantize(dequantize(q)) == q.

    FP4 has two zeros, and bnb sends values in (0, 0.0026 * absmax] to index 8 (the -0 pattern)
    but exact zeros to index 0 (+0); both decode to zero, which comes back as index 0.

    With double quantization the absmaxes come back as their 8-bit approximations, so the nested
    statistics change; the 4-bit codes must not, in every block whose approximate absmax is
    positive. (It can be zero or negative: the 8-bit error is relative to the largest deviation
    from the mean in a group of 256 blocks, so a block far smaller than the others can flip sign,
    in bnb too: see test_double_quant_can_flip_a_small_block.)

    Blocks of float32 subnormals (absmax < 1e-38) are left out: bnb's floor on the absmax shrinks
    them toward zero, and what is lost does not come back."""
    w = data.draw(weights(dtype)).to(device)
    block = data.draw(st.sampled_from(BLOCKS[:3]))
    cfg = make(kind, block=block, double_quant=double_quant)
    q = quantize_tensor(w, cfg)
    q2 = quantize_tensor(raw_dequantize(q), cfg)
    codes, codes2 = unpack_nibbles(q.codes, w.numel()), unpack_nibbles(q2.codes, w.numel())
    if kind == "fp4":
        codes = torch.where(codes == 8, 0, codes)
    normal = blocks_of(w, block).nan_to_num().abs().amax(1) >= 1e-38
    kept_blocks = normal & (block_absmax(q) > 0)
    kept = kept_blocks.repeat_interleave(block)[: w.numel()]
    assert torch.equal(codes2[kept], codes[kept])
    if not double_quant:
        assert torch.equal(q2.absmax[normal], q.absmax[normal])


@grid
@dtypes
@given(data=st.data())
@SETTINGS
def test_zero_is_exact_and_order_is_kept_within_a_block(kind, dtype, device, data):
    w = data.draw(weights(dtype)).to(device)
    mask = torch.from_numpy(data.draw(arrays(np.bool_, tuple(w.shape)))).to(device)
    w = torch.where(mask, torch.zeros_like(w), w)
    block = data.draw(st.sampled_from(BLOCKS[:3]))
    deq = raw_dequantize(quantize_tensor(w, make(kind, block=block)))
    assert (deq[mask] == 0).all()
    wb, db = blocks_of(w, block), blocks_of(deq, block)
    order = wb.nan_to_num(nan=float("inf")).argsort(dim=1, stable=True)
    ws, ds = wb.gather(1, order), db.gather(1, order)
    valid = ~ws.isnan()
    steps_ok = (ds[:, 1:] >= ds[:, :-1]) | ~valid[:, 1:]  # padding sorts last
    assert steps_ok.all()


@given(codes=arrays(np.uint8, st.integers(0, 300), elements=st.integers(0, 15)))
@settings(max_examples=50, deadline=None)
def test_pack_unpack_round_trip(codes):
    c = torch.from_numpy(codes)
    padded = torch.nn.functional.pad(c, (0, c.numel() % 2))
    packed = pack_nibbles(padded)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-c.numel() // 2)
    assert torch.equal(unpack_nibbles(packed, c.numel()), c)
    if c.numel() >= 2:  # bnb's order: the first code in the high nibble
        assert packed[0].item() == (codes[0] << 4 | codes[1])


@grid
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@dtypes
def test_save_load_is_bit_exact_and_nbytes_is_what_is_stored(kind, double_quant, dtype, device):
    torch.manual_seed(0)
    w = torch.randn(37, 501).to(DTYPES[dtype]).to(device)  # odd numel, partial last block
    cfg = make(kind, block=64, double_quant=double_quant)
    q = quantize_tensor(w, cfg)
    with tempfile.TemporaryDirectory() as d:
        q.save(Path(d) / "q.safetensors")
        back = QTensor.load(Path(d) / "q.safetensors")
    assert back.equal(q.to("cpu")) and back.dtype == DTYPES[dtype]
    assert torch.equal(back.dequantize(), q.dequantize().cpu())
    n, blocks = w.numel(), -(-w.numel() // 64)
    stats = blocks + 4 * -(-blocks // 256) + 4 if double_quant else 4 * blocks
    assert q.codes.dtype == torch.uint8 and q.nbytes == -(-n // 2) + stats
    assert q.bits_per_weight == pytest.approx(cfg.bits_per_weight(tuple(w.shape)))


@grid
def test_non_finite_weights_are_a_clear_error(kind):
    for bad in (float("nan"), float("inf"), float("-inf")):
        w = torch.randn(4, 64)
        w[1, 3] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            quantize_tensor(w, make(kind))


@grid
def test_all_zero_and_constant_blocks(kind, device):
    w = torch.zeros(3, 128, device=device)
    w[1] = 0.37  # one row: two constant blocks
    w[2, :64] = -5.0
    q = quantize_tensor(w, make(kind, block=64))
    assert torch.equal(q.absmax[:2], torch.zeros(2, device=device))  # bnb stores 0 for a zero block
    assert torch.equal(q.dequantize(), w)  # a constant block is +-absmax * 1.0: exact


def test_bad_parameters_say_what_is_valid():
    with pytest.raises(SpecError, match="block=100 is not supported; choose one of 32, 64, 128"):
        quantize_tensor(torch.randn(4, 576), "nf4:block=100")
    with pytest.raises(SpecError, match="no parameter 'group'"):
        quantize_tensor(torch.randn(4, 576), "fp4:group=64")
    with pytest.raises(SpecError, match="2-D"):
        quantize_tensor(torch.randn(576), "nf4")


@grid
def test_blocks_cross_rows_and_a_partial_last_block_has_its_own_absmax(kind):
    """576 is not a multiple of 128 or 256: blocks run over the flattened weight, as in bnb."""
    torch.manual_seed(1)
    w = torch.randn(3, 576)  # 1728 = 6 * 256 + 192
    q = quantize_tensor(w, make(kind, block=256))
    assert q.absmax.shape == (7,)
    assert q.absmax[-1] == w.reshape(-1)[1536:].abs().max()
    assert q.absmax[2] == w.reshape(-1)[512:768].abs().max()  # rows 0 and 1 share block 2
    assert quantize_tensor(w, "nf4:block=256").config.spec() == "nf4:block=256"


# -- golden: bitsandbytes on the CPU ----------------------------------------------------------
@pytest.fixture
def bnb():
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    # bnb's fallback dequantization (odd widths) goes through torch.compile: run it eagerly, the
    # same arithmetic without a compile per shape.
    with torch._dynamo.config.patch(disable=True):
        yield F


def assert_same_as_bnb(F, w: torch.Tensor, kind: str, block: int, double_quant: bool):
    q = quantize_tensor(w, make(kind, block=block, double_quant=double_quant))
    packed, state = F.quantize_4bit(w, blocksize=block, compress_statistics=double_quant, quant_type=kind)
    assert torch.equal(q.codes, packed.view(-1))
    if double_quant:
        assert torch.equal(q.absmax, state.absmax) and torch.equal(q.absmax2, state.state2.absmax)
        assert torch.equal(q.offset, state.offset)
    else:
        assert torch.equal(q.absmax, state.absmax)
    ours, theirs = q.dequantize(), F.dequantize_4bit(packed, state)
    assert ours.dtype == theirs.dtype == w.dtype
    assert torch.equal(ours, theirs)  # every value; a zero equals a zero of either sign
    if bnb_decodes_fp4_zero_as_its_table(w.shape[-1]):  # and down to the sign of zero
        bits = torch.int16 if ours.itemsize == 2 else torch.int32
        assert torch.equal(ours.view(bits), theirs.view(bits))


def bnb_decodes_fp4_zero_as_its_table(width: int) -> bool:
    """Whether bnb's CPU dequantization reads FP4's code 8 as -0.0, as its `fp4_lut` (and ours) do.

    Its scalar C kernel does. Its AVX-512 kernel, and the torch fallback it takes for odd widths
    and, on AVX-512 hosts, for blocks of 2048 or more, read +0.0: there the sign of a zero weight
    depends on the host's CPU, and only the values are compared (measured on an AVX-512 Xeon:
    blocks of 64 and 4096 both gave +0.0 where the table gives -0.0)."""
    return width % 2 == 0 and torch.backends.cpu.get_cpu_capability() != "AVX512"


@grid
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("block", BLOCKS, ids=[f"b{b}" for b in BLOCKS])
@dtypes
def test_same_bytes_as_bitsandbytes(bnb, kind, double_quant, block, dtype):
    """25300 values: a partial last block at every block size, 396 blocks of 64 (two nested
    blocks of 256, the second partial)."""
    torch.manual_seed(block)
    w = (torch.randn(23, 1100) * torch.rand(23, 1).pow(4)).to(DTYPES[dtype])
    assert_same_as_bnb(bnb, w, kind, block, double_quant)


@grid
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_same_bytes_as_bitsandbytes_odd_numel(bnb, kind, double_quant):
    torch.manual_seed(2)
    assert_same_as_bnb(bnb, torch.randn(37, 501), kind, 64, double_quant)  # odd width: bnb's torch fallback


@grid
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_same_bytes_as_bitsandbytes_on_awkward_values(bnb, kind, double_quant):
    """An all-zero block, constant blocks, huge and tiny magnitudes, float32 subnormals (where
    bnb floors the absmax at 1e-38 before taking its reciprocal), and a zero partial block."""
    torch.manual_seed(3)
    blocks = torch.randn(12, 64)
    blocks[0] = 0.0
    blocks[1] = 3.0
    blocks[2] = -1e-3
    blocks[3] *= 1e30
    blocks[4] = torch.linspace(-1, 1, 64) * 3e38  # near float32 max
    blocks[5] *= 1e-30
    blocks[6] *= 1e-40  # subnormal
    blocks[7, ::2] = 0.0
    w = torch.cat([blocks.reshape(-1), torch.zeros(12)]).reshape(2, -1)  # (2, 390)
    assert_same_as_bnb(bnb, w, kind, 64, double_quant)


@grid
def test_double_quant_can_flip_a_small_block(bnb, kind):
    """The 8-bit error of the nested absmax is relative to the largest deviation from the mean
    in its group of 256 blocks: next to a block of absmax 100, a block of absmax 1e-4 comes back
    with absmax -0.076, in bnb and here alike."""
    w = torch.ones(300, 64)
    w[0] = 100.0
    w[1] = torch.linspace(-1e-4, 5e-5, 64)
    q = quantize_tensor(w, make(kind, double_quant=True))
    assert block_absmax(q)[1] < 0
    assert_same_as_bnb(bnb, w, kind, 64, True)


def test_nested_quantization_of_a_block_too_small_to_invert(bnb):
    """Double quantization sees absmax - mean; when all blocks are equal those are zeros or
    denormals below 2.9e-39, whose inverse overflows: zeros then give 0 * inf = NaN, which bnb
    stores as code 0. Found by hypothesis (NaN once indexed out of the code table)."""
    from quantbench.formats.nf4 import quantize_dynamic

    x = torch.cat([torch.full((5,), 8.9683e-44), torch.zeros(5), torch.full((3,), -4e-44)])
    codes, absmax = quantize_dynamic(x)
    ref_codes, state = bnb.quantize_blockwise(x, blocksize=256)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, state.absmax)


@pytest.mark.slow
def test_same_bytes_as_bitsandbytes_on_the_embedded_model(bnb):
    from quantbench.sources import load_reference

    ref = load_reference()
    layer = ref.model.model.layers[7]
    for w in (layer.self_attn.k_proj.weight, layer.mlp.down_proj.weight):  # (192, 576), (576, 1536)
        for kind in KINDS:
            for block, double_quant in ((64, True), (4096, False)):
                assert_same_as_bnb(bnb, w.detach(), kind, block, double_quant)
                assert_same_as_bnb(bnb, w.detach().to(torch.bfloat16), kind, block, double_quant)


@pytest.mark.parametrize("n", [576 * 100, 576 * 100 + 7])
def test_stored_tensors_own_exactly_their_bytes(n, tmp_path):
    """Double quantization pads the absmaxes to whole blocks of 256; what the QTensor keeps must
    not be a view into that padded buffer (uncounted memory, and safetensors refuses to save it)."""
    from safetensors.torch import save_model
    from quantbench.layers import QLinear

    w = torch.randn(n // 576 if n % 576 == 0 else 1, 576 if n % 576 == 0 else n)
    q = quantize_tensor(w, "nf4:block=64,double_quant=true")
    for name, t in q.tensors().items():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
    save_model(QLinear(q, None), str(tmp_path / "q.safetensors"))
