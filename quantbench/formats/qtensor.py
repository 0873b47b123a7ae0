"""QTensor: what a quantization format stores, and nothing else.

A QTensor is a frozen dataclass. The base carries the format's config, the original shape and
dtype; each format subclasses it with the tensors it stores (packed codes, scales, zeros...).
Its `nbytes` is the exact number of bytes those tensors occupy: a 4-bit weight really takes
half a byte per element plus its scales, because nothing else is kept.

Weights are 2-D in `nn.Linear` orientation, (out_features, in_features): blocks and groups run
along the input dimension, one row at a time, as in every format this package implements.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..spec import SpecError, format_config


class FormatConfig:
    """Mixin for the frozen config dataclass of a format. `name` is the registered format name."""

    name: ClassVar[str]

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise SpecError if a weight of this shape cannot be stored in this format."""
        if len(shape) != 2:
            raise SpecError(f"{self.spec()}: expected a 2-D weight (out_features, in_features), got shape {tuple(shape)}")

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        """Theoretical storage cost, scales and zeros included, for a weight of this shape."""
        raise NotImplementedError

    def spec(self) -> str:
        return format_config(self, self.name)


@dataclass(frozen=True, eq=False)
class QTensor:
    config: FormatConfig
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        # A QTensor holds exactly `nbytes` of memory: a field that is a view into a larger buffer
        # (a slice of a padded array) gets its own copy, or the padding would stay alive uncounted
        # and safetensors would refuse to save it.
        for name, t in self.tensors().items():
            if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
                object.__setattr__(self, name, t.contiguous().clone())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by field name, in declaration order."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors().values())).device

    def dequantize(self) -> torch.Tensor:
        from . import get_format

        return get_format(self.config.name).dequantize(self).to(self.dtype)

    def select_rows(self, rows: torch.Tensor) -> QTensor | None:
        """The QTensor of the given rows only, for formats whose rows are stored independently
        (a lookup table then dequantizes just those); None where rows share stored values."""
        return None

    def to(self, device: torch.device | str) -> QTensor:
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.tensors().items()})

    def equal(self, other: QTensor) -> bool:
        """Bit-for-bit equality of everything stored."""
        if type(self) is not type(other) or self.config != other.config:
            return False
        if tuple(self.shape) != tuple(other.shape) or self.dtype != other.dtype:
            return False
        a, b = self.tensors(), other.tensors()
        return a.keys() == b.keys() and all(
            a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k].cpu(), b[k].cpu()) for k in a
        )

    # -- persistence -------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        return {
            "format": self.config.name,
            "config": self.config.spec(),
            "shape": json.dumps(list(self.shape)),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    @classmethod
    def from_parts(cls, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> QTensor:
        """Rebuild a QTensor from `metadata()` and `tensors()`, as saved."""
        from . import get_format, parse_format_spec

        fmt = get_format(meta["format"])
        cfg = parse_format_spec(meta["config"])
        return fmt.qtensor_type(
            config=cfg, shape=tuple(json.loads(meta["shape"])), dtype=getattr(torch, meta["dtype"]), **tensors
        )

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in self.tensors().items()}, str(path), metadata=self.metadata())

    @staticmethod
    def load(path: str | Path) -> QTensor:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return QTensor.from_parts(meta, tensors)


def check_weight(w: torch.Tensor, cfg: FormatConfig, finite: bool = True) -> torch.Tensor:
    """Validate a weight at a format's boundary and return it as float32 on its own device.
    `finite=False` leaves the NaN/Inf check to a format that finds them in its own pass."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise SpecError(f"{cfg.spec()}: expected a floating-point weight, got {w.dtype}")
    cfg.check_shape(tuple(w.shape))
    w = w.detach().to(torch.float32)
    if finite:
        require_finite(w, cfg)
    return w


def require_finite(w: torch.Tensor, cfg: FormatConfig) -> None:
    """Raise if the weight holds a NaN or Inf, saying how many."""
    # A finite sum means every value is finite (one Inf or NaN makes the sum Inf or NaN), in one
    # pass and no temporary; only if it is not (or the sum overflowed) look at each value.
    if not torch.isfinite(w.sum()) and not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(f"{cfg.spec()}: the weight holds {bad} NaN or Inf value(s); quantize only finite weights")
