"""LLM.int8(): vector-wise int8 weights with a mixed-precision decomposition of outlier features
(Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale",
arXiv:2208.07339), with the arithmetic of bitsandbytes' `Linear8bitLt` (has_fp16_weights=False).

The format is the weight half. Each row of W (out, in) is rounded to float16 (bnb's Int8Params
does this; LLM.int8 is a float16 method), then scaled by 127 / its absmax and rounded half to
even (`torch.round`, as bnb):

    absmax[r] = max_j |W16[r, j]|                 (out,) float32, bnb's SCB
    codes[r, j] = round(W16[r, j] * (127 / absmax[r]))   (out, in) int8, in [-127, 127]
    dequantized = codes * absmax * (1 / 127)      float32, two roundings as bnb's
                                                   int8_vectorwise_dequant

The other half happens at run time, on the activations X (T, in) of each call (section 3.2):
the input features (columns) in which some |X16| >= threshold are outliers; their products
are computed in the input dtype from the dequantized weight columns. The rest of X is
quantized row-wise to int8 (absmax over the row, outlier values excluded, as bnb), multiplied
with the int8 weight in exact integer arithmetic, and rescaled by absmax_x * absmax_w / 127^2.
`mixed_linear` is that computation, a pure function; the module that calls it in a model is
`quantbench.methods.llm_int8.Int8Linear`. On the CPU its output equals bnb's Linear8bitLt bit
for bit (tests/formats/test_llm_int8.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register_format
from .qtensor import FormatConfig, QTensor

INV_127 = 7.874015718698502e-3  # float32(1 / 127), the constant bnb dequantizes with
INV_127_SQ = 6.200124e-05  # float32(1 / 127^2), the constant of bnb's int8_mm_dequant
EXACT_K = 1024  # 1024 * 127^2 < 2^24: a float32 dot product of this many int8 pairs is exact


@dataclass(frozen=True)
class LLMInt8Config(FormatConfig):
    name = "llm-int8"

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        rows, n = shape
        return (8 * rows * n + 32 * rows) / (rows * n)


@dataclass(frozen=True, eq=False)
class Int8QTensor(QTensor):
    codes: torch.Tensor  # (out, in) int8
    absmax: torch.Tensor  # (out,) float32, the absmax of each float16-rounded row


def rowwise_int8(x16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 of a float16 matrix (R, K): (codes (R, K) int8, absmax (R,) float32).

    bnb's int8_vectorwise_quant: round(x * (127 / absmax)) in float32. A zero row gets codes 0
    (bnb computes 0 * inf = NaN there, which the int8 cast turns into 0 on x86)."""
    absmax = x16.abs().amax(dim=1).float()  # (R,)
    inv = torch.where(absmax > 0, 127.0 / absmax, 0.0)
    return torch.round(x16.float() * inv.unsqueeze(1)).to(torch.int8), absmax


def quantize(w: torch.Tensor, cfg: LLMInt8Config) -> Int8QTensor:
    w16 = w.to(torch.float16)
    if not torch.isfinite(w16).all():
        raise ValueError(f"{cfg.spec()}: weights beyond float16's range (|w| > 65504) cannot be stored; LLM.int8 rounds weights to float16")
    codes, absmax = rowwise_int8(w16)
    return Int8QTensor(config=cfg, shape=tuple(w.shape), dtype=w.dtype, codes=codes, absmax=absmax)


def dequantize_columns(q: Int8QTensor, cols: torch.Tensor | slice = slice(None)) -> torch.Tensor:
    """The float32 weight (out, len(cols)) of some input columns."""
    return q.codes[:, cols].float() * q.absmax.unsqueeze(1) * INV_127


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(T, K) int8 @ (N, K) int8 .T -> (T, N) int32, exactly.

    torch._int_mm on CUDA (its shape rules: T > 16, K and N multiples of 8). Elsewhere a float32
    matmul of the int8 values over slices of 1024 columns, each exact (|sum| <= 1024 * 127^2 <
    2^24), summed in int32: on a CPU without AVX-512 VNNI torch._int_mm is a slow scalar loop."""
    t, k = a.shape
    if a.is_cuda and t > 16 and k % 8 == 0 and b.shape[0] % 8 == 0:
        return torch._int_mm(a, b.t())
    out = torch.zeros(t, b.shape[0], dtype=torch.int32, device=a.device)
    for i in range(0, k, EXACT_K):
        out += (a[:, i : i + EXACT_K].float() @ b[:, i : i + EXACT_K].float().t()).to(torch.int32)
    return out


def mixed_linear(x: torch.Tensor, q: Int8QTensor, threshold: float = 6.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """LLM.int8() x @ W.T + bias for x (..., in) in float32, float16 or bfloat16; out in x's dtype.

    threshold <= 0 turns the decomposition off (every feature goes through int8)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # (T, K)
    x16 = x2.to(torch.float16)  # bnb quantizes activations from float16
    outlier = x16.abs() >= threshold if threshold > 0 else torch.zeros_like(x16, dtype=torch.bool)
    cols = outlier.any(dim=0)  # (K,) the outlier features
    ca, absmax_x = rowwise_int8(x16.masked_fill(outlier, 0))  # outlier values left out of the absmax
    ca[:, cols] = 0  # whole outlier columns go through the float path
    acc = int8_matmul(ca, q.codes)  # (T, N) int32
    out = acc * (absmax_x.unsqueeze(1) * q.absmax.unsqueeze(0)) * INV_127_SQ  # float32
    if bias is not None:
        out = out + bias.to(x.dtype)
    out = out.to(x.dtype)
    idx = cols.nonzero().flatten()
    if idx.numel():
        sub_w = dequantize_columns(q, idx).to(x.dtype)  # (N, n_outliers)
        out = out.addmm(x2[:, idx], sub_w.t())
    return out.reshape(*shape[:-1], -1)


@register_format
class LLMInt8Format:
    config_type = LLMInt8Config
    qtensor_type = Int8QTensor
    description = "LLM.int8() weights: row-wise absmax int8 of the float16 weight (= bitsandbytes Int8Params)"
    quantize = staticmethod(quantize)

    @staticmethod
    def dequantize(q: Int8QTensor) -> torch.Tensor:
        return dequantize_columns(q)
