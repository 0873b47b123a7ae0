"""The gguf format: golden tests against gguf-py and libggml, properties, errors, persistence.

References: gguf-py's `gguf.quants.quantize`/`dequantize` (legacy types; dequantization of all),
libggml's `ggml_quantize_chunk` without an importance matrix (every type; through ctypes in
`tests/ggml_ref.py`, skipped with the reason when llama-cpp-python is absent).
"""

from __future__ import annotations

import contextlib
import warnings

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import ggml_ref
from quantbench import QTensor, quantize_tensor
from quantbench.formats import fused
from quantbench.formats import kquants
from quantbench.formats import kquants_search as search
from quantbench.formats.ggml_codec import bits_le, nearest_int, or_fields, split_fields, unbits_le
from quantbench.formats.gguf import GGUF_TYPES, GGUFConfig, GGUFQTensor, types_for_width
from quantbench.spec import SpecError

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The block codecs run many small torch ops; on a small shared machine two intra-op
    threads mostly wait for each other, so these tests use one (and restore the setting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["compiled", "eager"])
def path(request):
    """The codecs' two ways to run the same arithmetic: fused kernels compiled by inductor (the
    default on the CPU) and eager torch (CUDA, QUANTBENCH_COMPILE=0, no compiler)."""
    if request.param == "eager":
        with fused.eager():
            yield request.param
    else:
        yield request.param


LEGACY = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
KQUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
T = gguf.GGMLQuantizationType


def ours(w: np.ndarray, t: str) -> np.ndarray:
    return quantize_tensor(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)), f"gguf:{t}").blocks.numpy()


