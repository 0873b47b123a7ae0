"""NF4 and FP4: the 4-bit codebooks of bitsandbytes, blockwise absmax scaling, and optional
double quantization of the block scales (Dettmers et al. 2023, "QLoRA", arXiv:2305.14314).

A weight is flattened row-major and cut into blocks of `block` consecutive values, exactly as
`bitsandbytes.functional.quantize_4bit` does. Each block stores its absmax; each value stores
the 4-bit index of the codebook entry nearest to value / absmax. Blocks run over the flattened
tensor, so when the row length is not a multiple of the block a block spans two rows, and when
the element count is not a multiple of the block the last block is partial: it is scaled by
the absmax of its own values (bnb's policy, matched byte for byte, including bnb's quirks:
that block's absmax is floored at 1e-38 and its values are divided by it rather than multiplied
by its reciprocal). An odd element count pads the last byte with the code of 0.0.

Packing (bnb's nibble order, two codes per byte, the first value in the high nibble):

    byte j = code[2j] << 4 | code[2j+1]          codes: (ceil(numel / 2),) uint8

Rounding: to the nearest codebook entry, ties (a value exactly on a midpoint) to the lower
entry, as `torch.bucketize` on the sorted midpoints does in bnb's CPU path. We do not call
bucketize (it is a slow per-element binary search on the CPU): the top 16 bits of a float32
pin it to an interval holding at most one midpoint, so a 65536-entry table of the code at the
interval's start, plus one comparison with that midpoint, gives the same index.

Double quantization (QLoRA section 3, bnb's `compress_statistics=True`): the block absmaxes
(float32) lose their mean (`offset`, float32) and are quantized in blocks of 256 to bnb's signed
8-bit dynamic map, with a float32 absmax per block of 256. That quantizer is bnb's CPU kernel
(csrc/cpu_ops.cpp, `quantize_cpu_impl`): it rounds value / absmax to a grid of 65536 points on
[-1, 1] and looks up the code nearest to the grid point, which is not always the code nearest
to the value; we reproduce it so the nested bytes match too.

On the CPU every stored byte equals bnb 0.50's `quantize_4bit`, and dequantization equals its
`dequantize_4bit` (tests/formats/test_nf4.py). bnb's CUDA kernels are another reference, not
checked here (no GPU); `offset` is a float32 mean, whose summation order is the device's.
bnb can hand the packed bytes out as another dtype (`quant_storage`, e.g. bfloat16 for FSDP):
that is a view of the same bytes, so we always store uint8 and `nbytes` is exact.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..spec import SpecError
from . import register_format
from .qtensor import FormatConfig, QTensor

BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bnb's quantize_4bit accepts
NESTED_BLOCK = 256  # block of the double quantization of the absmaxes, fixed in bnb

# NF4: quantiles of N(0, 1) with equal mass per bin, normalised to [-1, 1], with an exact 0
# (QLoRA appendix E; bitsandbytes `get_4bit_type("nf4")`, generated there by
# `create_normal_map(offset=0.9677083, use_extra_value=True)`). Index order = value order.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

# FP4 (E2M1, bias 2, no inf/nan): index bit 3 is the sign, bits 2..0 an exponent/mantissa
# pattern worth 0, 0.0625, 8, 12, 4, 6, 2, 3, divided by 12 to span [-1, 1] (bitsandbytes
# `get_4bit_type("fp4")`; the float values are those of `fp4_lut` in bnb's csrc/cpu_ops.cpp,
# which is what its CPU dequantization reads: index 8 is -0.0 there).
FP4_CODE = tuple(v / 12.0 for v in (0, 0.0625, 8, 12, 4, 6, 2, 3)) + tuple(
    -v / 12.0 for v in (0.0, 0.0625, 8, 12, 4, 6, 2, 3)
)
CODEBOOKS = {"nf4": NF4_CODE, "fp4": FP4_CODE}


@dataclass(frozen=True)
class NF4Config(FormatConfig):
    name = "nf4"
    block: int = 64  # values per absmax, over the flattened weight
    double_quant: bool = False  # quantize the absmaxes to 8 bits in blocks of 256 (QLoRA)

    def __post_init__(self) -> None:
        if self.block not in BLOCKS:
            raise SpecError(f"{self.name}: block={self.block} is not supported; choose one of {', '.join(map(str, BLOCKS))}")

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        n = shape[0] * shape[1]
        blocks = -(-n // self.block)
        if self.double_quant:
            scale_bits = 8 * blocks + 32 * -(-blocks // NESTED_BLOCK) + 32  # codes, absmax2, offset
        else:
            scale_bits = 32 * blocks
        return (8 * -(-n // 2) + scale_bits) / n


@dataclass(frozen=True)
class FP4Config(NF4Config):
    name = "fp4"


@dataclass(frozen=True, eq=False)
class NF4QTensor(QTensor):
    codes: torch.Tensor  # (ceil(numel / 2),) uint8, two codes per byte, first in the high nibble
    absmax: torch.Tensor  # (n_blocks,) float32; uint8 dynamic-map codes when double_quant
    absmax2: torch.Tensor | None = None  # (ceil(n_blocks / 256),) float32, double_quant only
    offset: torch.Tensor | None = None  # () float32, the mean subtracted before double_quant


# -- constant tables -------------------------------------------------------------------------
def dynamic_map() -> torch.Tensor:
    """bnb's signed 8-bit dynamic map, `create_dynamic_map(signed=True, max_exponent_bits=7)`
    (Dettmers 2015, arXiv:1511.04561): decade i = 0..6 holds 2**i values of each sign, the
    midpoints of `linspace(0.1, 1, 2**i + 1)` times 10**(i - 6); plus 0 and 1. (256,) sorted."""
    vals = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (10.0 ** (i - 6)) * ((edges[:-1] + edges[1:]) / 2.0)  # float32, as bnb rounds it
        vals += mids.tolist() + (-mids).tolist()
    return torch.tensor(sorted(vals), dtype=torch.float32)


@functools.cache
def _tables(kind: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(code (16,), first (65536,) uint8, thr (65536,) float32, order (16,) uint8 or None).

    Midpoints are bnb's: those of the codebook sorted by value (a stable sort, so FP4's +0 comes
    before its -0). For a float32 x whose top 16 bits are p, its position among the sorted
    entries is first[p] + (x > thr[p]): first[p] is the position at the lowest value of that
    interval, thr[p] the one midpoint inside it (+inf if none). `order` maps positions back to
    codebook indices (None for NF4, whose codebook is sorted).
    """
    code = torch.tensor(CODEBOOKS[kind], dtype=torch.float32)
    sorted_code, order = torch.sort(code, stable=True)
    mids = ((sorted_code[:-1] + sorted_code[1:]) / 2).numpy()  # (15,) float32
    prefix = np.arange(1 << 16, dtype=np.uint32) << 16
    with np.errstate(invalid="ignore"):  # the NaN bit patterns
        ends = np.stack([prefix, prefix | 0xFFFF]).view(np.float32).astype(np.float64)  # (2, 65536)
    ends = np.where(np.isnan(ends), np.where(prefix >> 31 == 1, -np.inf, np.inf), ends)  # NaN patterns
    lo, hi = ends.min(0), ends.max(0)
    first = np.searchsorted(mids, lo, side="left")  # number of midpoints < lo
    last = np.searchsorted(mids, hi, side="left")  # number of midpoints < hi
    assert (last - first <= 1).all(), "a 16-bit prefix interval holds two midpoints"
    thr = np.where(last > first, mids[np.minimum(first, len(mids) - 1)], np.inf).astype(np.float32)
    identity = bool((order == torch.arange(16)).all())
    return (
        code.to(device),
        torch.from_numpy(first.astype(np.uint8)).to(device),
        torch.from_numpy(thr).to(device),
        None if identity else order.to(torch.uint8).to(device),
    )


