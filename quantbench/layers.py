"""Model plumbing: find the linear layers of a model, read their weights, swap in QLinear.

Two kinds of linear layer exist in the models we load: `nn.Linear`, whose weight is
(out_features, in_features), and transformers' `Conv1D` (GPT-2 and its kin), whose weight is
stored transposed, (in_features, out_features). Everything below reads and writes weights in
`nn.Linear` orientation through `get_weight`/`set_weight`, so formats and methods never see the
difference.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from .formats import FormatConfig, QTensor, get_format, quantize_tensor
from .spec import SpecError

try:  # transformers keeps Conv1D in pytorch_utils
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment]


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, Conv1D, QLinear))


def get_weight(m: nn.Module) -> torch.Tensor:
    """The weight of a linear layer as (out_features, in_features)."""
    if isinstance(m, QLinear):
        return m.qtensor.dequantize()
    if isinstance(m, Conv1D):
        return m.weight.t()
    return m.weight


def set_weight(m: nn.Module, w: torch.Tensor) -> None:
    """Write a (out_features, in_features) weight into a float linear layer, in place."""
    with torch.no_grad():
        m.weight.copy_(w.t() if isinstance(m, Conv1D) else w)


def iter_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if is_linear(m):
            yield name, m


def output_embedding_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get else None
    if head is None:
        return None
    for name, m in model.named_modules():
        if m is head:
            return name
    return None


@dataclass(frozen=True)
class LayerRule:
    """Which linear layers a method touches: fnmatch patterns on module names.

    The output head (`lm_head`) is left alone unless asked for: in models with tied embeddings
    quantizing it saves nothing, since the embedding keeps the float matrix.
    """

    include: tuple[str, ...] = ()  # empty: every linear layer
    exclude: tuple[str, ...] = ()
    lm_head: bool = False

    def select(self, model: nn.Module) -> list[str]:
        head = output_embedding_name(model)
        names = [n for n, _ in iter_linears(model)]
        for pat in self.include + self.exclude:
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                raise SpecError(
                    f"layer pattern {pat!r} matches no linear layer; names look like {', '.join(names[:4])}"
                )
        chosen = [
            n
            for n in names
            if (not self.include or any(fnmatch.fnmatchcase(n, p) for p in self.include))
            and not any(fnmatch.fnmatchcase(n, p) for p in self.exclude)
            and (self.lm_head or n != head)
        ]
        if not chosen:
            raise SpecError("no linear layer to quantize: the model has none, or the layer rule excludes them all")
        return chosen


class QLinear(nn.Module):
    """A linear layer that stores its weight as a QTensor and dequantizes it on each call.

    The QTensor's tensors are buffers, so `.to(device)`, `state_dict()` and memory accounting see
    exactly what the format stores and nothing more.
    """

    def __init__(self, q: QTensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self._qtype = type(q)
        self._meta = (q.config, tuple(q.shape), q.dtype)
        for k, v in q.tensors().items():
            self.register_buffer(k, v)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def qtensor(self) -> QTensor:
        config, shape, dtype = self._meta
        return self._qtype(config=config, shape=shape, dtype=dtype, **dict(self.named_buffers(recurse=False)))

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized float copy, for code that reads `.weight` (not stored)."""
        return self.qtensor.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = get_format(self._meta[0].name).dequantize(self.qtensor).to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self._meta[0].spec()}"


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_layers(
    model: nn.Module,
    names: list[str],
    config_for: Callable[[str, torch.Tensor], FormatConfig | str | None],
) -> dict[str, str]:
    """Replace each named linear layer by a QLinear holding its weight in the format that
    `config_for(name, weight)` returns (None keeps the layer as it is). Returns name -> spec."""
    chosen: dict[str, str] = {}
    for name in names:
        m = get_module(model, name)
        w = get_weight(m)
        cfg = config_for(name, w)
        if cfg is None:
            continue
        q = quantize_tensor(w, cfg)
        set_module(model, name, QLinear(q, getattr(m, "bias", None)))
        chosen[name] = q.config.spec()
    return chosen


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model stores, shared storage counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def count_weights(model: nn.Module) -> int:
    """Number of weight elements of the float model (parameters, tied ones counted once), the
    denominator of bits per weight."""
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        n += p.numel()
    return n
