"""The pieces every ggml block codec shares: the codec table, fp16 scale bytes, and ggml's rounding.

A codec turns blocks of weights into the bytes of one ggml block type and back, on
`(n_blocks, block_size)` float32 views, vectorised over all blocks (the shape of gguf-py's
`quants.py`, where each type is a class with `quantize_blocks`/`dequantize_blocks`). Codecs are
registered in `CODECS` by their `GGMLQuantizationType`; block and byte sizes come from gguf-py's
`GGML_QUANT_SIZES`, which mirrors ggml's `ggml_type_traits` table.

Rounding, stated once, because byte-exactness depends on it:
  * `nearest_int(v)` is ggml's helper of that name: it adds 1.5 * 2**23 in float32 and reads the
    low mantissa bits, so it rounds halves to EVEN (like `torch.round`), and for |v| > 4194303,
    inf or NaN it returns the same garbage integer ggml does. Where a value is provably within
    range, the k-quant searches call `torch.round` instead (identical there, and cheaper).
  * `roundf(v)` is C's `roundf`: halves away from zero (Q8_0 uses it).
  * `(int)(v + 0.5f)` / `(int8_t)(v + 8.5f)` in the legacy quantizers truncate toward zero.
All arithmetic is float32 in the order the C code writes it; libggml-base is built without FMA
contraction, so every product and sum is rounded on its own, as torch does it eagerly.
Divisions go through `fdiv`: torch computes `c / t` as `reciprocal(t) * c`, and on CUDA `t / c`
as `t * (1 / c)`, which differ from C's correctly rounded `c / t` in the last bit.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


class BlockCodec:
    """One ggml block type: `quantize_blocks` (n, block_size) f32 -> (n, type_size) uint8, written
    into `out` (a slice of the tensor's blocks, so nothing is copied twice), and back.

    A codec that `screens` its input finds NaN/Inf weights and fp16 scales that overflow on its
    own, in the pass it makes anyway: its `quantize_blocks` returns whether any block in `out`
    is suspect, and the caller checks the weight only then. One that does not is given finite
    weights only and its scales are checked after it (`quantize_all` reports it as suspect)."""

    ggml_type: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    chunk_blocks: ClassVar[int] = 1 << 14  # blocks per call: measured best for the legacy types (2 MB of weights)
    f16_fields: ClassVar[slice]  # the bytes of the fp16 scales (d, and dmin or m) in a block
    screens: ClassVar[bool] = False

    @staticmethod
    def quantize_blocks(x: torch.Tensor, out: torch.Tensor) -> bool | None:
        """Write the blocks of x into `out`; return whether one is suspect (None: not screened)."""
        raise NotImplementedError

    @classmethod
    def quantize_all(cls, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """All blocks of a tensor (n_blocks, block_size) -> (n_blocks, type_size) uint8 and whether
        a block may hold a NaN/Inf weight or an overflowing fp16 scale (always, unless `screens`).
        In chunks of `chunk_blocks`, so that the temporaries of each step stay small."""
        out = torch.empty((x.shape[0], cls.type_size), dtype=torch.uint8, device=x.device)
        suspect = not cls.screens
        for i in range(0, x.shape[0], cls.chunk_blocks):
            suspect |= bool(cls.quantize_blocks(x[i : i + cls.chunk_blocks], out=out[i : i + cls.chunk_blocks]))
        return out, suspect

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


CODECS: dict[GGMLQuantizationType, type[BlockCodec]] = {}


def register_codec(qtype: GGMLQuantizationType):
    def deco(cls: type[BlockCodec]) -> type[BlockCodec]:
        if qtype in CODECS:
            raise RuntimeError(f"ggml codec {qtype.name} registered twice")
        cls.ggml_type = qtype
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        CODECS[qtype] = cls
        return cls

    return deco


def fdiv(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """a / b correctly rounded in float32, as C divides, whichever operand is a Python number."""
    if not isinstance(a, torch.Tensor):
        a = torch.full_like(b, a)
    elif not isinstance(b, torch.Tensor):
        b = torch.full_like(a, b)
    return a / b


def signed_absmax(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(max |x|, the signed x there) along `dim` (kept), the first on ties, +0 when all are zero:
    ggml's scan `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`.

    Computed from amin and amax, because argmax over short rows is ten times slower: the row
    maximum wins when it is larger in magnitude, the minimum when it is; only when both +a and
    -a occur does the first index decide, and only then is argmax run.
    """
    hi, lo = x.amax(dim=dim, keepdim=True), x.amin(dim=dim, keepdim=True)
    pos = hi >= -lo
    amax = torch.where(pos, hi, -lo)
    mx = torch.where(pos, hi, lo)
    mx = torch.where(mx == 0, torch.zeros_like(mx), mx)  # all zero: the scan keeps its initial +0
    tie = (hi == -lo) & (hi != 0)
    if bool(tie.any()):
        first = x.gather(dim, x.abs().argmax(dim=dim, keepdim=True))
        mx = torch.where(tie, first, mx)
    return amax, mx


# -- rounding -------------------------------------------------------------------------------

def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's `nearest_int` bit for bit, as int32: halves to even, out-of-range values as ggml."""
    return ((v + 12582912.0).view(torch.int32) & 0x007FFFFF) - 0x00400000


def roundf(v: torch.Tensor) -> torch.Tensor:
    """C `roundf`, halves away from zero: trunc(v + copysign(0.49999997, v)).

    Adding the float just below 0.5 is exact where `v + 0.5` is not (0.49999997 + 0.5 rounds up
    to 1 in float32); checked against floor(v + 0.5) in float64 for every float32 in [0, 130],
    the range Q8_0 rounds. `torch.round` would round halves to even."""
    below_half = torch.tensor(0.49999997, dtype=v.dtype, device=v.device)
    return torch.trunc(v.add_(torch.copysign(below_half, v)))


# -- bytes ----------------------------------------------------------------------------------

def f16_pieces(d: torch.Tensor) -> list[torch.Tensor]:
    """(n, 1) float32 -> its fp16 (ggml's FP32_TO_FP16, round to nearest even) as two (n, 1)
    uint8, little-endian. Integer shifts rather than a view as bytes, which a compiled kernel
    cannot do across sizes; two pieces so that a caller's one `cat` writes them into a block."""
    h = d.to(torch.float16).view(torch.int16).to(torch.int32)
    return [(h & 0xFF).to(torch.uint8), ((h >> 8) & 0xFF).to(torch.uint8)]


def f16_bits(d: torch.Tensor) -> torch.Tensor:
    """float32 -> the int16 bits of its fp16 (round to nearest even), as ggml's FP32_TO_FP16."""
    return d.to(torch.float16).view(torch.int16)


def f16_bytes(d: torch.Tensor) -> torch.Tensor:
    """(n,) or (n, 1) float32 -> (n, 2) uint8: its fp16, little-endian."""
    return torch.cat(f16_pieces(d.reshape(-1, 1)), dim=-1)


def f16_value(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) float32, the inverse of `f16_bytes` (exact)."""
    return b.contiguous().view(torch.float16).float()


def or_fields(fields: torch.Tensor, width: int, dim: int = -2) -> torch.Tensor:
    """Pack small unsigned codes along `dim` into one uint8: field k lands at bit k * width.

    `fields` holds integer values below 2**width.
    """
    acc = fields.select(dim, 0)
    for k in range(1, fields.shape[dim]):  # ors, not a sum: elementwise, so it fuses when compiled
        acc = acc | fields.select(dim, k) << (k * width)
    return acc.to(torch.uint8)  # in the input's integer type until here: SIMD has no 8-bit shifts


def split_fields(packed: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """Inverse of `or_fields`: (..., m) uint8 -> (..., count, m), field k = bits [k*width, (k+1)*width)."""
    shifts = (torch.arange(count, device=packed.device, dtype=torch.uint8) * width).reshape(count, 1)
    return (packed.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def bits_le(bits: torch.Tensor) -> torch.Tensor:
    """(..., 8k) of 0/1 -> (..., k) uint8, bit i of the stream at bit i % 8 of byte i // 8."""
    return or_fields(bits.reshape(*bits.shape[:-1], -1, 8), 1, dim=-1)


def unbits_le(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `bits_le`: (..., k) uint8 -> (..., 8k) uint8 of 0/1.

    One table lookup per byte: entry b of the table is an int64 whose eight bytes are b's bits."""
    return _bit_bytes(packed.device)[packed.long()].view(torch.uint8).reshape(*packed.shape[:-1], -1)


@functools.cache
def _bit_bytes(device: torch.device) -> torch.Tensor:
    bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1  # (256, 8)
    return bits.to(torch.uint8).view(torch.int64).reshape(256).to(device)
