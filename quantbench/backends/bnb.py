"""bitsandbytes as variants: its own modules, run by its own kernels, on the CPU or CUDA.

    bnb-int8:threshold=6.0                         LLM.int8() (Dettmers et al. 2022, arXiv:2208.07339):
                                                   int8 rows with an absmax scale each; activation
                                                   columns above the outlier threshold run in fp16
    bnb-nf4:double_quant=true,compute_dtype=fp32   NF4 (Dettmers et al. 2023, QLoRA, arXiv:2305.14314)
    bnb-fp4:block=64                               FP4 (E2M1), the same blockwise absmax scaling

Two ways to build, both ending in bitsandbytes' `Linear8bitLt` / `Linear4bit` modules:
  * `loader=transformers`: `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`,
    transformers' own path and what most users run. It works on the CPU with bitsandbytes 0.50
    and on CUDA, but only for a model transformers can re-read from a directory or the hub (it
    refuses a quantization config together with a .gguf file) and only with bitsandbytes'
    default 4-bit block of 64 (BitsAndBytesConfig has no block size).
  * `loader=replace`: a copy of the in-memory reference whose linear layers (nn.Linear, and
    GPT-2's Conv1D taken in nn.Linear orientation) become bitsandbytes modules holding their
    weights; bitsandbytes quantizes them when they are moved to the device, as it does inside
    transformers. Works for every source and block size.
  * `loader=auto` (the default): transformers where it applies, else replace. The two give
    byte-identical weights (tests/backends/test_bnb.py).
Both leave the output head in float, as transformers does by default (`llm_int8_skip_modules`).

Weight bytes are read from the tensors bitsandbytes really keeps: the packed data
(`Int8Params`/`Params4bit`), the int8 row scales (`SCB`), the 4-bit block absmaxes and, with
double quantization, their 8-bit codes' second-level absmaxes and offset. The codebooks (16
floats for NF4/FP4, 256 for the nested dynamic map) are constants of the format, the same for
every layer and model, and are not counted, as our own nf4 format does not count them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..layers import LayerRule, count_weights, get_module, get_weight, set_module, weight_bytes
from ..methods import register_method
from ..sources import Calibration, Reference
from ..sources.models import DTYPES
from ..spec import SpecError, format_config
from ..variant import TorchVariant

BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the block sizes bitsandbytes' quantize_4bit is built for
Loader = Literal["auto", "transformers", "replace"]


@dataclass(frozen=True)
class BnbInt8Config:
    threshold: float = 6.0  # activation outlier threshold; 0 turns the fp16 outlier path off
    loader: Loader = "auto"

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise SpecError(f"bnb-int8: threshold={self.threshold} must be >= 0 (0 disables the outlier path)")


@dataclass(frozen=True)
class Bnb4bitConfig:
    double_quant: bool = False  # bnb's compress_statistics; BitsAndBytesConfig's default is off
    compute_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    block: int = 64
    loader: Loader = "auto"

    def __post_init__(self) -> None:
        if self.block not in BLOCKS:
            raise SpecError(f"bnb 4-bit: block={self.block} is not supported; choose one of {', '.join(map(str, BLOCKS))}")
        if self.loader == "transformers" and self.block != 64:
            raise SpecError("bnb 4-bit: loader=transformers has no block size (BitsAndBytesConfig uses 64); use loader=replace")


class BnbVariant(TorchVariant):
    """A TorchVariant whose weight bytes include what bitsandbytes keeps beside its parameters."""

    def weight_bytes(self) -> int:
        return weight_bytes(self.model) + bnb_state_bytes(self.model)

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        with _quiet_int8_cast():
            return super().logits(ids, out)

    def _greedy(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
        with _quiet_int8_cast():
            return super()._greedy(ids, mask, max_new_tokens)


@contextlib.contextmanager
def _quiet_int8_cast():
    """bitsandbytes logs "inputs will be cast from float32 to float16" on every int8 matmul with
    float32 input (its int8 path quantizes activations from fp16); once is news, every call is noise."""
    log = logging.getLogger("bitsandbytes.autograd._functions")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def bnb_state_bytes(model: nn.Module) -> int:
    """Bytes of the quantization state bitsandbytes keeps outside parameters and buffers."""
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    seen: set[int] = set()
    total = 0
    for m in model.modules():
        tensors: list[torch.Tensor | None] = []
        if isinstance(m, Linear8bitLt):  # SCB moves from the weight to the module's state on first use
            tensors = [getattr(m.weight, "SCB", None), m.state.SCB]
        elif isinstance(m, Linear4bit) and m.weight.quant_state is not None:
            qs = m.weight.quant_state
            tensors = [qs.absmax, qs.offset]
            if getattr(qs, "state2", None) is not None:
                tensors.append(qs.state2.absmax)
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def _int8_layer(w: torch.Tensor, bias: torch.Tensor | None, cfg: BnbInt8Config, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    out_f, in_f = w.shape
    lin = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False, threshold=cfg.threshold, device="meta")
    # Int8Params quantizes (row absmax, via fp16) when it moves from the CPU to a device
    lin.weight = bnb.nn.Int8Params(w.detach().cpu().contiguous(), requires_grad=False, has_fp16_weights=False).to(device)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().to(device), requires_grad=False)
    return lin


def _4bit_layer(w: torch.Tensor, bias: torch.Tensor | None, cfg: Bnb4bitConfig, quant_type: str, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    out_f, in_f = w.shape
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=DTYPES[cfg.compute_dtype],
                            compress_statistics=cfg.double_quant, quant_type=quant_type, device="meta")
    # Params4bit quantizes (blockwise absmax, optional double quantization) when moved to a device
    lin.weight = bnb.nn.Params4bit(w.detach().cpu().contiguous(), requires_grad=False, blocksize=cfg.block,
                                   compress_statistics=cfg.double_quant, quant_type=quant_type, module=lin).to(device)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().to(device), requires_grad=False)
    return lin


def _replace(ref: Reference, make) -> tuple[nn.Module, list[str]]:
    import copy

    model = copy.deepcopy(ref.model)
    names = LayerRule().select(model)  # every linear layer but the output head
    for name in names:
        m = get_module(model, name)
        set_module(model, name, make(get_weight(m), getattr(m, "bias", None), ref.device))
    return model, names


def _transformers(ref: Reference, quantization_config) -> tuple[nn.Module, list[str]]:
    from bitsandbytes.nn import Linear4bit, Linear8bitLt
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        ref.info.path, quantization_config=quantization_config, dtype=DTYPES[ref.dtype], device_map={"": ref.device}
    )
    names = [n for n, m in model.named_modules() if isinstance(m, (Linear8bitLt, Linear4bit))]
    return model, names


def _use_transformers(ref: Reference, loader: Loader, block: int = 64) -> bool:
    reloadable = ref.info.kind in ("directory", "hub")
    if loader == "transformers" and not reloadable:
        raise SpecError(
            f"loader=transformers cannot quantize a {ref.info.kind} model: transformers refuses a quantization "
            "config with a .gguf file; use loader=replace (or auto)"
        )
    return loader == "transformers" or (loader == "auto" and reloadable and block == 64)


def _keep_compute_dtype(built: tuple[nn.Module, list[str]], compute_dtype: str) -> tuple[nn.Module, list[str]]:
    """On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight at its first
    forward and multiplies in bf16, whatever compute dtype the layer was given; it also fails on a
    layer narrower than one block. Measured on such a Xeon, a tiny Llama's logits moved by up to
    2.7e-3 from fp32 dequantize-and-multiply. Unless bf16 is the compute dtype asked for, the
    layers keep bitsandbytes' generic CPU path, which multiplies in the compute dtype, as on every
    other CPU."""
    from bitsandbytes.nn import Linear4bit

    if compute_dtype != "bf16":
        for m in built[0].modules():
            if isinstance(m, Linear4bit):
                m.support_avx512bf16_for_cpu = False
    return built


def _variant(name: str, ref: Reference, cfg, built: tuple[nn.Module, list[str]]) -> BnbVariant:
    model, names = built
    layer_spec = format_config(dataclasses.replace(cfg, loader="auto"), name)  # the format, not how it was built
    return BnbVariant(name=format_config(cfg, name), model=model, n_weights=count_weights(ref.model),
                      layer_specs={n: layer_spec for n in names})


@register_method("bnb-int8")
class BnbInt8:
    config_type = BnbInt8Config
    description = "bitsandbytes LLM.int8(): int8 weights with fp16 outlier columns (Linear8bitLt)"
    requires = ("bitsandbytes",)

    @staticmethod
    def build(ref: Reference, cfg: BnbInt8Config, calib: Calibration | None) -> BnbVariant:
        if _use_transformers(ref, cfg.loader):
            from transformers import BitsAndBytesConfig

            qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=cfg.threshold)
            return _variant("bnb-int8", ref, cfg, _transformers(ref, qc))
        return _variant("bnb-int8", ref, cfg, _replace(ref, lambda w, b, d: _int8_layer(w, b, cfg, d)))


def _four_bit(quant_type: str, what: str) -> type:
    name = f"bnb-{quant_type}"

    class Bnb4bit:
        config_type = Bnb4bitConfig
        description = what
        requires = ("bitsandbytes",)

        @staticmethod
        def build(ref: Reference, cfg: Bnb4bitConfig, calib: Calibration | None) -> BnbVariant:
            if _use_transformers(ref, cfg.loader, cfg.block):
                from transformers import BitsAndBytesConfig

                qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                        bnb_4bit_use_double_quant=cfg.double_quant,
                                        bnb_4bit_compute_dtype=DTYPES[cfg.compute_dtype])
                built = _transformers(ref, qc)
            else:
                built = _replace(ref, lambda w, b, d: _4bit_layer(w, b, cfg, quant_type, d))
            return _variant(name, ref, cfg, _keep_compute_dtype(built, cfg.compute_dtype))

    Bnb4bit.__name__ = f"Bnb{quant_type.upper()}"
    return register_method(name)(Bnb4bit)


BnbNF4 = _four_bit("nf4", "bitsandbytes NF4: 4-bit normal-float codes, blockwise absmax (Linear4bit)")
BnbFP4 = _four_bit("fp4", "bitsandbytes FP4: 4-bit E2M1 codes, blockwise absmax (Linear4bit)")
