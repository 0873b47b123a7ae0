"""ggml's first block types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, 32 weights per block.

Byte-identical to llama.cpp's `quantize_row_q*_ref` (ggml-quants.c) and to gguf-py's
`gguf.quants.quantize`, which mirrors them, and on the way back to `gguf.quants.dequantize`. The
one place the two references disagree is a block whose largest, smallest or largest-magnitude
value is a zero and that holds -0.0: ggml's scan keeps the first zero it meets (or +0), numpy's
min/argmax may return the other, and the stored zero scale or minimum differs in its sign bit.
We follow ggml there. Blocks so small that 1/d overflows get codes 0, as in both references.
One scale per block, stored as fp16; the `_1` types add an fp16 minimum (an offset):

    Q8_0  (34 B)  | d f16 | qs int8[32] |                               w = d * q
    Q4_0  (18 B)  | d f16 | qs[16] |                                    w = d * (q - 8)
    Q4_1  (20 B)  | d f16 | m f16 | qs[16] |                            w = d * q + m
    Q5_0  (22 B)  | d f16 | qh[4] | qs[16] |                            w = d * (q - 16)
    Q5_1  (24 B)  | d f16 | m f16 | qh[4] | qs[16] |                    w = d * q + m

    qs[j], j < 16:  bits 0-3 = low nibble of q[j], bits 4-7 = low nibble of q[j + 16]
    qh (uint32 LE): bit j = bit 4 of q[j]            (the fifth bit of the 5-bit types)

Choice of scale: the symmetric types divide by the signed value of largest magnitude (the first
one, on ties), so that value maps exactly to the lowest code: d = max / -8 (Q4_0), max / -16
(Q5_0); Q8_0 uses amax / 127. The `_1` types spread [min, max] over 2**bits - 1 steps.
Rounding: Q8_0 rounds halves away from zero (C `roundf`); Q4_x/Q5_x add 0.5 (8.5, 16.5 with the
offset) and truncate, which is the same for the non-negative values they round.

Two paths per type. The fast one is two fused kernels (see `fused`): `blocks` finds each
block's extremes and writes its codes, `fields` computes its fp16 scale (and minimum). `fields`
flags the blocks where ggml's scan order or the sign of a zero decides a byte (a tie between +a
and -a for the largest magnitude, a zero extreme, a scale too small to invert), and `exact`
redoes just those, step by step as ggml does. It also flags blocks holding a NaN or Inf or whose
fp16 scale overflows, so that the weight needs no separate pass to be checked
(`GGUFFormat.quantize` then says what is wrong).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from gguf import GGMLQuantizationType as T

from .fused import fused
from .ggml_codec import BlockCodec, bits_le, fdiv, f16_bytes, f16_value, register_codec, roundf, signed_absmax, unbits_le


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d, or 0 where d is 0 (an all-zero block), as `id = d ? 1.0f/d : 0.0f` in ggml."""
    return torch.where(d == 0, torch.zeros_like(d), fdiv(1.0, d))


def _codes(x: torch.Tensor, offset: torch.Tensor | None, inv: torch.Tensor, add: float, top: int) -> torch.Tensor:
    """C's `MIN(top, (int8_t)((x - offset) * inv + add))` for values >= 0, as uint8 codes.

    The float-to-int8 conversion truncates toward zero, as C's cast does. Where 1/d overflowed
    (a block of denormal-small weights) the value is inf or NaN and C's conversion yields 0
    (x86's "integer indefinite" 0x80000000 has a zero low byte); gguf-py's numpy cast agrees.
    """
    v = x * inv if offset is None else (x - offset).mul_(inv)
    overflow = torch.isinf(inv)  # (n, 1)
    if bool(overflow.any()):
        v = torch.where(overflow, torch.zeros_like(v), v.add_(add))
    else:
        v.add_(add)
    return v.to(torch.int8).clamp_(max=top).view(torch.uint8)  # codes <= 16 or 32 fit int8


