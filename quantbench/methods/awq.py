"""AWQ: Lin, Tang, Tang, Yang, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration" (MLSys 2024, arXiv:2306.00978). Reference: mit-han-lab/llm-awq
(`awq/quantize/auto_scale.py`, `auto_clip.py`).

A few input channels carry large activations; scaling those weight columns up by s before
rounding (and the inputs down by 1/s) protects them. Per group of linear layers that read the same
input, s = mean|x|^alpha (per input channel, normalised by sqrt(max(s) min(s))), with alpha chosen
from the grid i/20, i = 0..19, to minimise the output error of the quantized layers on the
calibration inputs. The 1/s is folded into the layer that produces the input (a norm's weight and
bias, or the last rows of a linear layer), so the float model computes exactly what it did. Then,
per group of weights, the clipping range max|w| * (1 - i/20), i = 0..9, that minimises the group's
output error is kept (skipped for q and k, whose errors the attention softmax amplifies), and the
weights are rounded to nearest through the int format.

How this differs from the reference, and why:
- The loss is the squared error of the group's linear outputs, computed exactly over every
  calibration token as tr(E G E^T) with G = X^T X / T and E the weight error; the reference runs the
  whole attention (for q, k, v) or MLP (for gate, up) module on each grid point. The Gram form makes
  the 20-point search a handful of matrix products, so AWQ stays within a few forward passes on a
  CPU. The scale search sums that error over 256 evenly spaced output rows of the group (`rows`;
  every row sees the same s, and 0 means all rows); the clip search, one choice per row and group,
  uses every row, with the same G (the reference subsamples 512 tokens).
- Blocks are calibrated sequentially like GPTQ (each block sees the outputs of the already-quantized
  blocks before it), at the price of running each block a second time; `sequential=false` feeds
  each block the float outputs of the one before, as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from ..formats import quantize_tensor
from ..formats.integer import IntConfig, choose_qparams, dequantize_codes, group_view, quantize_codes
from ..layers import LayerRule, get_module, get_weight, is_linear, set_weight
from ..sources import Calibration
from ..spec import SpecError
from .calibrate import Block, PerInput, gram, pre_hooks, register_calibrated, run_sequential, swap_in
from .gptq import check_shapes


@dataclass(frozen=True)
class ScaleGroup:
    """Linear layers that read one input, and the module whose output that input is."""

    prev: str  # a norm (weight and bias divided by s) or a linear layer (its last len(s) rows)
    linears: tuple[str, ...]


@dataclass(frozen=True)
class Architecture:
    groups: tuple[ScaleGroup, ...]
    no_clip: tuple[str, ...]  # query/key projections: their error passes through the softmax


# Names relative to one decoder block, as in llm-awq's auto_scale_block (Llama) and its
# "bigcode" entry (GPT-2 style blocks). GPT-2's MLP has a GELU between c_fc and c_proj, which no
# scale passes through, so c_proj is only clipped; v -> o needs as many v outputs as o inputs
# (not so under grouped-query attention), and is skipped otherwise.
ARCHITECTURES = {
    "llama": Architecture(
        groups=(
            ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
            ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
        ),
        no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    ),
    "gpt2": Architecture(
        groups=(
            ScaleGroup("ln_1", ("attn.c_attn",)),
            ScaleGroup("attn.c_attn", ("attn.c_proj",)),  # the v third of c_attn's outputs
            ScaleGroup("ln_2", ("mlp.c_fc",)),
        ),
        no_clip=("attn.c_attn",),  # q, k and v in one matrix
    ),
}
ARCHITECTURES["mistral"] = ARCHITECTURES["llama"]


def architecture(model: nn.Module) -> Architecture:
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in ARCHITECTURES:
        raise SpecError(f"awq: no scale groups known for model type {kind!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[kind]


def fake_quant(w: torch.Tensor, cfg: IntConfig) -> torch.Tensor:
    """Round-to-nearest on the int format's grid, dequantized: (rows, in) -> (rows, in)."""
    wg = group_view(w, cfg)  # (rows, G, g)
    qp = choose_qparams(wg, cfg)
    return dequantize_codes(quantize_codes(wg, qp, cfg), qp).reshape(w.shape)


