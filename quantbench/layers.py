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


class QEmbedding(nn.Module):
    """A token embedding whose (vocab, hidden) matrix is a QTensor, as in a GGUF file.

    A lookup dequantizes only the rows it needs when the format stores rows independently
    (`QTensor.select_rows`, e.g. every GGUF type: a row is a whole number of blocks); for any
    other format it dequantizes the whole matrix on each call, which is correct but slow.
    """

    def __init__(self, q: QTensor, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.padding_idx = padding_idx  # kept for code that reads it; the stored row is what it is
        self._qtype = type(q)
        self._meta = (q.config, tuple(q.shape), q.dtype)
        for k, v in q.tensors().items():
            self.register_buffer(k, v)

    qtensor = QLinear.qtensor

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized float copy of the whole matrix (not stored)."""
        return self.qtensor.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.qtensor
        rows, inverse = torch.unique(ids, return_inverse=True)  # (k,), ids.shape
        sub = q.select_rows(rows)
        if sub is None:  # the format cannot split rows: dequantize everything
            return nn.functional.embedding(ids, q.dequantize())
        return sub.dequantize()[inverse]  # (*ids.shape, hidden)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self._meta[0].spec()}"


class TiedQLinear(nn.Module):
    """The output head of a model with tied embeddings, computing with the embedding's QTensor.

    llama.cpp writes no output matrix for such a model and multiplies by token_embd; so does
    this head. It holds a plain reference to the QEmbedding, not a submodule: the bytes live
    (and are saved, moved and counted) once, in the embedding.
    """

    def __init__(self, embedding: QEmbedding):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not registered: no second copy
        self.out_features, self.in_features = embedding.num_embeddings, embedding.embedding_dim
        self.bias = None

    @property
    def qtensor(self) -> QTensor:
        return self.embedding.qtensor

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.qtensor.dequantize().to(x.dtype))

    def extra_repr(self) -> str:
        return f"tied to the embedding, format={self.qtensor.config.spec()}"


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
