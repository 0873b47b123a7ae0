"""Spec strings: the one textual form for formats and methods, on the CLI and in Python.

    "int:bits=4,group=128,sym=false"   -> ("int", {"bits": "4", "group": "128", "sym": "false"})
    "gguf:Q4_K"                          -> ("gguf", {"type": "Q4_K"})   (a bare value fills the
                                                                          config's first field)
    "fp32"                               -> ("fp32", {})

Values are coerced to the type of the matching field of a frozen config dataclass; unknown
names and values that do not parse raise `SpecError` with the list of what is valid.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

C = TypeVar("C")


class SpecError(ValueError):
    """A spec string, or one of its parameters, is not valid. The message says what would be."""


def parse_spec(spec: str) -> tuple[str, list[tuple[str | None, str]]]:
    """Split "name:k=v,k=v" into the name and its (key, value) pairs; a bare value has key None."""
    spec = spec.strip()
    if not spec:
        raise SpecError("empty spec: expected NAME or NAME:key=value,key=value")
    name, _, rest = spec.partition(":")
    name = name.strip()
    pairs: list[tuple[str | None, str]] = []
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        pairs.append((key.strip(), value.strip()) if eq else (None, key.strip()))
    return name, pairs


def _coerce(value: str, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value.lower() in ("none", "null", ""):
            return None
        return _coerce(value, args[0], where)
    if origin is typing.Literal:
        choices = typing.get_args(typ)
        for c in choices:
            if str(c).lower() == value.lower():
                return c
        raise SpecError(f"{where}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")
    if origin is tuple:
        inner = typing.get_args(typ)[0]
        return tuple(_coerce(v, inner, where) for v in filter(None, value.split("|")))
    if typ is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise SpecError(f"{where}={value!r} is not a boolean; use true or false")
    if typ in (int, float):
        try:
            return typ(value)
        except ValueError:
            raise SpecError(f"{where}={value!r} is not a {typ.__name__}") from None
    return value


def build_config(cls: type[C], pairs: list[tuple[str | None, str]], *, what: str) -> C:
    """Make a `cls` (a dataclass) from spec pairs, coercing each value to its field's type.

    `cls.__post_init__` is where a config checks its own ranges and raises `SpecError`.
    """
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    kwargs: dict[str, Any] = {}
    for key, value in pairs:
        if key is None:
            if not fields:
                raise SpecError(f"{what} takes no parameters, got {value!r}")
            key = names[0]
        if key not in names:
            valid = ", ".join(names) if names else "none"
            raise SpecError(f"{what} has no parameter {key!r}; valid parameters: {valid}")
        if key in kwargs:
            raise SpecError(f"{what}: parameter {key!r} given twice")
        kwargs[key] = _coerce(value, hints[key], f"{what} {key}")
    missing = [
        f.name
        for f in fields
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise SpecError(f"{what} needs parameter(s) {', '.join(missing)}")
    return cls(**kwargs)


def format_config(cfg: Any, name: str) -> str:
    """The canonical spec string of a config: only parameters that differ from the defaults."""
    parts = []
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        v = getattr(cfg, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING
        )
        if v == default:
            continue
        if isinstance(v, bool):
            v = str(v).lower()
        elif isinstance(v, tuple):
            v = "|".join(map(str, v))
        parts.append(f"{f.name}={v}")
    return name + (":" + ",".join(parts) if parts else "")


def describe_params(cls: type) -> list[tuple[str, str, str]]:
    """(name, type, default) for each parameter of a config dataclass, for `quantbench list`."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        t = hints[f.name]
        if typing.get_origin(t) is typing.Literal:
            tname = "|".join(map(str, typing.get_args(t)))
        else:
            tname = getattr(t, "__name__", str(t).replace("typing.", ""))
        default = f.default if f.default is not dataclasses.MISSING else "required"
        rows.append((f.name, tname, str(default)))
    return rows
