"""GGUF: llama.cpp's block types as a quantbench format, spec ``"gguf:Q4_K"``.

The legacy types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (`gguf_legacy`) and the k-quants Q2_K ... Q6_K
(`kquants`, Kawrakow, llama.cpp PR #1684), in vectorised torch on any device, byte-identical to
llama.cpp's reference quantizers (libggml's `ggml_quantize_chunk` without an importance matrix;
for the legacy types also gguf-py's `gguf.quants.quantize`, except where gguf-py itself
departs from ggml: the sign of a zero scale in a block holding -0.0) and dequantized exactly
as gguf-py's `gguf.quants.dequantize`.

What a `GGUFQTensor` stores is the ggml blocks themselves: `q.blocks` is a (rows, bytes_per_row)
uint8 tensor, exactly the bytes a GGUF file holds for a tensor of type `q.ggml_type`, so it can
be written with gguf-py's `GGUFWriter.add_tensor(name, q.blocks.numpy(), raw_dtype=q.ggml_type)`
without conversion, and `GGUFQTensor.from_blocks` takes the bytes of a tensor read from a file.

Policies:
  * A row must be a whole number of blocks (32 weights for the legacy types, 256 for k-quants);
    otherwise SpecError names the types that fit that width. llama.cpp's own mixtures replace a
    k-quant there by a legacy type (see `gguf_mix`); this format does not substitute silently.
  * Block scales are fp16. A weight so large that a scale overflows fp16 raises ValueError
    (ggml would write an inf scale); NaN and Inf weights are refused at the boundary.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..spec import SpecError
from . import register_format
from . import gguf_legacy, kquants  # noqa: F401  (register the block codecs)
from .ggml_codec import CODECS
from .qtensor import FormatConfig, QTensor, require_finite

GGUFType = Literal["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
GGUF_TYPES: tuple[str, ...] = typing.get_args(GGUFType)


def types_for_width(n: int) -> list[str]:
    """The GGUF types whose block divides a row of n weights."""
    return [t for t in GGUF_TYPES if n % GGML_QUANT_SIZES[GGMLQuantizationType[t]][0] == 0]


@dataclass(frozen=True)
class GGUFConfig(FormatConfig):
    name = "gguf"
    type: GGUFType

    def __post_init__(self) -> None:
        if self.type not in GGUF_TYPES:
            raise SpecError(f"gguf: unknown type {self.type!r}; choose one of {', '.join(GGUF_TYPES)}")

    @property
    def ggml_type(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.type]

    def spec(self) -> str:
        return f"gguf:{self.type}"  # the bare value fills `type`: parses back to this config

    def check_shape(self, shape: tuple[int, ...]) -> None:
        super().check_shape(shape)
        block, _ = GGML_QUANT_SIZES[self.ggml_type]
        if shape[1] % block:
            fits = types_for_width(shape[1])
            raise SpecError(
                f"{self.spec()}: the row length {shape[1]} is not a multiple of the {self.type} block "
                f"({block} weights); types that fit this width: {', '.join(fits) or 'none'}"
            )

    def bits_per_weight(self, shape: tuple[int, int] | None = None) -> float:
        block, size = GGML_QUANT_SIZES[self.ggml_type]
        return 8.0 * size / block


@dataclass(frozen=True, eq=False)
class GGUFQTensor(QTensor):
    blocks: torch.Tensor  # (rows, bytes_per_row) uint8: the tensor's data in a GGUF file

    @property
    def ggml_type(self) -> GGMLQuantizationType:
        """The `GGMLQuantizationType` of `blocks`, as a GGUF file's tensor info records it."""
        return self.config.ggml_type

    def select_rows(self, rows: torch.Tensor) -> GGUFQTensor:
        """Every row is a whole number of blocks, so a subset of rows is a GGUF tensor itself."""
        blocks = self.blocks[rows]  # (k, bytes_per_row)
        return GGUFQTensor(config=self.config, shape=(blocks.shape[0], self.shape[1]), dtype=self.dtype, blocks=blocks)

    @staticmethod
    def from_blocks(blocks: torch.Tensor, ggml_type: GGMLQuantizationType | str, shape: tuple[int, int],
                    dtype: torch.dtype = torch.float32) -> GGUFQTensor:
        """Wrap the bytes of a GGUF tensor (rows, bytes_per_row) of a supported type."""
        name = ggml_type if isinstance(ggml_type, str) else ggml_type.name
        cfg = GGUFConfig(type=name)
        cfg.check_shape(tuple(shape))
        block, size = GGML_QUANT_SIZES[cfg.ggml_type]
        expect = (shape[0], shape[1] // block * size)
        if blocks.dtype != torch.uint8 or tuple(blocks.shape) != expect:
            raise ValueError(f"{cfg.spec()}: expected uint8 blocks of shape {expect}, got {blocks.dtype} {tuple(blocks.shape)}")
        return GGUFQTensor(config=cfg, shape=tuple(shape), dtype=dtype, blocks=blocks)


@register_format
class GGUFFormat:
    config_type = GGUFConfig
    qtensor_type = GGUFQTensor
    description = "llama.cpp GGUF block types (legacy Q*_0/Q*_1 and k-quants), byte-exact with libggml"
    checks_finite = True  # the legacy codecs screen their blocks; the others are checked first

    @staticmethod
    def quantize(w: torch.Tensor, cfg: GGUFConfig) -> GGUFQTensor:
        codec = CODECS[cfg.ggml_type]
        if not codec.screens:
            require_finite(w, cfg)
        rows, n = w.shape
        x = w.contiguous().reshape(-1, codec.block_size)  # (n_blocks, block_size), row after row
        blocks, suspect = codec.quantize_all(x)
        if suspect:  # a codec that screens flagged a block: find out what is wrong, and say so
            if codec.screens:
                require_finite(w, cfg)
            scales = blocks[:, codec.f16_fields].contiguous().view(torch.float16)
            if bool(torch.isinf(scales).any()):
                raise ValueError(
                    f"{cfg.spec()}: a block scale overflows fp16 (largest |w| = {w.abs().max().item():.4g}); "
                    "GGUF stores block scales as fp16 and cannot hold weights this large"
                )
        return GGUFQTensor(config=cfg, shape=(rows, n), dtype=w.dtype, blocks=blocks.reshape(rows, n // codec.block_size * codec.type_size))

    @staticmethod
    def dequantize(q: GGUFQTensor) -> torch.Tensor:
        codec = CODECS[q.ggml_type]
        return codec.dequantize_blocks(q.blocks.reshape(-1, codec.type_size)).reshape(q.shape)
