"""Selective quantization: keep some layers in the reference precision, quantize the rest with
any other method (the classic tutorials' recipe: leave the embeddings, the output head and the
first and last blocks alone).

    selective                                   int 4-bit groups of 64, keep the defaults
    selective:method=gptq;bits=4;group=64       the inner method's spec, `;` for its `,`
    selective:method=awq;bits=4,keep=first|*.down_proj

The inner spec is written with `;` between its parameters, because `,` separates the parameters
of `selective` itself: `gptq;bits=4;group=64` means `gptq:bits=4,group=64` (a `:` after the name
works too). `keep` is a `|`-separated list of fnmatch patterns on module names
(`model.layers.0.*`, `*.down_proj`) and of the words
    first, last    the first and the last decoder block
    lm_head        the output head (without it the head is quantized too: RTN methods only)
    embeddings     the token embeddings (never quantized by these methods: they are not linear)
A pattern that matches no linear layer is an error, as is an inner method that cannot be
restricted to some layers (the casts).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn

from ..layers import LayerRule
from ..sources import Calibration, Reference
from ..spec import SpecError, format_config
from . import missing_requirements, parse_method, register_method
from .calibrate import decoder_blocks

WORDS = ("first", "last", "lm_head", "embeddings")


def inner_spec(method: str) -> str:
    """`gptq;bits=4;group=64` (or `gptq:bits=4;group=64`) -> `gptq:bits=4,group=64`."""
    name, _, rest = method.partition(";")
    name, colon, first = name.partition(":")
    params = [p for p in ([first] if colon else []) + rest.split(";") if p.strip()]
    return name.strip() + (":" + ",".join(params) if params else "")


@dataclass(frozen=True)
class SelectiveConfig:
    method: str = "int;bits=4;group=64;sym=false"
    keep: tuple[str, ...] = ("embeddings", "lm_head", "first", "last")

    def __post_init__(self) -> None:
        inner = self.inner()  # fails early on a bad inner spec
        if inner.name == "selective":
            raise SpecError("selective: the inner method cannot be selective itself")
        if not self.keep:
            raise SpecError(f"selective: keep is empty; give patterns or words ({', '.join(WORDS)}) separated by |")

    def inner(self):
        try:
            return parse_method(inner_spec(self.method))
        except SpecError as e:
            raise SpecError(
                f"selective: inner method {self.method!r}: {e} "
                f"(write the inner spec with ';' between its parameters, e.g. method=gptq;bits=4;group=64)"
            ) from None

    def rule(self, model: nn.Module) -> LayerRule:
        """The layers the inner method may quantize: all but the kept ones."""
        exclude = []
        for item in self.keep:
            if item in ("first", "last"):
                prefix, blocks = decoder_blocks(model)
                exclude.append(f"{prefix}.{0 if item == 'first' else len(blocks) - 1}.*")
            elif item not in ("lm_head", "embeddings"):
                exclude.append(item)
        return LayerRule(exclude=tuple(exclude), lm_head="lm_head" not in self.keep)


@register_method("selective")
class Selective:
    config_type = SelectiveConfig
    description = "keep layers matching patterns (default: embeddings, lm_head, first and last block) in reference precision, quantize the rest with another method"
    needs_calibration = False  # the inner method's own needs are checked when building

    @staticmethod
    def build(ref: Reference, cfg: SelectiveConfig, calib: Calibration | None):
        inner = cfg.inner()
        missing = missing_requirements(inner.method)
        if missing:
            raise SpecError(f"selective: method {inner} needs {', '.join(missing)}, which is not installed here")
        if inner.method.needs_calibration and calib is None:
            raise SpecError(f"selective: method {inner} needs calibration data")
        if "rule" not in inspect.signature(inner.method.build).parameters:
            raise SpecError(f"selective: method {inner.name!r} does not quantize chosen layers; use a format or a calibrated method")
        variant = inner.method.build(ref, inner.config, calib, rule=cfg.rule(ref.model))
        variant.name = format_config(cfg, "selective")
        return variant
