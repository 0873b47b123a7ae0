"""LLM.int8() as a method: every selected linear layer becomes an `Int8Linear`, which holds the
int8 weight (the `llm-int8` format) and runs the mixed-precision decomposition on each call
(Dettmers et al. 2022, arXiv:2208.07339; the math is quantbench.formats.llm_int8.mixed_linear).

`llm-int8:threshold=6.0` is the paper's and bitsandbytes' default; threshold=0 is plain
vector-wise int8 with no outlier features. The format alone, as a round-to-nearest method
(QLinear: dequantize, then a float matmul), would simulate only the weight half, so this method
takes the format's name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..formats import quantize_tensor
from ..formats.llm_int8 import Int8QTensor, LLMInt8Config, mixed_linear
from ..layers import LayerRule, QLinear, get_module, get_weight, set_module
from ..sources import Calibration, Reference
from ..spec import SpecError, format_config
from . import copy_variant, register_method


class Int8Linear(QLinear):
    """A QLinear whose forward is LLM.int8()'s: int8 x int8 for the regular input features, float
    for the outlier features (|x| >= threshold in some row of this call's input)."""

    def __init__(self, q: Int8QTensor, bias: torch.Tensor | None, threshold: float = 6.0):
        super().__init__(q, bias)
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mixed_linear(x, self.qtensor, self.threshold, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"


def int8_layers(model: nn.Module, names: list[str], threshold: float) -> dict[str, str]:
    """Swap each named linear layer (nn.Linear or GPT-2 Conv1D) for an Int8Linear, in place."""
    cfg = LLMInt8Config()
    for name in names:
        m = get_module(model, name)
        q = quantize_tensor(get_weight(m), cfg)
        set_module(model, name, Int8Linear(q, getattr(m, "bias", None), threshold))
    return {name: cfg.spec() for name in names}


@dataclass(frozen=True)
class LLMInt8MethodConfig:
    threshold: float = 6.0  # activation magnitude from which an input feature is an outlier

    def __post_init__(self) -> None:
        if not self.threshold >= 0:
            raise SpecError(f"llm-int8: threshold={self.threshold} is not valid; use 0 (no outliers) or a positive magnitude")


@register_method("llm-int8")
class LLMInt8:
    config_type = LLMInt8MethodConfig
    description = "LLM.int8(): int8 weights and activations, outlier features in float (= bitsandbytes Linear8bitLt)"

    @staticmethod
    def build(ref: Reference, cfg: LLMInt8MethodConfig, calib: Calibration | None, rule: LayerRule = LayerRule()):
        name = format_config(cfg, "llm-int8")
        return copy_variant(ref, name, lambda m: int8_layers(m, rule.select(m), cfg.threshold))
