"""Formats: pure quantize/dequantize pairs over QTensors, registered by name.

A format is a class with a config dataclass, a QTensor subclass, and two static functions:

    quantize(w: Tensor (out, in), cfg) -> QTensor
    dequantize(q: QTensor) -> Tensor (out, in), float32

No module state, no models: methods and model plumbing live in higher layers.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Protocol

import torch

from ..spec import SpecError, build_config, parse_spec
from .qtensor import FormatConfig, QTensor, check_weight


class Format(Protocol):
    name: ClassVar[str]
    config_type: ClassVar[type]
    qtensor_type: ClassVar[type[QTensor]]
    description: ClassVar[str]
    # True if `quantize` finds NaN/Inf weights itself (and raises as `require_finite` does), so
    # that `quantize_tensor` need not make a pass of its own over the weight first.
    checks_finite: ClassVar[bool]

    @staticmethod
    def quantize(w: torch.Tensor, cfg) -> QTensor: ...

    @staticmethod
    def dequantize(q: QTensor) -> torch.Tensor: ...


_FORMATS: dict[str, Format] = {}


def register_format(cls: type) -> type:
    name = cls.config_type.name
    if name in _FORMATS:
        raise RuntimeError(f"format {name!r} registered twice")
    cls.name = name
    _FORMATS[name] = cls
    return cls


def get_format(name: str) -> Format:
    try:
        return _FORMATS[name]
    except KeyError:
        raise SpecError(f"unknown format {name!r}; known formats: {', '.join(sorted(_FORMATS))}") from None


def formats() -> dict[str, Format]:
    return dict(_FORMATS)


def parse_format_spec(spec: str) -> FormatConfig:
    name, pairs = parse_spec(spec)
    fmt = get_format(name)
    return build_config(fmt.config_type, pairs, what=f"format {name!r}")


def quantize_tensor(w: torch.Tensor, spec: str | FormatConfig) -> QTensor:
    """Quantize one 2-D weight (out_features, in_features) with a format spec such as
    ``"int:bits=4,group=128,sym=false"``, ``"nf4:block=64,double_quant=true"`` or ``"gguf:Q4_K"``."""
    cfg = parse_format_spec(spec) if isinstance(spec, str) else spec
    fmt = get_format(cfg.name)
    w32 = check_weight(w, cfg, finite=not getattr(fmt, "checks_finite", False))  # formats see float32
    return dataclasses.replace(fmt.quantize(w32, cfg), dtype=w.dtype)


def dequantize(q: QTensor) -> torch.Tensor:
    return q.dequantize()


# Registration happens on import; keep this list in the order `quantbench list` shows formats.
from . import integer, nf4, llm_int8, gguf  # noqa: E402,F401

__all__ = [
    "Format",
    "FormatConfig",
    "QTensor",
    "check_weight",
    "dequantize",
    "formats",
    "get_format",
    "parse_format_spec",
    "quantize_tensor",
    "register_format",
]
