"""Model FLOPs of a forward pass and the machine's fp32 matrix-multiply FLOPs per second, for
the reference-throughput benchmark: achieved model FLOPs/s over what a plain matmul reaches on
the same machine in the same run (the "model FLOPs utilization" of Chowdhery et al. 2022, PaLM,
appendix B, with the measured matmul rate standing in for the hardware peak).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from ..layers import get_weight, iter_linears


def forward_flops(model: nn.Module, tokens: int) -> float:
    """FLOPs of one forward over a (1, tokens) window: 2 per multiply-add in every linear layer
    (output head included), plus causal attention's QK^T and AV, 2 * T^2 * d per layer in all
    (half of the full T x T products: the masked half is not useful work). Norms, activations and
    softmax are not counted."""
    linear = sum(get_weight(m).numel() for _, m in iter_linears(model))
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer")
    width = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    return 2.0 * linear * tokens + 2.0 * tokens * tokens * width * layers


def matmul_flops_per_s(n: int = 2048, repeats: int = 5, device: torch.device | str = "cpu") -> float:
    """fp32 (n x n) @ (n x n) FLOPs per second, the median of `repeats` runs after a warm-up."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    times = []
    for i in range(repeats + 1):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    return 2.0 * n**3 / statistics.median(times)
