"""A histogram of one layer's weights before and after quantization, stored in each result row.

The layer is the same for every variant of a run (the first linear layer that is not the output
head, e.g. `model.layers.0.self_attn.q_proj`), so the report can set the methods' histograms side
by side. The bins span the reference weight's range, widened by 5% so that a format whose grid
reaches a little past the largest weight (asymmetric zero points) still lands inside; counts of
values outside are kept too.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import get_weight, iter_linears, output_embedding_name


def histogram_layer(model: nn.Module) -> str:
    head = output_embedding_name(model)
    return next(n for n, _ in iter_linears(model) if n != head)


@torch.no_grad()
def weight_histogram(ref_model: nn.Module, variant: object, bins: int = 128) -> dict | None:
    """{"layer", "lo", "hi", "bins", "before", "after", "outside_after"}; None when the variant
    keeps no torch modules to read (a llama.cpp process)."""
    model = getattr(variant, "model", None)
    if not isinstance(model, nn.Module):
        return None
    layer = histogram_layer(ref_model)
    try:
        after = get_weight(model.get_submodule(layer)).detach().float().cpu()  # (out, in)
    except (AttributeError, NotImplementedError):
        return None  # a backend module that cannot give its weight back as a tensor
    before = get_weight(ref_model.get_submodule(layer)).detach().float().cpu()  # (out, in)
    lim = 1.05 * before.abs().max().item()
    inside = after.abs() <= lim
    return {
        "layer": layer,
        "lo": -lim,
        "hi": lim,
        "bins": bins,
        "before": torch.histc(before, bins, -lim, lim).long().tolist(),
        "after": torch.histc(after, bins, -lim, lim).long().tolist(),
        "outside_after": int((~inside).sum().item()),
    }
