"""ggml's k-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: super-blocks of 256 weights (Kawrakow, llama.cpp
PR #1684), byte-identical to llama.cpp's reference quantizers `quantize_row_q*_K_ref` (what
`llama-quantize` runs without an importance matrix; libggml exports them as
`ggml_quantize_chunk(type, ..., imatrix=NULL)`), and dequantized as gguf-py's `dequantize` does.

A super-block has 8 sub-blocks of 32 (Q4_K, Q5_K) or 16 of 16 (Q2_K, Q3_K, Q6_K). Each
sub-block gets its own scale (and minimum) from a search in `kquants_search`; those are then
quantized to 4, 6 or 8 bits against one fp16 super-scale `d` (and `dmin`), and finally every
weight is rounded again against its quantized sub-block scale (unless that scale is 0, in
which case ggml keeps the codes of the search). Byte layouts, in file order:

    Q2_K (84 B)  | scales[16]: lo nibble scale, hi nibble min | qs[64] | d f16 | dmin f16 |
                 w = d * sc * q - dmin * m,  q in 0..3
    Q3_K (110 B) | hmask[32] | qs[64] | scales[12] (16 x 6 bit) | d f16 |
                 w = d * (sc - 32) * (q - 4),  q in 0..7, bit 2 of q in hmask
    Q4_K (144 B) | d f16 | dmin f16 | scales[12] (8 scales + 8 mins, 6 bit) | qs[128] |
                 w = d * sc * q - dmin * m,  q in 0..15
    Q5_K (176 B) | d f16 | dmin f16 | scales[12] | qh[32] | qs[128] |    q in 0..31
    Q6_K (210 B) | ql[128] | qh[64] | scales[16] int8 | d f16 |
                 w = d * sc * (q - 32),  q in 0..63

    2-bit fields (qs of Q2_K/Q3_K, qh of Q6_K), per half h of 128 weights:
        byte[32h + l] = q[128h + l] | q[128h + l + 32] << 2 | q[128h + l + 64] << 4 | q[.. + 96] << 6
    Q3_K hmask[l]: bit k = bit 2 of q[32k + l];      Q5_K qh[l]: bit k = bit 4 of q[32k + l]
    Q4_K/Q5_K qs, per 64 weights c:   byte[32c + l] = q[64c + l] & 15 | (q[64c + l + 32] & 15) << 4
    Q6_K ql, per half h:  byte[64h + l] = q[128h + l] & 15 | (q[128h + l + 64] & 15) << 4,
                          byte[64h + 32 + l] = q[128h + 32 + l] & 15 | (q[128h + 96 + l] & 15) << 4
    Q4_K/Q5_K scales (sc[j], m[j] 6 bit):   bytes 0-3:  sc[0..3] | (sc[4..7] >> 4) << 6
                                            bytes 4-7:  m[0..3]  | (m[4..7] >> 4) << 6
                                            bytes 8-11: sc[4..7] & 15 | (m[4..7] & 15) << 4
    Q3_K scales (s[j] 6 bit):  bytes 0-7: s[j] & 15 | (s[j + 8] & 15) << 4,
                               byte 8 + k: (s[k] >> 4) | (s[k + 4] >> 4) << 2 | (s[k + 8] >> 4) << 4 | ..
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType as T

from .fused import fused, seq_sum
from .ggml_codec import BlockCodec, fdiv, f16_bits, f16_value, nearest_int, or_fields, register_codec, split_fields
from .kquants_search import GROUP_MAX_EPS, make_q3_quants, make_qkx2_quants, make_qx_quants, scan_absmax


@fused
def _element_major(x: torch.Tensor, sub: int) -> torch.Tensor:
    """(B, 256) -> (sub, B * 256 / sub): the weights of each sub-block down a column. Compiled, the
    transpose runs in 8x8 tiles in registers: on a 16K-block chunk 3.3 ms, where eager torch takes
    7.4 ms and a stack of columns 12.6 ms (16 output streams)."""
    return x.reshape(-1, sub).t().contiguous()


def _positive_max(v: torch.Tensor) -> torch.Tensor:
    """max(0, max over the last dim), +0.0 when nothing is positive: ggml's `if (s > max) max = s`."""
    m = v.amax(dim=-1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _as_f16(d: torch.Tensor) -> torch.Tensor:
    """The float32 value of d's fp16, what a reader of the stored scale sees (`f16_value` of its bytes)."""
    return d.to(torch.float16).float()


def _from_two_bit_fields(qs: torch.Tensor) -> torch.Tensor:
    return split_fields(qs.reshape(-1, 2, 32), 4, 2).reshape(-1, 16, 16)


def _unpack_scale_min_k4(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d, m, md = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0xF) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


# -- after the search: scale codes, requantization, packing ----------------------------------
# Three fused steps per codec, each one kernel that inductor vectorises well: the sub-block
# scale codes (one value per sub-block), the requantized codes (one uint8 per weight, block-major),
# and the bit packing, done on int32 words that each hold four codes (SWAR), because a kernel
# that loads or stores uint8 vectors moves 8 bytes at a time through a buffer. The fields are then
# copied into their bytes of the blocks (`_store`).

# ggml rounds with `nearest_int(v)`, which reads the low mantissa bits of v + 1.5 * 2**23: a
# rounding (halves to even, as `torch.round`) only while |v| < 2**22. A compiled kernel reads those
# bits lane by lane (a view as int32 goes through a buffer), where `torch.round` is one vector
# instruction: requantizing a 16K-block chunk of Q3_K took 3.0 ms (7.0 out of cache) with the bit
# reading and 1.1 ms (1.5) with the rounding. So the kernels round, and flag the rare chunk where
# some v lies beyond the rounding's range (or is NaN), which `_requantize` redoes with the bits.
_ROUNDING_RANGE = 4194303.0  # 2**22 - 1: below it nearest_int(v) is v rounded, halves to even


def _scaled(x: torch.Tensor, d: torch.Tensor, dm: torch.Tensor | None, sub: int) -> torch.Tensor:
    """What ggml rounds: (x + dm) / d, or x / d, per weight: x (B, 256), d, dm (B, n_sub) -> (B, n_sub, sub)."""
    xs = x.reshape(x.shape[0], -1, sub)
    return xs / d[..., None] if dm is None else (xs + dm[..., None]) / d[..., None]


def _as_codes(levels: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Integer levels (B, n_sub, sub) -> codes clamped to [lo, hi], minus lo, (B, 256) uint8."""
    return (levels.clamp(lo, hi) - lo).to(torch.uint8).reshape(levels.shape[0], -1)


def _requantize_kernel(x: torch.Tensor, d: torch.Tensor, dm: torch.Tensor | None, sub: int, lo: int, hi: int):
    """Round every weight again against its quantized sub-block scale (the fused kernels' body): x
    (B, 256), d, dm (B, n_sub) -> codes - lo (B, 256) uint8, and whether a sub-block with d != 0
    holds a value beyond `_ROUNDING_RANGE` or NaN, where these codes are not ggml's. Where d is 0
    the codes are meaningless and `_keep_search_codes` replaces them."""
    v = _scaled(x, d, dm, sub)
    far = ((v.abs() < _ROUNDING_RANGE).logical_not() & (d != 0)[..., None]).any()
    return _as_codes(torch.round(v), lo, hi), far


def _requantize(kernel: Callable, x: torch.Tensor, d: torch.Tensor, dm: torch.Tensor | None, sub: int, lo: int, hi: int,
               codes: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """ggml's requantization, `l = nearest_int((x + dm) / d)` clamped to [lo, hi], through a fused
    copy of `_requantize_kernel`: the codes - lo (B, 256) uint8, with the search's codes kept where d is 0."""
    q, far = kernel(x, d, dm, sub, lo, hi)
    if far:  # ggml's bits, eagerly: a weight 2**22 steps from its sub-block's quantized scale
        q = _as_codes(nearest_int(_scaled(x, d, dm, sub)), lo, hi)
    return _keep_search_codes(q, codes, d)


_qkx_requantize = fused(_requantize_kernel)  # Q2_K, Q4_K, Q5_K; Q3_K and Q6_K compile copies of their own


def _keep_search_codes(q: torch.Tensor, codes: Callable[[torch.Tensor], torch.Tensor], d: torch.Tensor) -> torch.Tensor:
    """ggml keeps the search's codes in a sub-block whose quantized scale d (B, n_sub) is 0: copy
    them into q (B, 256) there (rare: few sub-blocks). `codes(idx)` gives the search's codes of the
    sub-blocks idx, offset like q, as (len(idx), sub)."""
    idx = (d == 0).reshape(-1).nonzero()[:, 0]
    if len(idx):
        kept = codes(idx)
        q.view(-1, kept.shape[1])[idx] = kept.to(torch.uint8)
    return q


def _columns(L: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """`codes(idx)` for codes held element-major, L (sub, S)."""
    return lambda idx: L[:, idx].T


def _words(q: torch.Tensor) -> torch.Tensor:
    """(B, 256) uint8 codes -> (B, 64) int32, four codes per word (a view, little-endian)."""
    return q.view(torch.int32)


def _bytes_of(words: torch.Tensor) -> torch.Tensor:
    return words.reshape(words.shape[0], -1).view(torch.uint8)


def _or_words(fields: list[torch.Tensor], width: int) -> torch.Tensor:
    """OR int32 words of per-byte fields (each byte < 2**width), field k shifted by k * width."""
    acc = fields[0]
    for k in range(1, len(fields)):
        acc = acc | fields[k] << (k * width)
    return acc


def _byte_fields(W: torch.Tensor, shift: int, mask: int) -> torch.Tensor:
    """(W >> shift) & mask in every byte of the words W: mask repeated in the four bytes."""
    return (W >> shift) & (mask * 0x01010101)


def _store(out: torch.Tensor, fields: dict[int, torch.Tensor], halves: dict[int, torch.Tensor]) -> None:
    """Copy uint8 fields (B, k) to their byte offsets and fp16 bits (B,) int16 to their offsets."""
    for start, v in fields.items():
        out[:, start : start + v.shape[1]] = v
    h = out.view(torch.int16)
    for start, v in halves.items():
        h[:, start // 2] = v


@fused
def _qkx_scale_codes(scales: torch.Tensor, mins: torch.Tensor, max_sc: torch.Tensor, n_sub: int, scale_bits: int):
    """Q2_K/Q4_K/Q5_K: quantize the searched sub-block scales and mins (S,) to `scale_bits` against
    d = max_scale / (2**scale_bits - 1) and dmin likewise. Returns the codes sc, mn (B, n_sub) int32,
    the effective d * sc and dmin * mn (B, n_sub) that requantization divides by, and the fp16
    bits of d and dmin (B,). `max_sc` is the largest code (for ggml's `MIN(top, l)` clamp)."""
    top = float(2**scale_bits - 1)
    out = []
    for v in (scales.reshape(-1, n_sub), mins.reshape(-1, n_sub)):
        vmax = _positive_max(v)
        inv = torch.where(vmax > 0, fdiv(top, vmax), torch.zeros_like(vmax))
        code = torch.minimum(nearest_int(inv[:, None] * v) & 0xFF, max_sc)
        d = fdiv(vmax, top)
        out.append((code, _as_f16(d)[:, None] * code.float(), f16_bits(d)))
    (sc, d_eff, d16), (mn, dm_eff, dmin16) = out
    return sc, mn, d_eff, dm_eff, d16, dmin16


def _qkx_codes(x: torch.Tensor, L: torch.Tensor, scales, mins, n_sub: int, scale_bits: int, nmax: int):
    """The post-search steps Q2_K, Q4_K and Q5_K share: scale codes, then requantized codes."""
    max_sc = torch.tensor(2**scale_bits - 1, dtype=torch.int32, device=x.device)
    sc, mn, d, dm, d16, dmin16 = _qkx_scale_codes(scales, mins, max_sc, n_sub, scale_bits)
    q = _requantize(_qkx_requantize, x, d, dm, 256 // n_sub, 0, nmax, _columns(L))
    return q, sc, mn, d16, dmin16


@fused
def _two_bit_words(W: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K qs: (B, 64) code words (codes < 4) -> (B, 16) words of the 64 bytes
    byte[32h + l] = q[128h + l] | q[128h + l + 32] << 2 | q[.. + 64] << 4 | q[.. + 96] << 6."""
    W = W.reshape(-1, 2, 4, 8)
    return _or_words([W[:, :, k] for k in range(4)], 2).reshape(-1, 16)


@fused
def _q2k_fields(sc: torch.Tensor, mn: torch.Tensor, W: torch.Tensor):
    # ggml stores the min code with `scales[j] |= l << 4` into a byte: only its low 4 bits fit
    return ((sc | mn << 4) & 0xFF).to(torch.uint8), _two_bit_words(W)


@register_codec(T.Q2_K)
class Q2_K(BlockCodec):
    chunk_blocks = 1 << 12  # measured best compiled on the 2-core machine (eager: 1 << 10 was)
    f16_fields = slice(80, 84)

    @staticmethod
    def quantize_blocks(x: torch.Tensor, out: torch.Tensor) -> None:
        xt = _element_major(x, 16)
        L, scales, mins = make_qkx2_quants(xt, xt.abs(), 3, rmin=-0.5, rdelta=0.1, nstep=15, use_mad=True)
        q, sc, mn, d16, dmin16 = _qkx_codes(x, L, scales, mins, 16, 4, 3)
        s, qs = _q2k_fields(sc, mn, _words(q))
        _store(out, {0: s, 16: _bytes_of(qs)}, {80: d16, 82: dmin16})

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        sc = b[:, :16]
        d, dmin = f16_value(b[:, 80:82]), f16_value(b[:, 82:84])  # (B, 1)
        dl = (d * (sc & 0xF).float()).unsqueeze(-1)  # (B, 16, 1)
        ml = (dmin * (sc >> 4).float()).unsqueeze(-1)
        return (dl * _from_two_bit_fields(b[:, 16:80]).float() - ml).reshape(-1, 256)


@fused
def _q4k_weights(xt: torch.Tensor) -> torch.Tensor:
    """ggml's Q4_K/Q5_K search weights: the sub-block's RMS plus |x|.

    The root is taken in float64 and rounded once: that is C's correctly rounded `sqrtf`, which
    torch's float32 `sqrt` on the CPU is not (it is off by an ulp for about 1 value in 6).
    """
    return torch.sqrt(fdiv(seq_sum(xt * xt), 32).double()).float() + xt.abs()


def _pack_scale_min_k4(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(B, 8) 6-bit scales and mins -> (B, 12) bytes, ggml's get_scale_min_k4 layout."""
    lo = torch.cat([sc[:, :4] | (sc[:, 4:] >> 4) << 6, m[:, :4] | (m[:, 4:] >> 4) << 6], dim=1)
    return torch.cat([lo, (sc[:, 4:] & 0xF) | (m[:, 4:] & 0xF) << 4], dim=1)


def _k4_search(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    xt = _element_major(x, 32)
    L, scales, mins = make_qkx2_quants(xt, _q4k_weights(xt), nmax, rmin=rmin, rdelta=0.1, nstep=nstep, use_mad=False)
    return _qkx_codes(x, L, scales, mins, 8, 6, nmax)


@fused
def _k4_fields(sc: torch.Tensor, mn: torch.Tensor, W: torch.Tensor):
    """Q4_K/Q5_K: the 12 scale bytes and the words of the low nibbles (qs, 128 bytes):
    byte[32c + l] = q[64c + l] & 15 | (q[64c + l + 32] & 15) << 4."""
    W = W.reshape(-1, 4, 2, 8)
    low = _byte_fields(W[:, :, 0], 0, 0xF) | _byte_fields(W[:, :, 1], 0, 0xF) << 4
    return _pack_scale_min_k4(sc, mn).to(torch.uint8), low.reshape(-1, 32)


@fused
def _q5k_high_words(W: torch.Tensor) -> torch.Tensor:
    """Q5_K qh (32 bytes) as (B, 8) words: bit k of byte l is bit 4 of q[32k + l]."""
    W = W.reshape(-1, 8, 8)
    return _or_words([_byte_fields(W[:, k], 4, 1) for k in range(8)], 1)


def _k4_dequantize(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    sc, mn = _unpack_scale_min_k4(b[:, 4:16])
    d = (f16_value(b[:, 0:2]) * sc.float()).unsqueeze(-1)  # (B, 8, 1)
    dm = (f16_value(b[:, 2:4]) * mn.float()).unsqueeze(-1)
    return (d * q.float() - dm).reshape(-1, 256)


def _k4_low(qs: torch.Tensor) -> torch.Tensor:
    return split_fields(qs.reshape(-1, 4, 32), 2, 4).reshape(-1, 8, 32)


@register_codec(T.Q4_K)
class Q4_K(BlockCodec):
    chunk_blocks = 1 << 12  # measured best compiled on the 2-core machine (eager: 1 << 10 was)
    f16_fields = slice(0, 4)

    @staticmethod
    def quantize_blocks(x: torch.Tensor, out: torch.Tensor) -> None:
        q, sc, mn, d16, dmin16 = _k4_search(x, 15, rmin=-1.0, nstep=20)
        s, low = _k4_fields(sc, mn, _words(q))
        _store(out, {4: s, 16: _bytes_of(low)}, {0: d16, 2: dmin16})

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        return _k4_dequantize(b, _k4_low(b[:, 16:]))


@register_codec(T.Q5_K)
class Q5_K(BlockCodec):
    chunk_blocks = 1 << 12  # measured best compiled on the 2-core machine (eager: 1 << 10 was)
    f16_fields = slice(0, 4)

    @staticmethod
    def quantize_blocks(x: torch.Tensor, out: torch.Tensor) -> None:
        q, sc, mn, d16, dmin16 = _k4_search(x, 31, rmin=-0.5, nstep=15)
        W = _words(q)
        s, low = _k4_fields(sc, mn, W)
        _store(out, {4: s, 16: _bytes_of(_q5k_high_words(W)), 48: _bytes_of(low)}, {0: d16, 2: dmin16})

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        high = split_fields(b[:, 16:48], 8, 1)  # (B, 8, 32)
        return _k4_dequantize(b, _k4_low(b[:, 48:]) | high << 4)


@fused
def _q3k_scales(scales: torch.Tensor):
    """Q3_K: the 16 sub-block scales (S,) as 6-bit codes against d = max_scale / -32, max_scale the
    one of largest magnitude. Returns the 12 scale bytes (B, 12), the effective d * (s - 32)
    (B, 16) and the fp16 bits of d (B,)."""
    scales = scales.reshape(-1, 16)
    B = scales.shape[0]
    _, max_scale = scan_absmax([scales[:, j] for j in range(16)])
    has = max_scale != 0
    iscale = fdiv(-32.0, torch.where(has, max_scale, torch.ones_like(max_scale)))
    s = nearest_int(iscale[:, None] * scales.reshape(B, 16)).clamp(-32, 31) + 32
    s = torch.where(has[:, None], s, torch.zeros_like(s))  # (B, 16) 6-bit
    d = torch.where(has, fdiv(1.0, iscale), torch.zeros_like(iscale))
    packed = torch.cat([(s[:, :8] & 0xF) | (s[:, 8:] & 0xF) << 4, or_fields((s >> 4).reshape(B, 4, 4), 2)], 1)
    return packed, _as_f16(d)[:, None] * (s.float() - 32), f16_bits(d)


_q3k_requantize = fused(_requantize_kernel)


@fused
def _q3k_words(W: torch.Tensor):
    """Q3_K hmask (bit k of byte l = bit 2 of q[32k + l]) and qs (the low 2 bits), as words."""
    Wk = W.reshape(-1, 8, 8)
    hmask = _or_words([_byte_fields(Wk[:, k], 2, 1) for k in range(8)], 1)
    return hmask, _two_bit_words(_byte_fields(W, 0, 3))


@register_codec(T.Q3_K)
class Q3_K(BlockCodec):
    chunk_blocks = 1 << 14  # measured best compiled on the 2-core machine (8K and 32K blocks: 5-10% slower)
    f16_fields = slice(108, 110)

    @staticmethod
    def quantize_blocks(x: torch.Tensor, out: torch.Tensor) -> None:
        scales, codes = make_q3_quants(_element_major(x, 16), 4)
        packed, d, d16 = _q3k_scales(scales)
        hmask, qs = _q3k_words(_words(_requantize(_q3k_requantize, x, d, None, 16, -4, 3, codes)))
        _store(out, {0: _bytes_of(hmask), 32: _bytes_of(qs), 96: packed.to(torch.uint8)}, {108: d16})

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        s = b[:, 96:108]
        lo = split_fields(s[:, :8], 2, 4).reshape(-1, 16)
        hi = split_fields(s[:, 8:12], 4, 2).reshape(-1, 16)
        sc = ((lo | hi << 4).to(torch.int8) - 32).float()
        dl = (f16_value(b[:, 108:110]) * sc).unsqueeze(-1)  # (B, 16, 1)
        ql = _from_two_bit_fields(b[:, 32:96])
        qh = split_fields(b[:, :32], 8, 1).reshape(-1, 16, 16) ^ 1  # the offset 4 applies when the bit is 0
        q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
        return (dl * q).reshape(-1, 256)


@fused
def _q6k_scales(scales: torch.Tensor):
    """Q6_K: the 16 sub-block scales (S,) as int8 codes against d = max_scale / -128, max_scale the
    one of largest magnitude. Returns their bytes (B, 16), the effective d * sc (B, 16), the fp16
    bits of d (B,) and the blocks that are stored as zeros (B,)."""
    scales = scales.reshape(-1, 16)
    B = scales.shape[0]
    max_abs, max_scale = scan_absmax([scales[:, j] for j in range(16)])
    blank = max_abs < GROUP_MAX_EPS  # the whole super-block is stored as zeros
    iscale = fdiv(-128.0, torch.where(blank, torch.ones_like(max_scale), max_scale))
    d = fdiv(1.0, iscale)
    sc = nearest_int(iscale[:, None] * scales.reshape(B, 16)).clamp(max=127)  # in [-128, 127]
    return (sc & 0xFF).to(torch.uint8), _as_f16(d)[:, None] * sc.float(), f16_bits(d), blank  # two's complement


_q6k_requantize = fused(_requantize_kernel)


@fused
def _q6k_words(W: torch.Tensor):
    """Q6_K ql (low nibbles: byte[64h + j] = q[128h + j] & 15 | (q[128h + 64 + j] & 15) << 4) and
    qh (bits 4-5: byte[32h + l] = OR_k (q[128h + 32k + l] >> 4) << 2k) as words."""
    W2 = W.reshape(-1, 2, 2, 16)
    ql = _byte_fields(W2[:, :, 0], 0, 0xF) | _byte_fields(W2[:, :, 1], 0, 0xF) << 4
    W4 = W.reshape(-1, 2, 4, 8)
    qh = _or_words([_byte_fields(W4[:, :, k], 4, 3) for k in range(4)], 2)
    return ql.reshape(-1, 32), qh.reshape(-1, 16)


@register_codec(T.Q6_K)
class Q6_K(BlockCodec):
    chunk_blocks = 1 << 12  # measured best compiled on the 2-core machine (eager: 1 << 10 was)
    f16_fields = slice(208, 210)

    @staticmethod
    def quantize_blocks(x: torch.Tensor, out: torch.Tensor) -> None:
        L, scales = make_qx_quants(_element_major(x, 16), 32)
        sc, d, d16, blank = _q6k_scales(scales)
        ql, qh = _q6k_words(_words(_requantize(_q6k_requantize, x, d, None, 16, -32, 31, _columns(L))))
        _store(out, {0: _bytes_of(ql), 128: _bytes_of(qh), 192: sc}, {208: d16})
        if bool(blank.any()):
            out[blank] = 0

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        d = (f16_value(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()).unsqueeze(-1)
        ql = split_fields(b[:, :128].reshape(-1, 2, 64), 2, 4).reshape(-1, 8, 32)
        qh = split_fields(b[:, 128:192].reshape(-1, 2, 32), 4, 2).reshape(-1, 8, 32)
        q = ((ql | qh << 4).to(torch.int8) - 32).reshape(-1, 16, 16).float()
        return (d * q).reshape(-1, 256)

