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

import torch
from gguf import GGMLQuantizationType as T

from .fused import fused, seq_sum
from .ggml_codec import BlockCodec, f16_bytes, fdiv, f16_value, nearest_int, or_fields, register_codec, split_fields
from .kquants_search import GROUP_MAX_EPS, first_absmax, make_q3_quants, make_qkx2_quants, make_qx_quants


def _element_major(x: torch.Tensor, sub: int) -> torch.Tensor:
    """(B, 256) -> (sub, B * 256 / sub): the weights of each sub-block down a column."""
    return x.reshape(-1, sub).T.contiguous()


def _block_major(L: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Inverse of `_element_major`, shaped (B, n_sub, sub)."""
    return L.T.reshape(n_blocks, -1, L.shape[0])


def _positive_max(v: torch.Tensor) -> torch.Tensor:
    """max(0, max over the last dim), +0.0 when nothing is positive: ggml's `if (s > max) max = s`."""
    m = v.amax(dim=-1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _requantize(x: torch.Tensor, d: torch.Tensor, dm: torch.Tensor | None, L: torch.Tensor, lo: int, hi: int):
    """Round every weight again against its quantized sub-block scale; keep L where that scale is 0.

    x, L (B, n_sub, sub); d, dm (B, n_sub). ggml: l = nearest_int((x + dm) / d), or x / d.
    """
    d = d.unsqueeze(-1)
    v = x / d if dm is None else (x + dm.unsqueeze(-1)) / d
    q = nearest_int(v).clamp(lo, hi).float()
    return torch.where(d != 0, q, L)


def _as_f16(d: torch.Tensor) -> torch.Tensor:
    """The float32 value of d's fp16, what a reader of the stored scale sees (`f16_value` of its bytes)."""
    return d.to(torch.float16).float()


def _two_bit_fields(q: torch.Tensor) -> torch.Tensor:
    """(B, 256) codes < 4 -> (B, 64) bytes (layout in the module docstring)."""
    return or_fields(q.reshape(-1, 2, 4, 32), 2).reshape(-1, 64)


def _from_two_bit_fields(qs: torch.Tensor) -> torch.Tensor:
    return split_fields(qs.reshape(-1, 2, 32), 4, 2).reshape(-1, 16, 16)


def _pack_scale_min_k4(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(B, 8) 6-bit scales and mins -> (B, 12) bytes, ggml's get_scale_min_k4 layout."""
    lo = torch.cat([sc[:, :4] | (sc[:, 4:] >> 4) << 6, m[:, :4] | (m[:, 4:] >> 4) << 6], dim=1)
    return torch.cat([lo, (sc[:, 4:] & 0xF) | (m[:, 4:] & 0xF) << 4], dim=1)


def _unpack_scale_min_k4(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d, m, md = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0xF) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _qkx_scales(x: torch.Tensor, L: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, sub: int, scale_bits: int, nmax: int):
    """Q2_K/Q4_K/Q5_K after the sub-block search (`make_qkx2_quants`, element-major L (sub, S)):
    quantize scales and mins to `scale_bits` against d = max_scale / (2**scale_bits - 1), then
    requantize. Returns codes (B, 256) uint8, the scale and min codes (B, n_sub) uint8, and
    d, dmin as fp16 bytes (B, 2)."""
    B = x.shape[0]
    scales, mins = scales.reshape(B, -1), mins.reshape(B, -1)
    top = float(2**scale_bits - 1)
    codes = []
    for v in (scales, mins):
        vmax = _positive_max(v)
        inv = torch.where(vmax > 0, fdiv(top, vmax), torch.zeros_like(vmax))
        codes.append((nearest_int(inv[:, None] * v) & 0xFF).clamp(max=int(top)).to(torch.uint8))
        codes.append(fdiv(vmax, top)[:, None])
    sc, d, mn, dmin = codes
    d_bytes, dmin_bytes = f16_bytes(d), f16_bytes(dmin)
    d = _as_f16(d) * sc.float()  # (B, n_sub)
    dm = _as_f16(dmin) * mn.float()
    L = _requantize(x.reshape(B, -1, sub), d, dm, _block_major(L, B), 0, nmax).reshape(B, -1)
    return L.to(torch.uint8), sc, mn, d_bytes, dmin_bytes


# Each codec: the sub-block search (its candidates fused one call each), then one fused call
# for everything after it (scale codes, requantization, bit packing).
@register_codec(T.Q2_K)
class Q2_K(BlockCodec):
    chunk_blocks = 1 << 12  # measured best compiled on the 2-core machine (eager: 1 << 10 was)
    f16_fields = slice(80, 84)

    @staticmethod
    def quantize_blocks(x: torch.Tensor, out: torch.Tensor) -> None:
        xt = _element_major(x, 16)
        L, scales, mins = make_qkx2_quants(xt, xt.abs(), 3, rmin=-0.5, rdelta=0.1, nstep=15, use_mad=True)
        out.copy_(_q2k_blocks(x, L, scales, mins))

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        sc = b[:, :16]
        d, dmin = f16_value(b[:, 80:82]), f16_value(b[:, 82:84])  # (B, 1)
        dl = (d * (sc & 0xF).float()).unsqueeze(-1)  # (B, 16, 1)
        ml = (dmin * (sc >> 4).float()).unsqueeze(-1)
        return (dl * _from_two_bit_fields(b[:, 16:80]).float() - ml).reshape(-1, 256)


@fused
def _q2k_blocks(x: torch.Tensor, L: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    L, sc, mn, d, dmin = _qkx_scales(x, L, scales, mins, 16, 4, 3)
    # ggml stores the min code with `scales[j] |= l << 4` into a byte: only its low 4 bits fit
    return torch.cat([sc | (mn << 4), _two_bit_fields(L), d, dmin], dim=1)


@fused
def _q4k_weights(xt: torch.Tensor) -> torch.Tensor:
    """ggml's Q4_K/Q5_K search weights: the sub-block's RMS plus |x|.

    The root is taken in float64 and rounded once: that is C's correctly rounded `sqrtf`, which
    torch's float32 `sqrt` on the CPU is not (it is off by an ulp for about 1 value in 6).
    """
    return torch.sqrt(fdiv(seq_sum(xt * xt), 32).double()).float() + xt.abs()


def _k4_head_low(x, L, scales, mins, nmax: int):
    """Q4_K/Q5_K: (d, dmin, scales) bytes (B, 16), codes (B, 256), their low nibbles packed (B, 128)."""
    L, sc, mn, d, dmin = _qkx_scales(x, L, scales, mins, 32, 6, nmax)
    low = or_fields((L & 0xF).reshape(-1, 4, 2, 32), 4).reshape(-1, 128)
    return torch.cat([d, dmin, _pack_scale_min_k4(sc, mn)], dim=1), L, low


def _k4_search(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    xt = _element_major(x, 32)
    return make_qkx2_quants(xt, _q4k_weights(xt), nmax, rmin=rmin, rdelta=0.1, nstep=nstep, use_mad=False)


@fused
def _q4k_blocks(x: torch.Tensor, L: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    head, _, low = _k4_head_low(x, L, scales, mins, 15)
    return torch.cat([head, low], dim=1)


@fused
def _q5k_blocks(x: torch.Tensor, L: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    head, L, low = _k4_head_low(x, L, scales, mins, 31)
    qh = or_fields((L >> 4).reshape(-1, 8, 32), 1)
    return torch.cat([head, qh, low], dim=1)


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
        out.copy_(_q4k_blocks(x, *_k4_search(x, 15, rmin=-1.0, nstep=20)))

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        return _k4_dequantize(b, _k4_low(b[:, 16:]))


@register_codec(T.Q5_K)
class Q5_K(BlockCodec):
    chunk_blocks = 1 << 12  # measured best compiled on the 2-core machine (eager: 1 << 10 was)
    f16_fields = slice(0, 4)

    @staticmethod
    def quantize_blocks(x: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(_q5k_blocks(x, *_k4_search(x, 31, rmin=-0.5, nstep=15)))

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        high = split_fields(b[:, 16:48], 8, 1)  # (B, 8, 32)
        return _k4_dequantize(b, _k4_low(b[:, 48:]) | high << 4)


@fused
def _q3k_blocks(x: torch.Tensor, L: torch.Tensor, scales: torch.Tensor, max_scale: torch.Tensor) -> torch.Tensor:
    B = x.shape[0]
    has = max_scale != 0
    iscale = fdiv(-32.0, torch.where(has, max_scale, torch.ones_like(max_scale)))
    s = nearest_int(iscale[:, None] * scales.reshape(B, 16)).clamp(-32, 31) + 32
    s = torch.where(has[:, None], s, torch.zeros_like(s)).to(torch.uint8)  # (B, 16) 6-bit
    d = torch.where(has, fdiv(1.0, iscale), torch.zeros_like(iscale))[:, None]
    d_bytes = f16_bytes(d)
    d = _as_f16(d) * (s.float() - 32)
    L = _requantize(x.reshape(B, 16, 16), d, None, _block_major(L, B) - 4, -4, 3) + 4
    L = L.reshape(B, 256).to(torch.uint8)
    hmask = or_fields((L >> 2).reshape(B, 8, 32), 1)
    packed_s = torch.cat([(s[:, :8] & 0xF) | (s[:, 8:] & 0xF) << 4, or_fields((s >> 4).reshape(B, 4, 4), 2)], 1)
    return torch.cat([hmask, _two_bit_fields(L & 3), packed_s, d_bytes], dim=1)


@register_codec(T.Q3_K)
class Q3_K(BlockCodec):
    chunk_blocks = 1 << 12  # measured best compiled on the 2-core machine
    f16_fields = slice(108, 110)

    @staticmethod
    def quantize_blocks(x: torch.Tensor, out: torch.Tensor) -> None:
        L, scales = make_q3_quants(_element_major(x, 16), 4)
        _, max_scale = first_absmax(scales.reshape(x.shape[0], 16).T)
        out.copy_(_q3k_blocks(x, L, scales, max_scale))

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
def _q6k_blocks(x, L, scales, max_abs, max_scale) -> torch.Tensor:
    B = x.shape[0]
    scales = scales.reshape(B, 16)
    blank = max_abs < GROUP_MAX_EPS  # the whole super-block is stored as zeros
    iscale = fdiv(-128.0, torch.where(blank, torch.ones_like(max_scale), max_scale))
    d = fdiv(1.0, iscale)[:, None]
    d_bytes = f16_bytes(d)
    sc = nearest_int(iscale[:, None] * scales).clamp(max=127)  # (B, 16) in [-128, 127]
    d = _as_f16(d) * sc.float()
    L = _requantize(x.reshape(B, 16, 16), d, None, _block_major(L, B) - 32, -32, 31) + 32
    L = L.reshape(B, 2, 4, 32).to(torch.uint8)
    ql = or_fields((L & 0xF).reshape(B, 2, 2, 2, 32), 4, dim=-3).reshape(B, 128)
    qh = or_fields(L >> 4, 2).reshape(B, 64)
    blocks = torch.cat([ql, qh, (sc & 0xFF).to(torch.uint8), d_bytes], dim=1)  # sc: two's complement int8
    return torch.where(blank[:, None], torch.zeros_like(blocks), blocks)


@register_codec(T.Q6_K)
class Q6_K(BlockCodec):
    chunk_blocks = 1 << 12  # measured best compiled on the 2-core machine (eager: 1 << 10 was)
    f16_fields = slice(208, 210)

    @staticmethod
    def quantize_blocks(x: torch.Tensor, out: torch.Tensor) -> None:
        L, scales = make_qx_quants(_element_major(x, 16), 32)
        max_abs, max_scale = first_absmax(scales.reshape(x.shape[0], 16).T)
        out.copy_(_q6k_blocks(x, L, scales, max_abs, max_scale))

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        d = (f16_value(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()).unsqueeze(-1)
        ql = split_fields(b[:, :128].reshape(-1, 2, 64), 2, 4).reshape(-1, 8, 32)
        qh = split_fields(b[:, 128:192].reshape(-1, 2, 32), 4, 2).reshape(-1, 8, 32)
        q = ((ql | qh << 4).to(torch.int8) - 32).reshape(-1, 16, 16).float()
        return (d * q).reshape(-1, 256)