def ours_dequantized(blocks: np.ndarray, t: str) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[T[t]]
    rows, nbytes = blocks.shape
    q = GGUFQTensor.from_blocks(torch.from_numpy(blocks.copy()), t, (rows, nbytes // size * block))
    return q.dequantize().numpy()


def differing_blocks(a: np.ndarray, b: np.ndarray, t: str) -> int:
    size = gguf.GGML_QUANT_SIZES[T[t]][1]
    return int((a.reshape(-1, size) != b.reshape(-1, size)).any(axis=1).sum())


def _cases() -> dict[str, np.ndarray]:
    """(8, 512) float32 inputs: two super-blocks per row, 16 blocks of 32."""
    rng = np.random.default_rng(20240)
    shape = (8, 512)
    grid = rng.integers(-8, 8, shape) * 0.25
    grid[:, :32] = np.arange(32) - 15.5  # exact halves for every rounding rule
    grid[:, 32:64] = np.tile([2.0, -2.0], 16)  # +a and -a tie for the largest magnitude
    blocks = rng.standard_normal(shape)
    blocks[0] = 0.0  # all-zero blocks
    blocks[1] = 0.75  # constant positive
    blocks[2] = -3.0  # constant negative
    blocks[3, :32] = 0.0  # one zero block in a live super-block
    blocks[4, 16:32] = 1e-20  # a sub-block far below the others
    loud = rng.standard_normal(shape)
    loud[:, 0:16] *= 1e3  # one loud sub-block per super-block: the others' scales quantize to 0,
    loud[:, 256:272] *= 1e3  # where the k-quants keep their search codes
    return {
        "normal": rng.standard_normal(shape),
        "one_loud_sub_block": loud,
        "normal_small": rng.standard_normal(shape) * 1e-3,
        "uniform_pos": rng.uniform(0, 1, shape),
        "uniform_neg": -rng.uniform(0, 1, shape),
        "heavy_tail": rng.standard_cauchy(shape),
        "grid_ties": grid,
        "zero_const": blocks,
        "sparse": rng.standard_normal(shape) * (rng.random(shape) < 0.05),
        "tiny": rng.standard_normal(shape) * 1e-30,
        "denormal": rng.standard_normal(shape) * 1e-40,
        "huge": rng.standard_normal(shape) * 1e4,  # up to ~5e4: every fp16 scale and minimum fits
    }


CASES = {k: v.astype(np.float32) for k, v in _cases().items()}


# -- golden: gguf-py and libggml -------------------------------------------------------------

@pytest.mark.parametrize("case", [c for c in CASES if c != "sparse"])
@pytest.mark.parametrize("t", LEGACY)
def test_legacy_matches_gguf_py(t, case):
    w = CASES[case]
    with np.errstate(all="ignore"):  # gguf-py warns on the denormal blocks' inf inverse scale
        ref = gguf.quants.quantize(w, T[t])
    assert differing_blocks(ours(w, t), ref, t) == 0


def test_legacy_negative_zero_follows_ggml_not_numpy(path):
    """A block holding -0.0 where its min or max is zero: gguf-py's numpy min/argmax may pick
    the other zero than ggml's scan, so the two references differ in a zero scale's sign bit;
    we follow ggml (the first zero of the block)."""
    lib = ggml_ref.require_ggml()  # noqa: F841
    w = CASES["sparse"]
    assert np.signbit(w[w == 0]).any()
    for t in LEGACY:
        assert differing_blocks(ours(w, t), ggml_ref.quantize_chunk(w, T[t]), t) == 0


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("t", GGUF_TYPES)
def test_matches_libggml(t, case, path):
    ggml_ref.require_ggml()
    w = CASES[case]
    assert differing_blocks(ours(w, t), ggml_ref.quantize_chunk(w, T[t]), t) == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("t", GGUF_TYPES)
def test_matches_libggml_larger_random(t, seed, path):
    ggml_ref.require_ggml()
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((64, 1024)) * rng.lognormal(0, 2, (64, 1))).astype(np.float32)
    assert differing_blocks(ours(w, t), ggml_ref.quantize_chunk(w, T[t]), t) == 0


@pytest.mark.parametrize("case", ["normal", "grid_ties", "zero_const", "heavy_tail", "denormal", "huge"])
@pytest.mark.parametrize("t", GGUF_TYPES)
def test_dequantize_matches_gguf_py(t, case):
    blocks = ours(CASES[case], t)
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(blocks, T[t])
    np.testing.assert_array_equal(ours_dequantized(blocks, t), ref)


@pytest.fixture(scope="module")
def embedded_tensors():
    """A few tensors of the embedded model, read with gguf-py: {name: (ggml type, blocks)}."""
    from quantbench.sources.models import embedded_gguf_path

    reader = gguf.GGUFReader(embedded_gguf_path())
    wanted = {"blk.0.ffn_down.weight", "blk.7.ffn_down.weight", "blk.0.attn_k.weight", "token_embd.weight"}
    out = {}
    for t in reader.tensors:
        if t.name in wanted:
            data = np.array(t.data[:512] if t.name == "token_embd.weight" else t.data)
            out[t.name] = (t.tensor_type, data)
    return out


@pytest.mark.slow  # gguf-py's reader parses the whole file's metadata: ~13 s
def test_dequantize_embedded_model_blocks(embedded_tensors):
    """The model file's own Q4_1 and Q8_0 blocks dequantize exactly as gguf-py does."""
    for name, (qtype, blocks) in embedded_tensors.items():
        np.testing.assert_array_equal(ours_dequantized(blocks, qtype.name), gguf.quants.dequantize(blocks, qtype), err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("t", GGUF_TYPES)
def test_real_weights_match_references(t, embedded_tensors):
    """Real weights (the embedded model's, dequantized): byte-identical to libggml and, for the
    legacy types, to gguf-py. ffn_down rows have 1536 weights; attn_k and token_embd rows 576,
    which only the 32-weight types accept."""
    for name, (qtype, blocks) in embedded_tensors.items():
        w = gguf.quants.dequantize(blocks, qtype)
        if t not in types_for_width(w.shape[1]):
            continue
        got = ours(w, t)
        if t in LEGACY:
            assert differing_blocks(got, gguf.quants.quantize(w, T[t]), t) == 0, name
        if ggml_ref.available():
            assert differing_blocks(got, ggml_ref.quantize_chunk(w, T[t]), t) == 0, name


# -- the QTensor: what it stores, a GGUF file, persistence, devices ----------------------------

@pytest.mark.parametrize("t", GGUF_TYPES)
def test_blocks_are_the_gguf_bytes(t, tmp_path):
    """`q.blocks` goes into a GGUF file as it is and comes back identical."""
    w = CASES["normal"]
    q = quantize_tensor(torch.from_numpy(w), f"gguf:{t}")
    block, size = gguf.GGML_QUANT_SIZES[T[t]]
    assert q.ggml_type == T[t] and q.blocks.dtype == torch.uint8
    assert tuple(q.blocks.shape) == (w.shape[0], w.shape[1] // block * size)
    assert q.nbytes == q.blocks.numel() and q.bits_per_weight == pytest.approx(8 * size / block)
    assert q.config.bits_per_weight() == q.bits_per_weight

    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w", q.blocks.numpy(), raw_dtype=q.ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tensor,) = gguf.GGUFReader(path).tensors
    assert tensor.tensor_type == T[t] and list(tensor.shape) == [w.shape[1], w.shape[0]]
    np.testing.assert_array_equal(np.asarray(tensor.data), q.blocks.numpy())
    np.testing.assert_array_equal(gguf.quants.dequantize(np.asarray(tensor.data), T[t]), q.dequantize().numpy())


@pytest.mark.parametrize("t", GGUF_TYPES)
def test_save_load_bit_equal(t, tmp_path):
    q = quantize_tensor(torch.from_numpy(CASES["heavy_tail"]), f"gguf:{t}")
    q.save(tmp_path / "q.safetensors")
    back = QTensor.load(tmp_path / "q.safetensors")
    assert isinstance(back, GGUFQTensor) and back.equal(q) and back.config == q.config
    assert torch.equal(back.dequantize(), q.dequantize())


@pytest.mark.parametrize("t", ["Q4_0", "Q5_1", "Q3_K", "Q6_K"])
def test_device(t, device):
    """The same bytes on every device (CUDA runs where available)."""
    w = torch.from_numpy(CASES["normal"])
    q = quantize_tensor(w.to(device), f"gguf:{t}")
    assert q.blocks.device.type == device.type
    assert torch.equal(q.blocks.cpu(), quantize_tensor(w, f"gguf:{t}").blocks)
    assert torch.equal(q.dequantize().cpu(), quantize_tensor(w, f"gguf:{t}").dequantize())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("t", ["Q8_0", "Q4_1", "Q4_K", "Q6_K"])
def test_input_dtypes(t, dtype):
    """Weights of any float dtype are quantized from their float32 values (exact for fp16/bf16)."""
    w = torch.from_numpy(CASES["normal"]).to(dtype)
    assert torch.equal(quantize_tensor(w, f"gguf:{t}").blocks, quantize_tensor(w.float(), f"gguf:{t}").blocks)


def test_from_blocks_checks_shape():
    with pytest.raises(ValueError, match="expected uint8 blocks of shape"):
        GGUFQTensor.from_blocks(torch.zeros(4, 17, dtype=torch.uint8), "Q4_0", (4, 32))


# -- specs and errors -----------------------------------------------------------------------

def test_spec_forms():
    assert GGUFConfig(type="Q4_K").spec() == "gguf:Q4_K"
    q = quantize_tensor(torch.randn(2, 256), "gguf:q4_k")  # case-insensitive, bare value fills `type`
    assert q.config == GGUFConfig(type="Q4_K") and q.config.spec() == "gguf:Q4_K"
    assert quantize_tensor(torch.randn(2, 256), "gguf:type=Q6_K").ggml_type == T.Q6_K


@pytest.mark.parametrize("spec", ["gguf:Q9_K", "gguf:IQ4_XS", "gguf:F16"])
def test_unknown_type_lists_valid_types(spec):
    with pytest.raises(SpecError, match="choose one of Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K"):
        quantize_tensor(torch.randn(2, 256), spec)
    with pytest.raises(SpecError, match="needs parameter"):
        quantize_tensor(torch.randn(2, 256), "gguf")


def test_row_width_not_a_multiple_of_the_block():
    """576 = 18 x 32 is not a multiple of 256: the k-quants refuse it and say what fits."""
    with pytest.raises(SpecError, match=r"576 is not a multiple of the Q4_K block \(256 weights\); "
                       r"types that fit this width: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1"):
        quantize_tensor(torch.randn(4, 576), "gguf:Q4_K")
    with pytest.raises(SpecError, match="types that fit this width: none"):
        quantize_tensor(torch.randn(4, 100), "gguf:Q8_0")
    assert types_for_width(576) == list(LEGACY) and types_for_width(1536) == list(GGUF_TYPES)


def test_bad_inputs():
    with pytest.raises(SpecError, match="expected a 2-D weight"):
        quantize_tensor(torch.randn(256), "gguf:Q8_0")
    with pytest.raises(ValueError, match="overflows fp16"):
        quantize_tensor(torch.randn(4, 256) * 1e9, "gguf:Q8_0")


@pytest.mark.parametrize("t", LEGACY + KQUANTS)
def test_transposed_weight(t):
    """GPT-2's Conv1D stores the transpose: a non-contiguous (out, in) view quantizes to the same
    bytes as its contiguous copy (the kernels' outputs follow their input's strides)."""
    w = torch.randn(256, 384, generator=torch.Generator().manual_seed(3)).T  # (384, 256), strides (1, 384):
    # one k-quant block per row, so reshaping to blocks keeps the strides (the GPT-2 case)
    assert not w.is_contiguous()
    assert torch.equal(quantize_tensor(w, f"gguf:{t}").blocks, quantize_tensor(w.contiguous(), f"gguf:{t}").blocks)


@pytest.mark.parametrize("t", LEGACY + ("Q4_K",))
def test_nan_and_inf_are_refused(t, path):
    """The legacy codecs find NaN/Inf in their own pass over the blocks (no separate check of the
    weight): one bad value anywhere, in a block of ordinary weights, in a block where it is the
    only nonzero, or beside a huge value whose difference overflows, is named, never encoded."""
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in ((1, 3), (3, 255), (0, 0)):
            w = torch.randn(4, 256)
            w[0, :32] = 0.0
            w[where] = bad
            with pytest.raises(ValueError, match=f"gguf:{t}: the weight holds 1 NaN or Inf"):
                quantize_tensor(w, f"gguf:{t}")
    w = torch.randn(4, 256)
    w[2, 0], w[2, 1] = 3e38, float("nan")
    with pytest.raises(ValueError, match="1 NaN or Inf"):
        quantize_tensor(w, f"gguf:{t}")


def test_beyond_the_fp16_range():
    """|w| ~ 1e6: Q8_0's scale amax / 127 still fits fp16 and matches both references; Q4_1 would
    store the minimum itself in fp16 (max 65504), so it is refused rather than written as inf."""
    w = (np.random.default_rng(5).standard_normal((4, 256)) * 1e6).astype(np.float32)
    got = ours(w, "Q8_0")
    assert differing_blocks(got, gguf.quants.quantize(w, T.Q8_0), "Q8_0") == 0
    if ggml_ref.available():
        assert differing_blocks(got, ggml_ref.quantize_chunk(w, T.Q8_0), "Q8_0") == 0
    with pytest.raises(ValueError, match="gguf:Q4_1: a block scale overflows fp16"):
        ours(w, "Q4_1")


# -- properties -----------------------------------------------------------------------------

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)  # x 50 stays in fp16 range
scales = st.sampled_from([1.0, 1e-3, 1e-6, 50.0])


def weights(width: int):
    return st.tuples(arrays(np.float32, st.tuples(st.integers(1, 3), st.just(width)), elements=finite), scales)


def _legacy_fields(blocks: np.ndarray, t: str) -> tuple[np.ndarray, np.ndarray]:
    """The fp16 scale d and minimum m (0 for the symmetric types) of each block."""
    size = gguf.GGML_QUANT_SIZES[T[t]][1]
    b = blocks.reshape(-1, size)
    d = b[:, :2].copy().view(np.float16).astype(np.float64)
    m = b[:, 2:4].copy().view(np.float16).astype(np.float64) if t in ("Q4_1", "Q5_1") else np.zeros_like(d)
    return d, m


@settings(max_examples=40, deadline=None)
@given(data=weights(64), t=st.sampled_from(LEGACY))
def test_legacy_error_bound(data, t):
    """Each weight is within half a step of its value (a full step on the clipped side of the
    symmetric types, whose largest magnitude maps to -8 or -16 and the opposite end to +7 or +15),
    plus what storing d and m in fp16 costs: 2**-11 relative, or 2**-25 absolute in fp16's
    subnormal range, times the largest code."""
    w, scale = data
    w = (w * scale).astype(np.float32)
    blocks = ours(w, t)
    d, m = _legacy_fields(blocks, t)
    err = np.abs(ours_dequantized(blocks, t).astype(np.float64) - w).reshape(-1, 32)
    step = np.abs(d)
    qmax = {"Q8_0": 127, "Q4_0": 8, "Q4_1": 15, "Q5_0": 16, "Q5_1": 31}[t]
    halfsteps = 2.0 if t in ("Q4_0", "Q5_0") else 1.0
    fp16 = 2.0**-24  # at least twice fp16's rounding error, relative (x 2**-13) or subnormal
    bound = 0.5 * halfsteps * (step + fp16) + qmax * (step * 2.0**-10 + fp16) + np.abs(m) * 2.0**-10 + fp16
    assert (err <= bound).all()


@settings(max_examples=40, deadline=None)
@given(data=weights(64), t=st.sampled_from(LEGACY))
def test_legacy_idempotent(data, t):
    """quantize(dequantize(q)) == q for the legacy types: the dequantized block's extremes give
    back the same fp16 scale, and every value sits on a code. (The k-quants do not promise this:
    their scale search re-fits scales and minimums to the dequantized weights.) Two exceptions,
    both invisible in the values: a block whose fp16 scale underflowed to 0 keeps meaningless
    codes, which come back as 0; and a minimum of -0.0 comes back as +0.0 (so the input here
    holds no negative zeros, and a tiny negative minimum that fp16 rounds to -0.0 is compared
    without its sign)."""
    w, scale = data
    w = (w * scale).astype(np.float32) + np.float32(0.0)  # -0.0 + 0.0 = +0.0
    q = quantize_tensor(torch.from_numpy(w), f"gguf:{t}")
    again = quantize_tensor(q.dequantize(), f"gguf:{t}")
    assert torch.equal(again.dequantize(), q.dequantize())
    d, _ = _legacy_fields(q.blocks.numpy(), t)
    live = torch.from_numpy(d[:, 0] != 0)
    size = q.blocks.shape[1] // (w.shape[1] // 32)
    a, b = (unsigned_zero_min(x.blocks.reshape(-1, size), t)[live] for x in (again, q))
    assert torch.equal(a, b)


def unsigned_zero_min(blocks: torch.Tensor, t: str) -> torch.Tensor:
    """The `_1` types' blocks with an fp16 minimum of -0.0 (bytes 2-3: 00 80) made +0.0."""
    if t not in ("Q4_1", "Q5_1"):
        return blocks
    out = blocks.clone()
    neg_zero = (out[:, 2] == 0) & (out[:, 3] == 0x80)
    out[neg_zero, 3] = 0
    return out


# The code fields of each k-quant, and the byte that sets every code in them to 1 (the other
# fields 0): with codes all 0 and all 1, dequantization gives each weight's grid origin and step.
K_CODE_FIELDS = {
    "Q2_K": ([(16, 80, 0x55)], 3),
    "Q3_K": ([(0, 32, 0x00), (32, 96, 0x55)], 7),
    "Q4_K": ([(16, 144, 0x11)], 15),
    "Q5_K": ([(16, 48, 0x00), (48, 176, 0x11)], 31),
    "Q6_K": ([(0, 128, 0x11), (128, 192, 0x00)], 63),
}


def _grid(blocks: np.ndarray, t: str) -> tuple[np.ndarray, np.ndarray]:
    fields, _ = K_CODE_FIELDS[t]
    zero, one = blocks.copy(), blocks.copy()
    for lo, hi, byte in fields:
        zero[:, lo:hi] = 0
        one[:, lo:hi] = byte
    v0 = ours_dequantized(zero, t).astype(np.float64)
    return v0, ours_dequantized(one, t).astype(np.float64) - v0


@settings(max_examples=30, deadline=None)
@given(data=weights(256), t=st.sampled_from(KQUANTS))
def test_kquant_weights_take_their_nearest_grid_value(data, t):
    """After the scale search, every k-quant weight is rounded to the nearest value of its
    sub-block's stored grid origin + l * step, l = 0..nmax (ggml's final `nearest_int` pass):
    the error is never more than the distance to the nearest grid value, up to float rounding."""
    w, scale = data
    w = (w * scale).astype(np.float32)
    blocks = ours(w, t)
    origin, step = _grid(blocks, t)
    levels = np.arange(K_CODE_FIELDS[t][1] + 1)
    grid = origin[..., None] + step[..., None] * levels  # (rows, n, levels)
    nearest = np.abs(grid - w[..., None]).min(axis=-1)
    err = np.abs(ours_dequantized(blocks, t) - w)
    tol = 1e-5 * np.abs(grid).max(axis=-1) + 1e-30
    assert (err <= nearest + tol).all()


@settings(max_examples=30, deadline=None)
@given(data=weights(256), t=st.sampled_from(["Q8_0", "Q4_0", "Q5_0", "Q3_K", "Q6_K"]))
def test_zero_stays_zero_in_symmetric_types(data, t):
    """The types without a minimum have 0 on their grid: a zero weight dequantizes to 0 exactly."""
    w, scale = data
    w = (w * scale).astype(np.float32)
    w[:, ::3] = 0
    out = ours_dequantized(ours(w, t), t)
    assert (out[:, ::3] == 0).all()


@settings(max_examples=30, deadline=None)
@given(data=weights(256), t=st.sampled_from(GGUF_TYPES))
def test_order_preserved_within_a_sub_block(data, t):
    """One scale (and min) per sub-block and monotone rounding: if x_i <= x_j then x^_i <= x^_j."""
    w, scale = data
    w = (w * scale).astype(np.float32)
    sub = 32 if t in LEGACY or t in ("Q4_K", "Q5_K") else 16
    out = ours_dequantized(ours(w, t), t).reshape(-1, sub)
    order = np.argsort(w.reshape(-1, sub), axis=1, kind="stable")
    assert (np.diff(np.take_along_axis(out, order, axis=1), axis=1) >= 0).all()


@settings(max_examples=50, deadline=None)
@given(codes=arrays(np.uint8, st.tuples(st.integers(1, 4), st.sampled_from([1, 2, 4, 8]), st.integers(1, 40)),
                    elements=st.integers(0, 255)), width=st.sampled_from([1, 2, 4]))
def test_bit_fields_round_trip(codes, width):
    """The packing helpers: fields of `width` bits OR-ed into bytes come back out unchanged."""
    count = 8 // width
    fields = torch.from_numpy(codes[:, :1].repeat(count, axis=1) & ((1 << width) - 1))  # (r, count, m)
    packed = or_fields(fields, width, dim=-2)
    assert torch.equal(split_fields(packed, count, width), fields)
    bits = torch.from_numpy(codes.reshape(codes.shape[0], -1)[:, : (codes[0].size // 8) * 8] & 1)
    if bits.shape[1]:
        assert torch.equal(unbits_le(bits_le(bits)), bits)


# -- the fused path ---------------------------------------------------------------------------

def test_fused_falls_back_to_eager_when_compiling_fails(monkeypatch):
    """No C++ compiler (or an op inductor cannot lower): a warning, then the same bytes eagerly."""
    def broken(fn, **kwargs):
        def raise_(*args):
            raise RuntimeError("no compiler here")
        return raise_

    monkeypatch.setattr(torch, "compile", broken)
    f = fused.fused(lambda x: x * 2 + 1)
    x = torch.arange(4.0)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        assert torch.equal(f(x), x * 2 + 1)
    assert not f.compiles_for(x)
    assert torch.equal(f(x), x * 2 + 1)  # no second warning: it stays eager


def test_fused_runs_eagerly_inside_eager_block():
    calls = []

    def spy(x):
        calls.append(torch.compiler.is_compiling())
        return x + 1

    f = fused.fused(spy)
    with fused.eager():
        assert not f.compiles_for(torch.zeros(1))
        f(torch.zeros(3))
    assert calls == [False]


def test_fused_functions_from_one_factory_compile_apart():
    """Dynamo counts recompilations per code object, and gives up on a function past its limit
    (8): kernels made by one factory must not share that budget, or the later ones would run
    eagerly (as the legacy codecs' did, once). Here more factory-made kernels than the limit,
    each a different graph, all compile."""
    def make(op):
        def kernel(x):
            return op(x) + 1
        return fused.fused(kernel)

    ops = [torch.abs, torch.neg, torch.square, torch.floor, torch.ceil, torch.trunc, torch.round, torch.sign,
           torch.relu, torch.frac]  # exact: compiled and eager agree to the bit
    assert len(ops) > torch._dynamo.config.recompile_limit
    x = torch.rand(16) * 10 - 5
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the fallback's warning would fail here
        for op in ops:
            f = make(op)
            assert torch.equal(f(x), op(x) + 1) and f.compiles_for(x)


@settings(max_examples=60, deadline=None)
@given(data=weights(256), grid=st.booleans())
def test_q3_may_move_flags_every_sub_block_a_sweep_moves(data, grid):
    """Q3_K sweeps only the sub-blocks `_q3_may_move` flags, so it must flag every one that ggml's
    sweep would change, in each of the 5 sweeps: on any magnitudes, and on weights that lie on a
    grid, where the level ggml rounds to can fall exactly on a tie."""
    w, scale = data
    x = torch.from_numpy((np.round(w * 4) if grid else w * scale).astype(np.float32)).reshape(-1, 16).T  # (16, S)
    L, sumlx, suml2, zero = search._q3_start.eager(x, 4)
    for _ in range(5):
        maybe = search._q3_may_move.eager(x, L, sumlx, suml2, 4)
        L_next, sumlx, suml2, _ = search._q3_sweep.eager(x, L, sumlx, suml2, 4)
        moved = (L_next != L).any(0) & ~zero
        assert not (moved & ~maybe).any(), f"{int((moved & ~maybe).sum())} moved sub-blocks not flagged"
        L = L_next


def _nearest_int_codes(x: torch.Tensor, d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """ggml's requantization written out: nearest_int(x / d) (its mantissa bits) clamped, minus lo."""
    v = x.reshape(x.shape[0], -1, 16) / d[..., None]
    return (nearest_int(v).clamp(lo, hi) - lo).to(torch.uint8).reshape(x.shape[0], -1)


@settings(max_examples=40, deadline=None)
@given(x=arrays(np.float32, (2, 256), elements=st.floats(-3e7, 3e7, width=32)),
       d=arrays(np.float32, (2, 16), elements=st.sampled_from([0.0, 1.0, -1.0, 0.5, 3.0])),
       t=st.sampled_from(["Q3_K", "Q6_K"]), compiled=st.booleans())
def test_requantize_keeps_ggml_nearest_int_beyond_the_rounding_range(x, d, t, compiled):
    """The requantization kernels round (`torch.round`), which equals ggml's `nearest_int` only for
    |v| < 2**22; beyond, nearest_int reads mantissa bits (5e6 becomes -3791456, clamped to the
    lowest level where rounding gives the highest), and the kernels flag the chunk to be redone
    with those bits. Sub-blocks whose scale d is 0 keep the search's codes, whatever they hold."""
    kernel, lo, hi = {"Q3_K": (kquants._q3k_requantize, -4, 3), "Q6_K": (kquants._q6k_requantize, -32, 31)}[t]
    x, d = torch.from_numpy(x), torch.from_numpy(d)
    kept = torch.full((16,), 7, dtype=torch.uint8)
    with contextlib.nullcontext() if compiled else fused.eager():
        q = kquants._requantize(kernel, x, d, None, 16, lo, hi, lambda idx: kept.expand(len(idx), 16))
    expect = _nearest_int_codes(x, d, lo, hi)
    expect.view(-1, 16)[(d == 0).reshape(-1)] = 7
    assert torch.equal(q, expect)


def test_nearest_int_is_no_rounding_beyond_its_range():
    """The case the test above guards: at +-5e6, rounding and ggml's nearest_int part ways."""
    v = torch.tensor([5e6, -5e6, 4194302.5, -4194302.5])
    assert nearest_int(v).tolist()[:2] == [-3791456, 2582912]
    assert torch.equal(nearest_int(v[2:]).float(), torch.round(v[2:]))