def _first_zero_sign(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ggml scans a block with `if (x < min) min = x`: when the extreme v (n, 1) is a zero, it is
    the block's first zero, with that zero's sign. torch's amin/amax may return either zero."""
    z = (v == 0)[:, 0]
    if not bool(z.any()):
        return v
    rows = x[z]
    first = (rows == 0).to(torch.uint8).argmax(dim=-1, keepdim=True)
    return torch.where(z[:, None], torch.zeros_like(v), v).index_put((z,), rows.gather(-1, first))


def _symmetric_exact(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes in [0, 2**bits) and the scale d for Q4_0/Q5_0: x (n, 32) -> (n, 32) uint8, (n, 1)."""
    half = 2 ** (bits - 1)
    d = fdiv(signed_absmax(x, -1)[1], -half)  # (n, 1): the largest |x| maps to code 0
    return _codes(x, None, _inverse(d), half + 0.5, 2**bits - 1), d


def _affine_exact(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scale and minimum for Q4_1/Q5_1: (n, 32) uint8, (n, 1), (n, 1)."""
    lo = _first_zero_sign(x, x.amin(dim=-1, keepdim=True))  # amin and amax: aminmax is slower
    hi = _first_zero_sign(x, x.amax(dim=-1, keepdim=True))
    d = fdiv(hi - lo, 2**bits - 1)
    return _codes(x, lo, _inverse(d), 0.5, 2**bits - 1), d, lo


def _nibbles(q: torch.Tensor, out: torch.Tensor) -> None:
    """(n, 32) uint8 codes < 16 -> out (n, 16): q[j] in the low nibble, q[j + 16] in the high one.
    One uint8 add (lo + 16 * hi, the fields are disjoint) instead of a shift and an or."""
    torch.add(q[:, :16], q[:, 16:], alpha=16, out=out)


def _unnibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) bytes -> (n, 32) codes, the inverse of `_nibbles`, each half written in place."""
    out = torch.empty(qs.shape[0], 2, 16, dtype=torch.uint8, device=qs.device)
    torch.bitwise_and(qs, 0xF, out=out[:, 0])
    torch.bitwise_right_shift(qs, 4, out=out[:, 1])
    return out.view(-1, 32)


def _fifth_bits(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) 5-bit codes -> (n, 4) bytes: the uint32 `qh` whose bit j is bit 4 of q[j]."""
    return bits_le(q >> 4)


def _fifth_halves(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) float32 5-bit codes -> (n, 2) int16: `qh` (bit j = bit 4 of q[j]) as two little-endian
    halves, each a sum over the same 16 columns pairs (j, j + 16) that `_nibble_bytes` reads, so
    that a kernel computes both in one loop.

    The sums are in float32: each half is a sum of distinct powers of two below 2**16, exact in any
    order, and inductor reduces float32 lanes with shuffles where it reduces int32 lanes through
    memory (the Q5 code kernels ran 1.5x faster: 21.3 -> 14.1 ms for Q5_1 on a 4096 x 4096 matrix)."""
    p = torch.exp2(torch.arange(16, device=q.device, dtype=torch.float32))  # bit j's value
    lo = ((q[:, :16] >= 16).to(torch.float32) * p).sum(dim=-1)  # codes < 32: bit 4 is q >= 16
    hi = ((q[:, 16:] >= 16).to(torch.float32) * p).sum(dim=-1)
    return torch.stack([lo, hi], dim=-1).to(torch.int32).to(torch.int16)  # < 2**16: wraps to the same bits


def _nibble_bytes(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) float32 codes < 16 -> (n, 16) uint8: q[j] in the low nibble, q[j + 16] in the high
    one, as `_nibbles`. The byte is formed in float32 (exact: integers below 256) and converted
    once; inductor's int32 -> uint8 conversion of a vector is slow (Q4_1's kernel: 7.4 -> 5.5 ms)."""
    return (q[:, :16] + q[:, 16:] * 16).to(torch.uint8)


def _low4(q: torch.Tensor) -> torch.Tensor:
    """The low four bits of float32 5-bit codes (n, 32)."""
    return q - (q >= 16).to(torch.float32) * 16


# -- the fast path: a block pass and a field pass --------------------------------------------
# Two fused kernels per type (a codec's `blocks` and `fields`). `blocks` makes the one pass over
# the weights: it reduces each block to its extremes, computes the scale and writes the codes,
# while the block is in cache. `fields` then computes the stored per-block values (the fp16
# fields, the flags) from the extremes, vectorised across blocks. Inductor vectorises a loop over
# blocks well for float math and poorly for fp16 conversions, `isinf`/`isfinite` and bool or uint8
# outputs: with those in the kernel that reduced each block, and the codes in a second pass over
# the weights, Q4_1 on a 4096 x 4096 matrix took 7.3 + 7.4 ms, against 8.3 ms for the one pass
# and 0.4 ms for the fields as here (2 cores). The codes are computed in float32, C's truncating
# cast of a non-negative value being `trunc`.

REDO, SUSPECT = 1, 2  # flag bits: redo the block exactly; a NaN/Inf weight or an fp16 scale overflow
_INF = float("inf")


def _flags(redo: torch.Tensor, suspect: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The flags (n,) int32 and their maximum, which says whether any block is flagged."""
    flags = redo.to(torch.int32) | suspect.to(torch.int32) << 1
    return flags, flags.amax()


def _is_inf(v: torch.Tensor) -> torch.Tensor:
    return v.abs() == _INF


def _not_finite(v: torch.Tensor) -> torch.Tensor:
    return ~(v.abs() < _INF)  # NaN compares false


def _q8_0_scale(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = fdiv(amax, 127)
    return d, torch.where(d == 0, torch.zeros_like(d), fdiv(1.0, d))


@fused
def _q8_0_blocks(x: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, None]:
    amax = x.abs().amax(dim=-1)  # from |x|: max(hi, -lo) could give -0.0 for a block of -0.0
    inv = _q8_0_scale(amax)[1]
    out[:, 2:] = roundf(x * inv[:, None]).to(torch.int8)  # integral values in [-127, 127]; `out` is int8
    return amax, None


@fused
def _q8_0_fields(amax: torch.Tensor) -> tuple[torch.Tensor, ...]:
    d, inv = _q8_0_scale(amax)
    d16 = d.to(torch.float16)
    return d16, *_flags(_is_inf(inv), _not_finite(amax) | _is_inf(d16))


def _symmetric_scale(hi: torch.Tensor, lo: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """Q4_0/Q5_0: the signed value of largest magnitude (the maximum on a tie, which the fields
    flag), d and 1/d."""
    mx = torch.where(hi >= -lo, hi, lo)
    d = fdiv(mx, -(2 ** (bits - 1)))
    return mx, d, fdiv(1.0, d)


def _symmetric_codes(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """C's `MIN(top, (int8_t)(x * id + half + 0.5f))` as float32 codes (n, 32) (the value is
    >= 0), and the block's extremes."""
    hi, lo = x.amax(dim=-1), x.amin(dim=-1)
    inv = _symmetric_scale(hi, lo, bits)[2]
    return (x * inv[:, None] + (2 ** (bits - 1) + 0.5)).trunc().clamp(max=2**bits - 1), hi, lo


def _symmetric_fields(hi: torch.Tensor, lo: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """Q4_0/Q5_0: d as fp16 and the flags, for blocks whose largest magnitude is one nonzero
    value (the others are flagged for redoing)."""
    mx, d, inv = _symmetric_scale(hi, lo, bits)
    d16 = d.to(torch.float16)
    redo = (hi == -lo) | (mx == 0) | _is_inf(inv)
    return d16, *_flags(redo, _not_finite(hi - lo) | _is_inf(d16))


def _affine_scale(hi: torch.Tensor, lo: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = fdiv(hi - lo, 2**bits - 1)
    return d, fdiv(1.0, d)


def _affine_codes(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """C's `MIN(top, (int8_t)((x - min) * id + 0.5f))` as float32 codes (n, 32) (the value is
    >= 0), and the block's extremes."""
    hi, lo = x.amax(dim=-1), x.amin(dim=-1)
    inv = _affine_scale(hi, lo, bits)[1]
    return ((x - lo[:, None]) * inv[:, None] + 0.5).trunc().clamp(max=2**bits - 1), hi, lo


def _affine_fields(hi: torch.Tensor, lo: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """Q4_1/Q5_1: d and m as fp16 and the flags, for blocks with nonzero extremes and a spread
    (the others are flagged for redoing)."""
    d, inv = _affine_scale(hi, lo, bits)
    d16, m16 = d.to(torch.float16), lo.to(torch.float16)
    redo = (lo == 0) | (hi == 0) | (d == 0) | _is_inf(inv)
    return d16, m16, *_flags(redo, _not_finite(hi - lo) | _is_inf(d16) | _is_inf(m16))


def _nibble_kernels(codes: Callable, fields: Callable, bits: int, start: int) -> tuple[Callable, Callable]:
    """The block and field kernels of a 4- or 5-bit type: `codes` and `fields` are the symmetric
    or the affine ones, the nibbles start at byte `start` of a block."""

    def blocks(x: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, hi, lo = codes(x, bits)
        if bits == 4:
            out[:, start:] = _nibble_bytes(q)
            return hi, lo, None
        out[:, start:] = _nibble_bytes(_low4(q))
        return hi, lo, _fifth_halves(q)

    def block_fields(hi: torch.Tensor, lo: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return fields(hi, lo, bits)

    return fused(blocks), fused(block_fields)


_q4_0_kernels = _nibble_kernels(_symmetric_codes, _symmetric_fields, 4, 2)
_q5_0_kernels = _nibble_kernels(_symmetric_codes, _symmetric_fields, 5, 6)
_q4_1_kernels = _nibble_kernels(_affine_codes, _affine_fields, 4, 4)
_q5_1_kernels = _nibble_kernels(_affine_codes, _affine_fields, 5, 8)


class _Legacy(BlockCodec):
    """A legacy type: the fast path (`blocks`, then `fields`) and `exact`, which writes each
    field straight into its bytes of `out` (n, type_size) and is run on the blocks `fields` flags.

    `blocks(x, out)` writes the codes at the end of each block into `out` viewed as `code_view`
    and returns the blocks' extremes ((n,) each) and the 5-bit types' `qh` as int16 halves (n, 2)
    (None for the others); `fields(*extremes)` returns the block's fp16 fields ((n,) float16 each,
    in the order they open the block), the flags (n,) int32 (REDO, SUSPECT) and their maximum.
    The fields and `qh` are stored as whole fp16 and int16 columns of `out` outside the kernels,
    which store a concatenation of byte fields slowly."""

    blocks: ClassVar
    fields: ClassVar
    code_view: ClassVar[torch.dtype] = torch.uint8
    screens = True

    @staticmethod
    def exact(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def quantize_blocks(cls, x: torch.Tensor, out: torch.Tensor) -> bool:
        *extremes, qh = cls.blocks(x, out.view(cls.code_view))
        *f16, flags, flagged = cls.fields(*extremes)
        for k, field in enumerate(f16):
            out.view(torch.float16)[:, k] = field
        if qh is not None:  # the 5-bit types' qh follows the fp16 fields
            out.view(torch.int16)[:, len(f16) : len(f16) + 2] = qh
        if not bool(flagged):
            return False
        redo = (flags & REDO).nonzero()[:, 0]
        if len(redo):
            out[redo] = cls.exact(x[redo], torch.empty_like(out[redo]))
        return bool((flags & SUSPECT).any())

    @classmethod
    def quantize_all(cls, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Compiled, the kernels make no large temporaries: one pass for the whole tensor."""
        if not cls.blocks.compiles_for(x):
            return super().quantize_all(x)
        out = torch.empty((x.shape[0], cls.type_size), dtype=torch.uint8, device=x.device)
        return out, cls.quantize_blocks(x, out)


@register_codec(T.Q8_0)
class Q8_0(_Legacy):
    f16_fields = slice(0, 2)
    blocks, fields = staticmethod(_q8_0_blocks), staticmethod(_q8_0_fields)
    code_view = torch.int8

    @staticmethod
    def exact(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        d = fdiv(x.abs().amax(dim=-1, keepdim=True), 127)  # (n, 1)
        inv = _inverse(d)
        q = roundf(x * inv)
        if bool(torch.isinf(inv).any()):  # denormal-small block: inf/NaN codes, 0 in C
            q = torch.where(torch.isfinite(q), q, torch.zeros_like(q))
        out[:, :2] = f16_bytes(d)
        out[:, 2:].view(torch.int8).copy_(q)  # integral values in [-127, 127]
        return out

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        return b[:, 2:].contiguous().view(torch.int8).float().mul_(f16_value(b[:, :2]))


@register_codec(T.Q4_0)
class Q4_0(_Legacy):
    f16_fields = slice(0, 2)
    blocks, fields = map(staticmethod, _q4_0_kernels)

    @staticmethod
    def exact(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        q, d = _symmetric_exact(x, 4)
        out[:, :2] = f16_bytes(d)
        _nibbles(q, out[:, 2:])
        return out

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        return _unnibbles(b[:, 2:]).float().sub_(8).mul_(f16_value(b[:, :2]))


@register_codec(T.Q4_1)
class Q4_1(_Legacy):
    f16_fields = slice(0, 4)
    blocks, fields = map(staticmethod, _q4_1_kernels)

    @staticmethod
    def exact(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        q, d, m = _affine_exact(x, 4)
        out[:, :2], out[:, 2:4] = f16_bytes(d), f16_bytes(m)
        _nibbles(q, out[:, 4:])
        return out

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        return _unnibbles(b[:, 4:]).float().mul_(f16_value(b[:, :2])).add_(f16_value(b[:, 2:4]))


@register_codec(T.Q5_0)
class Q5_0(_Legacy):
    f16_fields = slice(0, 2)
    blocks, fields = map(staticmethod, _q5_0_kernels)

    @staticmethod
    def exact(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        q, d = _symmetric_exact(x, 5)
        out[:, :2], out[:, 2:6] = f16_bytes(d), _fifth_bits(q)
        _nibbles(q & 0xF, out[:, 6:])
        return out

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        q = _unnibbles(b[:, 6:]).bitwise_or_(unbits_le(b[:, 2:6]) << 4)
        return q.float().sub_(16).mul_(f16_value(b[:, :2]))


@register_codec(T.Q5_1)
class Q5_1(_Legacy):
    f16_fields = slice(0, 4)
    blocks, fields = map(staticmethod, _q5_1_kernels)

    @staticmethod
    def exact(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        q, d, m = _affine_exact(x, 5)
        out[:, :2], out[:, 2:4], out[:, 4:8] = f16_bytes(d), f16_bytes(m), _fifth_bits(q)
        _nibbles(q & 0xF, out[:, 8:])
        return out

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        q = _unnibbles(b[:, 8:]).bitwise_or_(unbits_le(b[:, 4:8]) << 4)
        return q.float().mul_(f16_value(b[:, :2])).add_(f16_value(b[:, 2:4]))
