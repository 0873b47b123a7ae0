"""Saving a quantized torch variant and restoring it on top of its reference.

What is saved is what differs from the reference: for every `QLinear` and `QEmbedding` its
QTensor's stored tensors (codes, scales, zeros...) with the QTensor's metadata, which head is a
`TiedQLinear` of which embedding, and any other parameter or buffer a method changed (a cast,
AWQ's rescaled norms). Unchanged tensors are not written twice, so an
int4 variant of a 135M model takes ~60 MB, not the ~500 MB of its float copy. Restoring deep
copies the reference, swaps the quantized modules back in and assigns the changed tensors: the
restored variant computes bit for bit what the saved one did.

Variants whose modules are neither the reference's own nor quantbench's (bitsandbytes' Linear4bit, a
llama.cpp process) are not saveable here: `saveable()` says so and the caller just does not
cache them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from .formats import QTensor
from .layers import QEmbedding, QLinear, TiedQLinear, set_module
from .variant import TorchVariant

FILE = "variant.safetensors"


def saveable(variant: object, ref_model: nn.Module) -> bool:
    """True for a TorchVariant whose modules are the reference's own types, QLinear, QEmbedding,
    or a TiedQLinear of one of its QEmbeddings."""
    if type(variant) is not TorchVariant:
        return False
    ref_types = {n: type(m) for n, m in ref_model.named_modules()}
    inside_q: list[str] = []
    for name, m in variant.model.named_modules():
        if any(name.startswith(q + ".") for q in inside_q):
            continue
        if isinstance(m, (QLinear, QEmbedding)):
            inside_q.append(name)
        elif isinstance(m, TiedQLinear):
            if not any(e is m.embedding for e in variant.model.modules()):
                return False
        elif ref_types.get(name) is not type(m):
            return False
    return True


def save_variant(variant: TorchVariant, ref_model: nn.Module, directory: Path) -> dict:
    """Write the variant's difference from `ref_model` to `directory/variant.safetensors`;
    returns what `load_variant` needs besides the file (JSON-able)."""
    from safetensors.torch import save_file

    modules = dict(variant.model.named_modules())
    held = {n: m for n, m in modules.items() if isinstance(m, (QLinear, QEmbedding))}  # QTensor buffers
    ref_sd = _tensors(ref_model)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}  # tied tensors are stored once
    seen: dict[tuple, str] = {}
    for k, v in _tensors(variant.model).items():
        in_q = k.rpartition(".")[0] in held
        r = ref_sd.get(k)
        if not in_q and r is not None and r.dtype == v.dtype and r.shape == v.shape and torch.equal(r, v):
            continue  # the reference's own tensor
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if ident in seen:
            aliases[k] = seen[ident]
            continue
        seen[ident] = k
        tensors[k] = v.detach().contiguous().cpu()
    save_file(tensors, str(directory / FILE))
    return {
        "name": variant.name,
        "n_weights": variant.n_weights,
        "layer_specs": dict(variant.layer_specs),
        "qlinear": {n: m.qtensor.metadata() for n, m in held.items() if isinstance(m, QLinear)},
        "qembedding": {n: [m.qtensor.metadata(), m.padding_idx] for n, m in held.items() if isinstance(m, QEmbedding)},
        "tied_heads": {n: next(e for e, x in modules.items() if x is m.embedding)
                       for n, m in modules.items() if isinstance(m, TiedQLinear)},
        "aliases": aliases,
    }


def load_variant(directory: Path, info: dict, ref_model: nn.Module) -> TorchVariant:
    """The variant `save_variant` wrote, rebuilt on a deep copy of `ref_model`."""
    from safetensors.torch import load_file

    device = next(ref_model.parameters()).device
    stored = load_file(str(directory / FILE), device=str(device))
    stored.update({k: stored[v] for k, v in info["aliases"].items()})
    model = copy.deepcopy(ref_model)

    def parts_of(name: str) -> dict[str, torch.Tensor]:
        prefix = name + "."
        return {k[len(prefix):]: stored.pop(k) for k in list(stored) if k.startswith(prefix)}

    for name, meta in info["qlinear"].items():
        old = model.get_submodule(name)
        parts = parts_of(name)
        bias = parts.pop("bias", None)
        if bias is None and getattr(old, "bias", None) is not None:
            bias = old.bias
        set_module(model, name, QLinear(QTensor.from_parts(meta, parts), bias))
    for name, (meta, padding_idx) in info.get("qembedding", {}).items():
        set_module(model, name, QEmbedding(QTensor.from_parts(meta, parts_of(name)), padding_idx))
    for name, embedding in info.get("tied_heads", {}).items():
        set_module(model, name, TiedQLinear(model.get_submodule(embedding)))
    params: dict[str, nn.Parameter] = {}
    for k, t in stored.items():  # set each tensor in place of the reference's, tied ones to one object
        owner, _, leaf = k.rpartition(".")
        m = model.get_submodule(owner)
        if leaf in m._parameters:
            key = info["aliases"].get(k, k)
            params.setdefault(key, nn.Parameter(stored[key], requires_grad=False))
            m._parameters[leaf] = params[key]
        elif leaf in m._buffers:
            m._buffers[leaf] = t
        else:
            raise ValueError(f"saved variant holds {k}, which the model lacks")
    return TorchVariant(
        name=info["name"], model=model.eval(), n_weights=info["n_weights"], layer_specs=dict(info["layer_specs"])
    )


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, tied and non-persistent ones included (a cast also
    changes non-persistent buffers such as rotary frequencies, which state_dict() leaves out)."""
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return {k: v.detach() for k, v in out.items()}