def grid_scales(x_mean: torch.Tensor, alphas: list[float]) -> torch.Tensor:
    """s = mean|x|^alpha, normalised by sqrt(max * min), one row per alpha: (A, in)."""
    a = torch.tensor(alphas, dtype=torch.float32, device=x_mean.device).unsqueeze(1)
    s = x_mean.unsqueeze(0).pow(a).clamp(min=1e-4)  # (A, in)
    return s / (s.amax(1, keepdim=True) * s.amin(1, keepdim=True)).sqrt()


def search_scale(
    W: torch.Tensor, G: torch.Tensor, x_mean: torch.Tensor, cfg: IntConfig, alphas: list[float], rows: int = 0
) -> torch.Tensor:
    """The s (in,) among the grid that minimises tr(E G E^T), E = Q(W s) / s - W.

    W (out, in) float32: the group's weights stacked by rows; G (in, in) the Gram of its input;
    x_mean (in,) mean |x| per input channel. `rows` > 0 evaluates the loss on that many evenly
    spaced rows of W (the loss is a sum over rows, and every row sees the same s)."""
    if 0 < rows < W.shape[0]:
        W = W[torch.linspace(0, W.shape[0] - 1, rows, device=W.device).round().long()]
    S = grid_scales(x_mean, alphas)  # (A, in)
    losses = []
    chunk = max(1, (1 << 24) // W.numel())  # alphas per batch: bounded memory
    for a in range(0, len(alphas), chunk):
        s = S[a : a + chunk].unsqueeze(1)  # (a, 1, in)
        E = fake_quant((W * s).reshape(-1, W.shape[1]), cfg).view(-1, *W.shape) / s - W  # (a, out, in)
        E = E.reshape(-1, W.shape[1])
        losses.append(((E @ G) * E).reshape(s.shape[0], -1).sum(1))
    return S[torch.cat(losses).argmin()]


def search_clip(W: torch.Tensor, G: torch.Tensor, cfg: IntConfig, steps: int = 10, grid: int = 20) -> torch.Tensor:
    """W clamped to +-max|w| * (1 - i/grid) per group of weights, the i < steps that minimises the
    group's output error e^T G_gg e (llm-awq's auto_clip: max_shrink 0.5, n_grid 20)."""
    out, n = W.shape
    gs = cfg.group_size(n)
    ng = n // gs
    per_group = replace(cfg, group=gs)  # each (row, group) is quantized on its own either way
    Wg = W.view(out, ng, gs).transpose(0, 1).contiguous()  # (ng, out, gs)
    Gb = G.view(ng, gs, ng, gs).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()  # (ng, gs, gs)
    org_max = Wg.abs().amax(-1, keepdim=True)  # (ng, out, 1)
    best_max, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
    for i in range(steps):
        m = org_max * (1 - i / grid)
        E = fake_quant(torch.clamp(Wg, -m, m).view(-1, gs), per_group).view(ng, out, gs) - Wg
        err = (torch.bmm(E, Gb) * E).sum(-1, keepdim=True)  # (ng, out, 1)
        better = err < best_err
        best_max = torch.where(better, m, best_max)
        best_err = torch.where(better, err, best_err)
    return torch.clamp(Wg, -best_max, best_max).transpose(0, 1).reshape(out, n)


def fold_scale(block: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Multiply the group's weight columns by s and divide the producer of their input by s:
    the block computes the same function (up to float rounding)."""
    prev = get_module(block, group.prev)
    if is_linear(prev):
        w = get_weight(prev).clone()
        w[-s.numel() :] /= s.to(w.dtype).unsqueeze(1)
        set_weight(prev, w)
    else:
        prev.weight.data.div_(s.to(prev.weight.dtype))
    bias = getattr(prev, "bias", None)
    if bias is not None:
        bias.data[-s.numel() :] /= s.to(bias.dtype)
    for rel in group.linears:
        m = get_module(block, rel)
        set_weight(m, get_weight(m) * s.to(m.weight.dtype))


def foldable(block: nn.Module, group: ScaleGroup) -> bool:
    prev = get_module(block, group.prev)
    n = get_weight(get_module(block, group.linears[0])).shape[1]
    return not is_linear(prev) or get_weight(prev).shape[0] >= n


@dataclass(frozen=True)
class AWQConfig:
    bits: int = 4
    group: int = 128  # input columns per scale; 0 per output channel
    sym: bool = False
    grid: int = 20  # alpha in {i / grid}, i = 0..grid-1
    alpha: float | None = None  # a fixed exponent instead of the search (0 means no scaling)
    clip: bool = True
    rows: int = 256  # output rows the scale search's loss is evaluated on; 0: all
    sequential: bool = True  # next block's input from this block quantized (false: float, as llm-awq)
    scale_dtype: Literal["float16", "float32"] = "float16"  # of the stored scales; the codes are chosen on that grid

    def __post_init__(self) -> None:
        self.int_config()
        if self.group < 0:
            raise SpecError("awq: group=-1 (per tensor) is not supported; use 0 (per channel) or a group size")
        if self.grid < 1:
            raise SpecError(f"awq: grid={self.grid} is not valid; use a positive number of points, e.g. 20")
        if self.rows < 0:
            raise SpecError(f"awq: rows={self.rows} is not valid; use 0 (all rows) or a positive number")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise SpecError(f"awq: alpha={self.alpha} is not valid; use a number in [0, 1]")

    def int_config(self) -> IntConfig:
        return IntConfig(bits=self.bits, sym=self.sym, group=self.group, scale_dtype=self.scale_dtype)

    def alphas(self) -> list[float]:
        return [self.alpha] if self.alpha is not None else [i / self.grid for i in range(self.grid)]


def awq_model(model: nn.Module, calib: Calibration, cfg: AWQConfig, rule: LayerRule = LayerRule()) -> dict[str, str]:
    """Scale, clip and round the selected linear layers of `model` in place; returns name -> spec."""
    names = rule.select(model)
    arch = architecture(model)
    icfg = cfg.int_config()
    check_shapes(model, names, icfg)
    specs: dict[str, str] = {}

    def process(block: Block) -> torch.Tensor:
        stats = PerInput(lambda x: (gram(x), x.reshape(-1, x.shape[-1]).abs().float().mean(0)))
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with pre_hooks(block, lambda rel, _m, x: seen.__setitem__(rel, stats(x))):
            float_out = block.forward()
        never = [rel for rel in block.linears if rel not in seen]
        if never:
            raise SpecError(f"{block.full_name(never[0])} was never called by its block; it cannot be calibrated")
        inv_s: dict[str, torch.Tensor] = {}  # linear -> the s its input was divided by
        for group in arch.groups:
            chosen = [rel for rel in group.linears if rel in seen]
            if not chosen or not foldable(block.module, group):
                continue
            G, x_mean = seen[chosen[0]]
            W = torch.cat([get_weight(block.linear(rel)).float() for rel in chosen])
            s = search_scale(W, G, x_mean, icfg, cfg.alphas(), cfg.rows)
            fold_scale(block.module, group, s)
            inv_s.update({rel: s for rel in group.linears})
        for rel in block.linears:
            w = get_weight(block.linear(rel))
            W = w.float()
            if cfg.clip and rel not in arch.no_clip:
                G = seen[rel][0]
                if rel in inv_s:  # the input is now x / s
                    G = G / torch.outer(inv_s[rel], inv_s[rel])
                W = search_clip(W, G, icfg)
            swap_in(block, rel, quantize_tensor(W.to(w.dtype), icfg))
            specs[block.full_name(rel)] = icfg.spec()
        return block.forward() if cfg.sequential else float_out

    run_sequential(model, calib, names, process)
    return specs


AWQ = register_calibrated(
    "awq", AWQConfig, "AWQ (Lin et al. 2023): activation-aware scales folded into the model, clip search, int RTN", awq_model
)
