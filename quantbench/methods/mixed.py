"""Budgeted mixed precision: a width per linear layer, chosen from measured sensitivities.

    mixed:budget_bpw=4.5,bits=2|3|4|8,group=64

1. Sensitivity: for each selected linear layer and each candidate width, the mean KL divergence
   KL(reference || model) of the next-token distributions on calibration tokens, with only that
   layer rounded to nearest at that width (the int format). The blocks before the layer's own
   are not recomputed: their outputs on the float model are cached once.
2. Assignment: minimise the summed sensitivity subject to the average bits per weight of the
   selected layers, counted from the bytes their QTensors store (codes, scales and zeros:
   `QTensor.nbytes`), staying within the budget. This is a multiple-choice knapsack; the greedy
   below upgrades, one at a time, the layer whose next width buys the most sensitivity per byte
   (as in HAWQ-style bit allocation), and the result is checked against the budget byte for byte.

The algorithm prints nothing: the chosen width of every layer is in the variant's `layer_specs`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..formats import quantize_tensor
from ..formats.integer import IntConfig
from ..layers import LayerRule, QLinear, get_weight, quantize_layers, set_module, set_weight
from ..sources import Calibration
from ..spec import SpecError
from .calibrate import check_calibration, decoder_blocks, first_block_inputs, register_calibrated
from .gptq import check_shapes


@dataclass(frozen=True)
class MixedConfig:
    budget_bpw: float = 4.5  # average stored bits per weight of the quantized layers, scales included
    bits: tuple[int, ...] = (2, 3, 4, 8)
    group: int = 64
    sym: bool = False
    tokens: int = 512  # calibration tokens (whole sequences, at least one) for the sensitivities

    def __post_init__(self) -> None:
        if not self.bits or len(set(self.bits)) != len(self.bits):
            raise SpecError(f"mixed: bits={'|'.join(map(str, self.bits))} must list distinct widths, e.g. 2|3|4|8")
        self.configs()
        if self.budget_bpw <= 0:
            raise SpecError(f"mixed: budget_bpw={self.budget_bpw} must be positive")
        if self.tokens < 1:
            raise SpecError(f"mixed: tokens={self.tokens} must be positive")

    def configs(self) -> list[IntConfig]:
        return [IntConfig(bits=b, sym=self.sym, group=self.group) for b in sorted(self.bits)]


def choose_widths(sens: torch.Tensor, cost: torch.Tensor, budget: int) -> list[int]:
    """For each layer l the index of a candidate (columns of `sens` and `cost`, (layers, widths))
    such that sum(cost[l, pick[l]]) <= budget, greedily minimising sum(sens[l, pick[l]]).

    Start from each layer's cheapest candidate; then repeatedly take the upgrade (any layer, any
    dearer candidate) with the largest drop in sensitivity per extra byte that still fits."""
    cheapest = cost.argmin(1)
    pick = cheapest.clone()
    spent = int(cost.gather(1, cheapest[:, None]).sum())
    if spent > budget:
        raise SpecError(f"the budget of {budget} bytes is below the {spent} bytes of the smallest widths")
    while True:
        cur_s = sens.gather(1, pick[:, None])  # (L, 1)
        cur_c = cost.gather(1, pick[:, None])
        gain, extra = cur_s - sens, cost - cur_c  # (L, W)
        ok = (extra > 0) & (extra <= budget - spent) & (gain > 0)
        if not ok.any():
            return pick.tolist()
        rate = torch.where(ok, gain / extra.clamp(min=1), torch.full_like(gain, -1.0))
        flat = int(rate.argmax())
        layer, width = divmod(flat, sens.shape[1])
        spent += int(extra[layer, width])
        pick[layer] = width


def _kl(logp: torch.Tensor, logits: torch.Tensor) -> float:
    logq = torch.log_softmax(logits.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1).mean().item()


def layer_sensitivity(
    model: nn.Module, ids: torch.Tensor, names: list[str], configs: list[IntConfig]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sensitivity, stored bytes), each (layers, widths): the mean KL of the model with only
    that layer at that width, and the bytes of that layer's QTensor."""
    prefix, blocks = decoder_blocks(model)
    sens = torch.zeros(len(names), len(configs))
    cost = torch.zeros(len(names), len(configs), dtype=torch.long)
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
        hidden = [first_block_inputs(model, blocks[0], ids)]  # inputs of each block on the float model
        for block in blocks[:-1]:
            hidden.append(replace(hidden[-1], hidden=hidden[-1].run(block)))
        for li, name in enumerate(names):
            i = int(name[len(prefix) + 1 :].split(".")[0])
            m = model.get_submodule(name)
            w = get_weight(m).detach().clone()
            # run from block i only: the earlier blocks leave the ModuleList, block i gets its cached input
            set_module(model, prefix, nn.ModuleList(blocks[i:]))
            handle = blocks[i].register_forward_pre_hook(
                lambda _m, args, kwargs, h=hidden[i].hidden: ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h}),
                with_kwargs=True,
            )
            try:
                for wi, cfg in enumerate(configs):
                    q = quantize_tensor(w, cfg)
                    cost[li, wi] = q.nbytes
                    set_weight(m, q.dequantize())
                    sens[li, wi] = _kl(logp, model(input_ids=ids, use_cache=False).logits)
            finally:
                handle.remove()
                set_weight(m, w)
                set_module(model, prefix, blocks)
    return sens, cost


def mixed_model(model: nn.Module, calib: Calibration, cfg: MixedConfig, rule: LayerRule = LayerRule()) -> dict[str, str]:
    names = rule.select(model)
    configs = cfg.configs()
    for c in configs:
        check_shapes(model, names, c)
    ids = check_calibration(model, calib)
    prefix, _ = decoder_blocks(model)
    outside = [n for n in names if not n.startswith(prefix + ".")]
    if outside:
        raise SpecError(f"mixed: layers outside the decoder blocks cannot be measured: {', '.join(outside[:4])}")
    n_weights = sum(get_weight(model.get_submodule(n)).numel() for n in names)
    budget = int(cfg.budget_bpw * n_weights // 8)
    smallest = sum(quantize_tensor(get_weight(model.get_submodule(n)), configs[0]).nbytes for n in names)
    if smallest > budget:
        raise SpecError(
            f"mixed: budget_bpw={cfg.budget_bpw} is below the smallest width: {configs[0].spec()} already stores "
            f"{8 * smallest / n_weights:.4f} bits per weight on these layers"
        )
    ids = ids[: max(1, min(len(ids), cfg.tokens // ids.shape[1]))].to(next(model.parameters()).device)
    sens, cost = layer_sensitivity(model, ids, names, configs)
    pick = dict(zip(names, choose_widths(sens, cost, budget)))
    specs = quantize_layers(model, names, lambda n, _w: configs[pick[n]])
    stored = sum(model.get_submodule(n).qtensor.nbytes for n in names if isinstance(model.get_submodule(n), QLinear))
    if stored > budget:  # the exact check: what the QTensors store, not what was predicted
        raise RuntimeError(f"mixed: the assignment stores {stored} bytes, over the budget of {budget}")
    return specs


Mixed = register_calibrated(
    "mixed", MixedConfig, "per-layer widths from measured KL sensitivities under a bits-per-weight budget", mixed_model
)
