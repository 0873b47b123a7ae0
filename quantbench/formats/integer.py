"""Integer round-to-nearest (RTN): symmetric (absmax) and asymmetric (zero point), 2 to 8 bits,
per tensor, per output channel, or per group of input columns.

The classic int8 tutorials (absmax and zero-point quantization, Dettmers et al. 2022, section 2)
are `int:bits=8,sym=true,group=-1` and `int:bits=8,sym=false,group=-1`; GPTQ/AWQ checkpoints use
`int:bits=4,sym=false,group=128`.

Granularity is the single argument `group`: the number of consecutive input columns that share a
scale. 0 means the whole row (per output channel), -1 the whole tensor. A group must divide the
row length: a partial last group is an error, not silent padding (576 = 9 x 64 works with 32 or
64, not with 128 or 256).

Grid, for `b` bits, stored code c in [0, 2**b - 1]:
    symmetric:   w ~ (c - 2**(b-1)) * scale,  c in [1, 2**b - 1]   (so +-(2**(b-1) - 1) steps,
                 the grid is symmetric and 0 is exact; the code 0 is never used)
    asymmetric:  w ~ (c - zero) * scale,      zero in [0, 2**b - 1] stored per group; the range
                 always includes 0, so 0 is exact.
Rounding is `torch.round`: halves to even.

Scales: the scale is rounded to nearest in its stored precision (float16: 11 significant bits;
float32: 24 - bits of them, so that every dequantized value (c - zero) * scale is exact in
float32), and never goes below the smallest normal number of its dtype (a group smaller than
that, or all zero, is stored on that finest grid). Two consequences, both tested:
  * quantize(dequantize(q)) == q bit for bit: the dequantized group spans exactly the same grid,
    so the same scale and zero come back.
  * |w - dequantized| <= scale / 2 for every element, except, in an asymmetric group, the
    element at the top of the range, which exceeds it by at most ((max - min) / scale - qmax)
    steps: a rounded scale may not stretch the grid over the whole range, and then the scale is
    stepped down until the top code is reached (which also breaks exact ties, where rounding
    half to even would leave the top code unused).

The functions `choose_qparams`, `quantize_codes` (or `quantize_centered`), `dequantize_codes` and
`pack` are the table through which GPTQ and AWQ reach this format: they never pack bits themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from ..spec import SpecError
from . import register_format
from .qtensor import FormatConfig, QTensor

COMMON_GROUPS = (32, 64, 128, 256)


@dataclass(frozen=True)
class IntConfig(FormatConfig):
    name = "int"
    bits: int = 8
    sym: bool = True
    group: int = 0  # 0: per output channel, -1: per tensor, N: N input columns per scale
    clip_search: bool = False  # search the clipping ratio that minimises the weight's squared error
    scale_dtype: Literal["float16", "float32"] = "float16"

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise SpecError(f"int: bits={self.bits} is not supported; choose 2 to 8")
        if self.group < -1:
            raise SpecError(f"int: group={self.group} is not valid; use -1 (tensor), 0 (channel) or a positive size")

    def group_size(self, in_features: int) -> int:
        return in_features if self.group <= 0 else self.group

    def check_shape(self, shape: tuple[int, ...]) -> None:
        super().check_shape(shape)
        n = shape[1]
        if self.group > 0 and n % self.group:
            ok = [g for g in COMMON_GROUPS if n % g == 0]
            raise SpecError(
                f"int: group={self.group} does not divide the row length {n}; "
                f"valid here: {', '.join(map(str, ok + [0, -1]))} (0 = per channel, -1 = per tensor)"
            )

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        rows, n = shape
        n_params = 1 if self.group == -1 else rows * (n // self.group_size(n))
        scale_bits = 16 if self.scale_dtype == "float16" else 32
        zero_bits = 0 if self.sym else 8
        packed = rows * -(-n * self.bits // 8) * 8
        return (packed + n_params * (scale_bits + zero_bits)) / (rows * n)


@dataclass(frozen=True, eq=False)
class IntQTensor(QTensor):
    codes: torch.Tensor  # (out, ceil(in * bits / 8)) uint8, each row packed on its own
    scale: torch.Tensor  # (out, n_groups) or (1, 1); float16 or float32
    zero: torch.Tensor | None = None  # like scale, uint8; None when symmetric
    g_idx: torch.Tensor | None = None  # (in,) int32 group of each input column; None: contiguous


class QParams(NamedTuple):
    scale: torch.Tensor  # float32, already rounded to the stored dtype
    zero: torch.Tensor  # float32 integer values; 2**(b-1) everywhere when symmetric


def scale_bits(cfg: IntConfig) -> int:
    """Significant bits a scale keeps: float16 holds 11; with float32, 24 - bits, so that the
    product of a code difference (< 2**bits) and the scale is exact in float32."""
    return 11 if cfg.scale_dtype == "float16" else 24 - cfg.bits


def round_scale(x: torch.Tensor, cfg: IntConfig, down: int | torch.Tensor = 0) -> torch.Tensor:
    """x >= 0 rounded to nearest with `scale_bits` significant bits, then `down` steps of that
    precision lower, never below the smallest normal number of the scale dtype. float32 values
    that the scale dtype holds exactly (overflow is left for the caller to report)."""
    finfo = torch.finfo(getattr(torch, cfg.scale_dtype))
    m = scale_bits(cfg)
    mant, exp = torch.frexp(x.clamp(min=finfo.tiny))  # x = mant * 2**exp, mant in [0.5, 1)
    steps = torch.round(mant * 2.0**m) - down  # an integer of at most m bits
    scale = torch.ldexp(steps, exp - m)  # exact: a power-of-two rescaling
    return scale.clamp(min=finfo.tiny)


def choose_qparams(w: torch.Tensor, cfg: IntConfig, ratio: float | torch.Tensor = 1.0) -> QParams:
    """Scale and zero for each row of `w` (rows, n) over its last dimension, with the range
    shrunk by `ratio` (1.0: the full min/max range)."""
    qmax = 2**cfg.bits - 1
    if cfg.sym:
        amax = w.abs().amax(dim=-1, keepdim=True) * ratio  # (rows, 1)
        scale = round_scale(amax / (2 ** (cfg.bits - 1) - 1), cfg)
        zero = torch.full_like(scale, 2 ** (cfg.bits - 1))
    else:
        lo = w.amin(dim=-1, keepdim=True).clamp(max=0) * ratio
        hi = w.amax(dim=-1, keepdim=True).clamp(min=0) * ratio
        floor = torch.finfo(getattr(torch, cfg.scale_dtype)).tiny
        down = torch.zeros_like(hi)
        for _ in range(4):  # rarely more than one step; each one stretches the grid by a rounding
            scale = round_scale((hi - lo) / qmax, cfg, down)
            zero = torch.round(-lo / scale).clamp(0, qmax)
            short = (torch.round(hi / scale) + zero < qmax) & (scale > floor)
            if not short.any():
                break
            down = down + short.float()
    if not torch.isfinite(scale).all() or (scale > torch.finfo(getattr(torch, cfg.scale_dtype)).max).any():
        if cfg.scale_dtype == "float16":
            raise ValueError(f"{cfg.spec()}: a scale overflows float16; use scale_dtype=float32")
        raise ValueError(f"{cfg.spec()}: the weight's range (max - min) overflows the range of float32")
    return QParams(scale, zero)


def quantize_codes(w: torch.Tensor, qp: QParams, cfg: IntConfig, out: torch.Tensor | None = None) -> torch.Tensor:
    """Codes (as float32 integers) of `w` on the grid of `qp`, which broadcasts against `w`; written
    into `out` when given (it must have the broadcast shape)."""
    lowest = 1 if cfg.sym else 0
    return torch.div(w, qp.scale, out=out).round_().add_(qp.zero).clamp_(lowest, 2**cfg.bits - 1)


def centered_bounds(qp: QParams, cfg: IntConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The range of codes minus zero: (lowest - zero, 2**bits - 1 - zero), shaped like qp.zero."""
    lowest = 1 if cfg.sym else 0
    return lowest - qp.zero, (2**cfg.bits - 1) - qp.zero