# -- 4-bit encoding ------------------------------------------------------------------------
class _Encoder:
    """Codebook indices of float32 values already divided by their absmax, written into a
    uint8 output; reuses its buffers (fresh allocations per chunk cost more than the math)."""

    def __init__(self, tables, n: int, device: torch.device):
        _, self.first, self.thr, self.order = tables
        self.key = torch.empty(n, dtype=torch.int32, device=device)
        self.mid = torch.empty(n, dtype=torch.float32, device=device)
        self.up = torch.empty(n, dtype=torch.bool, device=device)

    def __call__(self, scaled: torch.Tensor, out: torch.Tensor) -> None:
        n = scaled.numel()
        scaled = scaled.reshape(-1)
        key, mid, up = self.key[:n], self.mid[:n], self.up[:n]
        torch.bitwise_right_shift(scaled.view(torch.int32), 16, out=key)
        key.bitwise_and_(0xFFFF)  # the top 16 bits of each float32, as an index
        torch.index_select(self.first, 0, key, out=out)
        torch.index_select(self.thr, 0, key, out=mid)
        torch.gt(scaled, mid, out=up)
        out.add_(up)  # past the one midpoint inside the interval, if any
        if self.order is not None:
            out.copy_(torch.index_select(self.order, 0, out.int()))


