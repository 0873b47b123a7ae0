"""Round-to-nearest: every selected linear layer stored in one format, no calibration.

`absmax` and `zeropoint` are the classic int8 tutorials' names (symmetric and asymmetric
integer quantization, per tensor by default); they are spellings of the `int` format, not a
second implementation. Every registered format is also a method of its own name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..formats import FormatConfig, get_format
from ..formats.integer import IntConfig
from ..layers import LayerRule, quantize_layers
from ..sources import Calibration, Reference
from ..spec import SpecError, format_config
from . import copy_variant, register_method


def rtn_variant(ref: Reference, name: str, cfg: FormatConfig, rule: LayerRule = LayerRule()):
    """The reference with the layers `rule` selects quantized round-to-nearest to `cfg`."""
    return copy_variant(ref, name, lambda m: quantize_layers(m, rule.select(m), lambda _n, _w: cfg))


def format_method(fname: str) -> type:
    """A method that quantizes the selected linear layers to format `fname`."""
    fmt = get_format(fname)

    class FormatMethod:
        name = fname
        config_type = fmt.config_type
        description = f"round-to-nearest: {fmt.description}"
        needs_calibration = False
        requires = getattr(fmt, "requires", ())

        @staticmethod
        def build(ref: Reference, cfg: FormatConfig, calib: Calibration | None, rule: LayerRule = LayerRule()):
            return rtn_variant(ref, cfg.spec(), cfg, rule)

    return FormatMethod


Granularity = Literal["tensor", "channel", "group"]


@dataclass(frozen=True)
class ClassicConfig:
    bits: int = 8
    granularity: Granularity = "tensor"
    group: int = 128  # used when granularity=group

    def __post_init__(self) -> None:
        if self.granularity != "group" and self.group != 128:
            raise SpecError("group= only applies with granularity=group")

    def int_config(self, sym: bool) -> IntConfig:
        group = {"tensor": -1, "channel": 0, "group": self.group}[self.granularity]
        return IntConfig(bits=self.bits, sym=sym, group=group)


def _classic(name: str, sym: bool, what: str) -> type:
    @dataclass(frozen=True)
    class Config(ClassicConfig):
        pass

    Config.__name__ = f"{name.capitalize()}Config"

    class Classic:
        config_type = Config
        description = what

        @staticmethod
        def build(ref: Reference, cfg: ClassicConfig, calib: Calibration | None, rule: LayerRule = LayerRule()):
            return rtn_variant(ref, format_config(cfg, name), cfg.int_config(sym), rule)

    Classic.__name__ = name.capitalize()
    return register_method(name)(Classic)


Absmax = _classic("absmax", True, "symmetric integer RTN (the int format with sym=true)")
Zeropoint = _classic("zeropoint", False, "asymmetric integer RTN with a zero point (the int format with sym=false)")