def quantize_centered(w: torch.Tensor, scale: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """round(w / scale) clamped to `bounds` (`centered_bounds`): `quantize_codes` minus zero, exactly
    (every value is an integer below 2**24 in float32, and clamping commutes with the shift), and
    `dequantize_codes` is this times the scale. For a loop that needs w - q per column (GPTQ),
    two ops fewer; the zero is added to all its codes at once afterwards."""
    return torch.div(w, scale, out=out).round_().clamp_(*bounds)


def dequantize_codes(codes: torch.Tensor, qp: QParams, out: torch.Tensor | None = None) -> torch.Tensor:
    """(codes - zero) * scale; written into `out` when given (it must have the broadcast shape)."""
    if out is None:
        return (codes - qp.zero) * qp.scale
    return torch.sub(codes, qp.zero, out=out).mul_(qp.scale)


def _search_ratio(wg: torch.Tensor, cfg: IntConfig, grid: int = 20, lowest: float = 0.5) -> torch.Tensor:
    """Per-row clipping ratio in [lowest, 1] that minimises the squared rounding error."""
    best_err = torch.full(wg.shape[:-1] + (1,), float("inf"), device=wg.device)
    best = torch.ones_like(best_err)
    for r in torch.linspace(1.0, lowest, grid).tolist():
        qp = choose_qparams(wg, cfg, r)
        err = (dequantize_codes(quantize_codes(wg, qp, cfg), qp) - wg).pow(2).sum(-1, keepdim=True)
        better = err < best_err
        best = torch.where(better, torch.full_like(best, r), best)
        best_err = torch.where(better, err, best_err)
    return best


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (rows, n) < 2**bits into (rows, ceil(n*bits/8)) uint8, row by row.

    Little-endian bit stream: code i occupies bits [i*bits, (i+1)*bits) of the row, so for 4 bits
    byte j = codes[2j] | codes[2j+1] << 4. Eight codes fill exactly `bits` bytes, so a row is
    packed eight codes at a time (as one integer of 8 * bits <= 56 bits), or, when bits divides
    8, one byte of 8 // bits codes at a time; the zero padding of a last partial byte is dropped.
    """
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    rows, n = codes.shape
    nbytes = -(-n * bits // 8)
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte
        per = 8 // bits
        shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.uint8)  # (per,)
        grouped = _pad_to(codes, per).view(rows, -1, per)  # (rows, nbytes, per)
        return (grouped << shifts).sum(-1, dtype=torch.uint8)  # the fields are disjoint: sum == or
    shifts = torch.arange(0, 8 * bits, bits, device=codes.device, dtype=torch.int64)  # (8,)
    word = (_pad_to(codes, 8).view(rows, -1, 8).long() << shifts).sum(-1, keepdim=True)  # (rows, G, 1)
    byte_shifts = torch.arange(0, 8 * bits, 8, device=codes.device, dtype=torch.int64)  # (bits,)
    packed = ((word >> byte_shifts) & 255).to(torch.uint8).view(rows, -1)  # (rows, G * bits)
    return packed[:, :nbytes].contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: (rows, n) uint8 codes."""
    if bits == 8:
        return packed
    rows = packed.shape[0]
    mask = (1 << bits) - 1
    if 8 % bits == 0:  # each field straight into its slot of the output: no broadcast temporaries
        out = torch.empty(*packed.shape, 8 // bits, dtype=torch.uint8, device=packed.device)
        for k in range(8 // bits):
            torch.bitwise_and(packed >> (k * bits) if k else packed, mask, out=out[..., k])
        return out.view(rows, -1)[:, :n]
    grouped = _pad_to(packed, bits).view(rows, -1, bits)  # (rows, G, bits): `bits` bytes hold 8 codes
    out = torch.empty(*grouped.shape[:2], 8, dtype=torch.uint8, device=packed.device)
    for k in range(8):  # code k: bits [k * bits, (k + 1) * bits), in byte j and perhaps the next
        j, off = divmod(k * bits, 8)
        v = grouped[..., j] >> off
        if off + bits > 8:  # the high part from byte j + 1 (uint8 shifts drop what overflows)
            v = v.bitwise_or_(grouped[..., j + 1] << (8 - off))
        torch.bitwise_and(v, mask, out=out[..., k])
    return out.view(rows, -1)[:, :n]


def _pad_to(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last dim of (rows, n) to a multiple of `multiple`."""
    extra = (-t.shape[-1]) % multiple
    return torch.nn.functional.pad(t, (0, extra)) if extra else t.contiguous()


def pack(codes: torch.Tensor, qp: QParams, cfg: IntConfig, dtype: torch.dtype, g_idx: torch.Tensor | None = None) -> IntQTensor:
    """Store codes (out, in) with their parameters (out, n_groups) as an IntQTensor."""
    sdt = getattr(torch, cfg.scale_dtype)
    return IntQTensor(
        config=cfg,
        shape=tuple(codes.shape),
        dtype=dtype,
        codes=pack_bits(codes, cfg.bits),
        scale=qp.scale.to(sdt).contiguous(),
        zero=None if cfg.sym else qp.zero.to(torch.uint8).contiguous(),
        g_idx=None if g_idx is None else g_idx.to(torch.int32),
    )


def group_view(w: torch.Tensor, cfg: IntConfig) -> torch.Tensor:
    """(out, in) -> (out, n_groups, group), or (1, 1, out*in) per tensor."""
    rows, n = w.shape
    if cfg.group == -1:
        return w.reshape(1, 1, rows * n)
    g = cfg.group_size(n)
    return w.reshape(rows, n // g, g)


@register_format
class IntFormat:
    config_type = IntConfig
    qtensor_type = IntQTensor
    description = "integer round-to-nearest, symmetric or zero-point, per tensor/channel/group"

    @staticmethod
    def quantize(w: torch.Tensor, cfg: IntConfig) -> IntQTensor:
        wg = group_view(w, cfg)  # (R, G, g)
        ratio = _search_ratio(wg, cfg) if cfg.clip_search else 1.0
        qp = choose_qparams(wg, cfg, ratio)  # (R, G, 1)
        codes = quantize_codes(wg, qp, cfg).reshape(w.shape)
        return pack(codes, QParams(qp.scale.squeeze(-1), qp.zero.squeeze(-1)), cfg, w.dtype)

    @staticmethod
    def dequantize(q: IntQTensor) -> torch.Tensor:
        cfg: IntConfig = q.config
        rows, n = q.shape
        w = unpack_bits(q.codes, cfg.bits, n).float()  # (out, in), a new tensor: worked in place
        scale = q.scale.float()
        zero = 2 ** (cfg.bits - 1) if q.zero is None else q.zero.float()
        if q.g_idx is not None:  # act-order GPTQ: column j uses group g_idx[j]
            gi = q.g_idx.long()
            return w.sub_(zero if q.zero is None else zero[:, gi]).mul_(scale[:, gi])
        wg = group_view(w, cfg)
        wg.sub_(zero if q.zero is None else zero.unsqueeze(-1)).mul_(scale.unsqueeze(-1))
        return w
