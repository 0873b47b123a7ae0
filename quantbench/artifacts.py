"""Saving a quantized model to a directory and loading it back bit for bit.

    DIR/config.json            the model's transformers config
    DIR/tokenizer*             its tokenizer
    DIR/model.safetensors      every parameter and buffer; QLinear layers as their QTensor's
                               tensors (`<layer>.codes`, `<layer>.scale`, ...)
    DIR/quantbench.json        what made it: model source and weights hash, method spec, and
                               for each quantized layer its format, config, shape and dtype;
                               quantized embeddings (QEmbedding) likewise, and output heads tied
                               to one (TiedQLinear: no tensors of their own)

`load_quantized(DIR)` rebuilds the architecture from config.json, puts a QLinear holding the
stored QTensor in place of each quantized layer, and loads the rest: weights and logits equal the
saved variant's exactly.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .formats.qtensor import QTensor
from .layers import QEmbedding, QLinear, TiedQLinear, set_module
from .variant import TorchVariant

MANIFEST = "quantbench.json"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    pass


def save_quantized(variant: TorchVariant, tokenizer, out_dir: str | Path, source: dict, spec: str) -> Path:
    """Write `variant` to `out_dir` (replaced whole: written beside it, then renamed)."""
    from safetensors.torch import save_model

    if not isinstance(variant, TorchVariant):
        raise ArtifactError(f"{spec}: only torch variants can be saved as a quantbench directory; "
                            f"this one is a {type(variant).__name__}")
    model = variant.model
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    layers = {
        name: m.qtensor.metadata() | {"has_bias": m.bias is not None}
        for name, m in model.named_modules()
        if isinstance(m, QLinear)
    }
    embeddings = {
        name: m.qtensor.metadata() | {"padding_idx": m.padding_idx}
        for name, m in model.named_modules()
        if isinstance(m, QEmbedding)
    }
    names = {m: n for n, m in model.named_modules()}
    tied = {name: names[m.embedding] for name, m in model.named_modules() if isinstance(m, TiedQLinear)}
    model.config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    manifest = {
        "format_version": FORMAT_VERSION,
        "method": spec,
        "model": source,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "layers": layers,
        "embeddings": embeddings,
        "tied_heads": tied,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model saved by `save_quantized` (or `quantbench quantize`), ready to run."""
    from safetensors import safe_open
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    d = Path(path)
    if not (d / MANIFEST).is_file():
        raise ArtifactError(f"{d} is not a quantbench model directory (no {MANIFEST}); make one with `quantbench quantize`")
    manifest = json.loads((d / MANIFEST).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{d}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}")
    config = AutoConfig.from_pretrained(d)
    dtype = getattr(torch, manifest["dtype"])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())

        def stored(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix) and k != prefix + "bias"}

        for name, meta in manifest["layers"].items():
            meta = dict(meta)
            has_bias = meta.pop("has_bias")
            q = QTensor.from_parts(meta, stored(name + "."))
            bias = f.get_tensor(name + ".bias") if has_bias else None
            set_module(model, name, QLinear(q, bias))
        for name, meta in manifest.get("embeddings", {}).items():
            meta = dict(meta)
            padding_idx = meta.pop("padding_idx")
            set_module(model, name, QEmbedding(QTensor.from_parts(meta, stored(name + ".")), padding_idx))
        for name, emb in manifest.get("tied_heads", {}).items():
            set_module(model, name, TiedQLinear(model.get_submodule(emb)))
    missing, unexpected = load_model(model, str(d / "model.safetensors"), strict=False)
    if unexpected or [k for k in missing if not k.endswith("inv_freq")]:
        raise ArtifactError(f"{d}: stored tensors do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device).eval()
