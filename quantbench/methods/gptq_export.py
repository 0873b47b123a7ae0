"""Export a model whose linear layers hold int-format QTensors to the GPTQ checkpoint layout: the
"gptq" (v1) format that AutoGPTQ wrote, GPTQModel writes by default and transformers' GPTQ
integration loads.

Per quantized linear layer NAME (in = in_features, out = out_features, G groups, b bits):

    NAME.qweight  int32 (in * b / 32, out)   codes packed along the input dimension
    NAME.qzeros   int32 (G, out * b / 32)    zero points minus one, packed along the output dimension
    NAME.scales   float16 (G, out)
    NAME.g_idx    int32 (in,)                the group of each input column
    NAME.bias     (out,)                     when the layer has one

Dequantization: W[o, i] = scales[g, o] * (q[i, o] - (qzeros[g, o] + 1)), g = g_idx[i]. The "+ 1"
is the v1 format's offset: AutoGPTQ stored zero - 1, and loaders add it back.

Bit layout, for qweight along the input (and qzeros along the output) dimension: the codes form a
little-endian bit stream, code k in bits [k*b, (k+1)*b), cut into 32-bit words:

    4 bits: word = q0 | q1 << 4 | ... | q7 << 28
    3 bits: 32 codes in 3 words; codes 10 and 21 straddle two words (AutoGPTQ's 3-bit pack)

which is the int format's own row packing (`integer.pack_bits`) read four bytes at a time, so the
codes are written, not re-derived. Widths: 2, 3, 4 and 8 bits, as the GPTQ kernels accept.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..formats.integer import IntConfig, IntQTensor, pack_bits, unpack_bits
from ..layers import QLinear
from ..spec import SpecError

GPTQ_BITS = (2, 3, 4, 8)


def bytes_to_words(b: torch.Tensor) -> torch.Tensor:
    """(rows, 4k) uint8 -> (rows, k) int32, little-endian: byte 0 is the low byte of word 0."""
    w = b.to(torch.int64).view(b.shape[0], -1, 4)
    w = w[..., 0] | w[..., 1] << 8 | w[..., 2] << 16 | w[..., 3] << 24
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def words_to_bytes(w: torch.Tensor) -> torch.Tensor:
    """Inverse of `bytes_to_words`."""
    w = w.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.tensor([0, 8, 16, 24], device=w.device)
    return ((w.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).reshape(w.shape[0], -1)


def _check(q: IntQTensor, name: str) -> IntConfig:
    cfg: IntConfig = q.config
    out, n = q.shape
    if cfg.bits not in GPTQ_BITS:
        raise SpecError(f"{name}: the GPTQ layout stores {', '.join(map(str, GPTQ_BITS))} bits, not {cfg.bits}")
    if cfg.scale_dtype != "float16":
        raise SpecError(f"{name}: the GPTQ layout stores float16 scales; quantize with scale_dtype=float16")
    for what, size in (("in_features", n), ("out_features", out)):
        if size * cfg.bits % 32:
            raise SpecError(f"{name}: {what}={size} times {cfg.bits} bits is not a whole number of 32-bit words")
    return cfg


def to_gptq(q: IntQTensor, name: str = "layer") -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales and g_idx of one int-format QTensor."""
    if not isinstance(q, IntQTensor):
        raise SpecError(f"{name}: only int-format weights have a GPTQ layout, not {q.config.spec()}")
    cfg = _check(q, name)
    out, n = q.shape
    n_groups = q.scale.shape[1] if cfg.group >= 0 else 1
    scales = q.scale.to(torch.float16).expand(out, n_groups)  # per tensor: one scale for every row
    zero = torch.full_like(scales, 2 ** (cfg.bits - 1), dtype=torch.int64) if q.zero is None else q.zero.to(torch.int64)
    zero = zero.expand(out, n_groups)
    if q.g_idx is not None:
        g_idx = q.g_idx.to(torch.int32)
    else:
        g_idx = (torch.arange(n, device=q.codes.device) // cfg.group_size(n)).to(torch.int32) if n_groups > 1 else torch.zeros(n, dtype=torch.int32)
    stored_zero = (zero.t() - 1) % 2**cfg.bits  # (G, out), the v1 offset
    return {
        "qweight": bytes_to_words(q.codes).t().contiguous(),  # (in * b / 32, out)
        "qzeros": bytes_to_words(pack_bits(stored_zero, cfg.bits)),  # (G, out * b / 32)
        "scales": scales.t().contiguous(),  # (G, out)
        "g_idx": g_idx,
    }


def from_gptq(t: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """Dequantize one layer of a GPTQ checkpoint: (out, in) float32."""
    qweight, scales, g_idx = t["qweight"], t["scales"].float(), t["g_idx"].long()
    out, n = qweight.shape[1], g_idx.numel()
    q = unpack_bits(words_to_bytes(qweight.t().contiguous()), bits, n).long()  # (out, in)
    z = unpack_bits(words_to_bytes(t["qzeros"]), bits, out).long() + 1  # (G, out)
    return (q - z[g_idx].t()) * scales[g_idx].t()


def quantize_config(cfg: IntConfig, act_order: bool = False, static_groups: bool = False, damp: float = 0.01) -> dict:
    return {
        "bits": cfg.bits,
        "group_size": cfg.group if cfg.group > 0 else -1,
        "desc_act": act_order,
        "static_groups": static_groups,
        "sym": cfg.sym,
        "true_sequential": True,
        "damp_percent": damp,
        "lm_head": False,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "meta": {"quantizer": ["quantbench"]},
    }


def export_gptq(model: nn.Module, out_dir: str | Path, **options) -> Path:
    """Write `model` (its QLinear layers in one int format) as a GPTQ checkpoint directory:
    model.safetensors, config.json with its quantization_config, quantize_config.json.
    `options` (act_order, static_groups, damp) are recorded in the config."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    qlinears = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    if not qlinears:
        raise SpecError("the model has no quantized linear layers to export")
    configs = {m.qtensor.config for m in qlinears.values()}
    if len(configs) != 1:
        raise SpecError(f"a GPTQ checkpoint has one quantization config; this model mixes {len(configs)}")
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in qlinears or t.data_ptr() in seen:  # tied weights are stored once
            continue
        seen.add(t.data_ptr())
        tensors[key] = t.contiguous()
    for name, m in qlinears.items():
        for k, v in to_gptq(m.qtensor, name).items():
            tensors[f"{name}.{k}"] = v.cpu().contiguous()
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    qcfg = quantize_config(configs.pop(), **options)
    (out / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
    config = model.config.to_dict() if hasattr(model, "config") else {}
    config["quantization_config"] = qcfg
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    return out