def _quantize_4bit(flat: torch.Tensor, block: int, tables) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb's blockwise 4-bit quantization of a flat float32 tensor: (packed (ceil(n / 2),)
    uint8, absmax (n_blocks,) float32)."""
    n = flat.numel()
    full = n - n % block
    packed = torch.empty(-(-n // 2), dtype=torch.uint8, device=flat.device)
    blocks = flat[:full].view(-1, block)  # (full / block, block)
    absmax = torch.maximum(blocks.amax(dim=1), -blocks.amin(dim=1)).abs()  # max |x|; abs: no -0.0
    # bnb multiplies by the reciprocal, then clamps to [-1, 1]; no clamp is needed here:
    # |x * (1 / absmax)| <= 1 + 2**-23, whose top 16 bits are those of +-1.0.
    inv = (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)  # (full / block, 1)

    def encode_blocks(start: int, stop: int, chunk: int) -> None:  # values [start, stop)
        encode = _Encoder(tables, chunk, flat.device)
        scaled = torch.empty(chunk, dtype=torch.float32, device=flat.device)
        codes = torch.empty(chunk, dtype=torch.uint8, device=flat.device)
        for i in range(start, stop, chunk):
            rows = slice(i // block, min(i + chunk, stop) // block)
            s = scaled[: (rows.stop - rows.start) * block].view(-1, block)
            torch.mul(blocks[rows], inv[rows], out=s)
            c = codes[: s.numel()]
            encode(s, c)
            pack_nibbles(c, out=packed[i // 2 : (i + s.numel()) // 2])

    if flat.is_cuda or full <= _CPU_CHUNK:
        encode_blocks(0, full, max(full, block))
    else:  # see _CPU_CHUNK: each worker thread runs its share of chunks, ops inline
        workers = max(1, min(torch.get_num_threads(), full // _CPU_CHUNK))
        share = -(-full // workers // _CPU_CHUNK) * _CPU_CHUNK
        with ThreadPoolExecutor(workers) as pool:  # torch ops release the GIL
            list(pool.map(lambda k: encode_blocks(k * share, min(full, (k + 1) * share), _CPU_CHUNK), range(workers)))
    if full < n:  # the partial last block: bnb floors its absmax and divides by it
        tail = flat[full:]
        last = tail.abs().max().clamp(min=1e-38)
        codes = torch.zeros(n - full + n % 2, dtype=torch.uint8, device=flat.device)  # + a pad
        _Encoder(tables, codes.numel(), flat.device)(torch.cat([tail / last, tail.new_zeros(n % 2)]), codes)
        pack_nibbles(codes, out=packed[full // 2 :])  # an odd n pads with the code of 0.0
        absmax = torch.cat([absmax, last.reshape(1)])
    return packed, absmax


# On the CPU the blocks go through in chunks of this many values: the largest multiple of
# every block size (4096) below ATen's parallel grain (32768), so that each op runs inline on
# its thread, and we spread the chunks over torch.get_num_threads() threads ourselves. Letting
# every op of every chunk open its own OpenMP region costs more than it saves (several times
# more on a loaded machine), and one pass over the whole tensor falls out of the cache.
_CPU_CHUNK = 7 * 4096


def pack_nibbles(codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(2m,) uint8 codes < 16 -> (m,) bytes, the first code of each pair in the high nibble."""
    out = torch.bitwise_left_shift(codes[0::2], 4, out=out)
    return out.bitwise_or_(codes[1::2])


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_nibbles`: the first `n` codes, (n,) uint8."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n]


# -- double quantization of the absmaxes -----------------------------------------------------
@functools.cache
def _dynamic_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(dynamic map (256,), grid table (65536,) uint8): bnb's CPU lookup table, which maps
    grid point i (the value -1 + 2i/65535) to the first code whose upper midpoint is >= it."""
    code = dynamic_map()
    mids = 0.5 * (code[:-1] + code[1:])  # float32, as bnb computes them
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    table = torch.searchsorted(mids, grid, side="left").to(torch.uint8)
    return code.to(device), table.to(device)


def quantize_dynamic(x: torch.Tensor, block: int = NESTED_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb's CPU `quantize_blockwise` with the dynamic map: (codes (n,) uint8, absmax float32).

    Per block: v = x * (1 / absmax); the code is table[trunc((clamp(v, -1, 1) + 1) * 0.5 * 65535
    + 0.5)], every step in float32 as in csrc/cpu_ops.cpp. An all-zero block stores code 0."""
    _, table = _dynamic_tables(x.device)
    n = x.numel()
    blocks = -(-n // block)
    xb = torch.nn.functional.pad(x, (0, blocks * block - n)).view(blocks, block)
    am = torch.linalg.vector_norm(xb, float("inf"), dim=1)  # (blocks,)
    inv = torch.where(am > 0, 1.0 / am, 0.0)  # an all-zero block: no NaN from 0 * inf
    v = (xb * inv.unsqueeze(1)).clamp(-1.0, 1.0)
    # A block whose absmax is so small (< 2.9e-39) that 1 / absmax overflows: its zeros become
    # 0 * inf = NaN, which bnb stores as code 0 (checked against quantize_blockwise), as table[0].
    v = torch.where(torch.isnan(v), -1.0, v)
    grid = ((v + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int32)  # truncation, as the C cast
    codes = torch.where(am.unsqueeze(1) > 0, table[grid], 0)
    return codes.to(torch.uint8).reshape(-1)[:n], am


def dequantize_dynamic(codes: torch.Tensor, absmax: torch.Tensor, block: int = NESTED_BLOCK) -> torch.Tensor:
    """map[code] * absmax of its block, float32 (bnb's dequantize_blockwise)."""
    code, _ = _dynamic_tables(codes.device)
    return code[codes.long()] * absmax.repeat_interleave(block)[: codes.numel()]


# -- the formats ---------------------------------------------------------------------------
def quantize(w: torch.Tensor, cfg: NF4Config) -> NF4QTensor:
    """w: (out, in) float32 -> NF4QTensor; blocks run over the row-major flattened weight."""
    tables = _tables(cfg.name, w.device)
    packed, absmax = _quantize_4bit(w.reshape(-1), cfg.block, tables)
    parts: dict[str, torch.Tensor] = {"codes": packed, "absmax": absmax}
    if cfg.double_quant:
        offset = absmax.mean()  # the same torch reduction bnb uses
        parts["absmax"], parts["absmax2"] = quantize_dynamic(absmax - offset)
        parts["offset"] = offset
    return NF4QTensor(config=cfg, shape=tuple(w.shape), dtype=w.dtype, **parts)


def block_absmax(q: NF4QTensor) -> torch.Tensor:
    """The float32 absmax of every block, (n_blocks,), undoing double quantization."""
    if q.absmax2 is None:
        return q.absmax
    return dequantize_dynamic(q.absmax, q.absmax2) + q.offset


@functools.cache
def _byte_values(kind: str, device: torch.device) -> torch.Tensor:
    """(256, 2) float32: the codebook values of a byte's two codes, high nibble first."""
    code = _tables(kind, torch.device("cpu"))[0]
    b = torch.arange(256)
    return torch.stack([code[b >> 4], code[b & 0xF]], dim=1).to(device)


def dequantize(q: NF4QTensor) -> torch.Tensor:
    """(out, in) float32: code[index] * absmax of its block, one float32 multiply (as bnb).

    Each byte is looked up once for its two values (a 256-entry table), and the block scales
    are applied in place: fewer passes over memory than unpacking codes first, the same floats."""
    cfg: NF4Config = q.config
    n = q.numel
    blocks = -(-n // cfg.block)
    values = torch.nn.functional.embedding(q.codes.int(), _byte_values(cfg.name, q.codes.device)).view(-1)
    if values.numel() != blocks * cfg.block:  # a partial last block (or an odd pad code)
        values = torch.nn.functional.pad(values[:n], (0, blocks * cfg.block - n))
    values.view(blocks, cfg.block).mul_(block_absmax(q).unsqueeze(1))
    return values[:n].view(q.shape)


class _FourBit:
    qtensor_type = NF4QTensor
    quantize = staticmethod(quantize)
    dequantize = staticmethod(dequantize)


@register_format
class NF4Format(_FourBit):
    config_type = NF4Config
    description = "NF4 (QLoRA normal-float codebook), blockwise absmax, optional double quantization; = bitsandbytes"


@register_format
class FP4Format(_FourBit):
    config_type = FP4Config
    description = "FP4 (E2M1 codebook of bitsandbytes), blockwise absmax, optional double quantization; = bitsandbytes"
