"""Methods: what turns the reference into a variant, registered by name.

A method has a frozen config dataclass (parsed from a spec string such as
``absmax:bits=8,granularity=channel``) and a `build(ref, cfg, calib) -> Variant`. Every format
is also a method: ``int:bits=4,group=64`` or ``gguf:Q4_K`` quantizes the selected linear layers
round-to-nearest in that format. Methods that need calibration data say so; methods that need
an optional library name it in `requires`, and are reported unavailable without it.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol

from torch import nn

from ..formats import formats, get_format
from ..layers import count_weights
from ..sources import Calibration, Reference
from ..spec import SpecError, build_config, format_config, parse_spec
from ..variant import TorchVariant, Variant


class Method(Protocol):
    name: ClassVar[str]
    config_type: ClassVar[type]
    description: ClassVar[str]
    needs_calibration: ClassVar[bool]
    requires: ClassVar[tuple[str, ...]]  # import names of optional libraries

    @staticmethod
    def build(ref: Reference, cfg: Any, calib: Calibration | None) -> Variant: ...


_METHODS: dict[str, type] = {}


def register_method(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in _METHODS:
            raise RuntimeError(f"method {name!r} registered twice")
        cls.name = name
        cls.needs_calibration = getattr(cls, "needs_calibration", False)
        cls.requires = getattr(cls, "requires", ())
        _METHODS[name] = cls
        return cls

    return deco


def methods() -> dict[str, type]:
    """Registered methods, then every format as a round-to-nearest method."""
    from .rtn import format_method

    out = dict(_METHODS)
    for fname in formats():
        out.setdefault(fname, format_method(fname))
    return out


def get_method(name: str) -> type:
    all_methods = methods()
    if name not in all_methods:
        raise SpecError(f"unknown method {name!r}; known methods: {', '.join(all_methods)}")
    return all_methods[name]


def missing_requirements(method: type) -> list[str]:
    return [r for r in method.requires if importlib.util.find_spec(r) is None]


@dataclass(frozen=True)
class MethodSpec:
    method: type
    config: Any

    @property
    def name(self) -> str:
        return self.method.name

    def __str__(self) -> str:
        return format_config(self.config, self.method.name) if dataclasses.is_dataclass(self.config) else self.name

    def build(self, ref: Reference, calib: Calibration | None = None) -> Variant:
        missing = missing_requirements(self.method)
        if missing:
            raise SpecError(f"method {self.name!r} needs {', '.join(missing)}, which is not installed here")
        if self.method.needs_calibration and calib is None:
            raise SpecError(f"method {self} needs calibration data")
        return self.method.build(ref, self.config, calib)


def parse_method(spec: str) -> MethodSpec:
    """``"absmax:bits=8,granularity=channel"`` -> MethodSpec; errors list what is valid."""
    name, pairs = parse_spec(spec)
    m = get_method(name)
    return MethodSpec(m, build_config(m.config_type, pairs, what=f"method {name!r}"))


def copy_variant(ref: Reference, name: str, transform: Callable[[nn.Module], dict[str, str]]) -> TorchVariant:
    """A deep copy of the reference model, changed in place by `transform`, which returns the
    format of each layer it changed."""
    model = copy.deepcopy(ref.model)
    layer_specs = transform(model)
    return TorchVariant(name=name, model=model, n_weights=count_weights(ref.model), layer_specs=layer_specs)


# Registration on import, in the order `quantbench list` shows them.
from . import casts, rtn, llm_int8, gptq, awq, selective, mixed, gguf_mix  # noqa: E402,F401
from ..backends import bnb, llamacpp_quantize  # noqa: E402,F401

__all__ = ["Method", "MethodSpec", "copy_variant", "get_format", "get_method", "methods", "parse_method", "register_method"]
