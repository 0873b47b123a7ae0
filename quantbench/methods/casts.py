"""The reference precision and its casts: fp32, bf16, fp16 (every parameter cast, logits in fp32)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sources import Calibration, Reference
from . import copy_variant, register_method


def _cast(name: str, dtype: torch.dtype, what: str) -> type:
    @dataclass(frozen=True)
    class CastConfig:
        pass

    class Cast:
        config_type = CastConfig
        description = what

        @staticmethod
        def build(ref: Reference, cfg: CastConfig, calib: Calibration | None):
            return copy_variant(ref, name, lambda m: (m.to(dtype), {})[1])

    CastConfig.__name__ = f"{name.capitalize()}Config"
    Cast.__name__ = f"{name.capitalize()}Cast"
    return register_method(name)(Cast)


FP32 = _cast("fp32", torch.float32, "float32 weights and activations (the reference on the CPU)")
BF16 = _cast("bf16", torch.bfloat16, "bfloat16 cast of every parameter")
FP16 = _cast("fp16", torch.float16, "float16 cast of every parameter")
