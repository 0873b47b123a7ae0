"""Sequential, block-by-block calibration: the capture scheme of the GPTQ reference
(IST-DASLab/gptq, `llama_sequential`; Frantar et al. 2022, section 4 "Step 3").

The calibration ids (N, L) run once through the embeddings; a forward pre-hook on decoder block 0
catches the hidden states and every other argument the block is called with (attention mask,
position embeddings or ids: Llama passes `position_embeddings`, GPT-2 positional arguments) and
raises a sentinel so nothing else runs. Then, for each block in order, the method hooks the
block's linear layers, quantizes them, and the block's output on the quantized weights becomes the
next block's input. Only one block's activations are alive at a time: (N, L, hidden) in and out,
plus what the block computes inside. The whole calibration set goes through a block in one call,
so a hook sees all of a layer's inputs at once (N x L tokens): on SmolLM2-135M with 32 x 256
tokens the block's activations peak near 0.3 GB; 128 x 2048 on a 7B model would not fit.

How often a block runs is the method's affair: GPTQ quantizes each layer inside its first call
and lets the call go on with the quantized weights (one run per block); AWQ runs the block once to
collect statistics and once more, quantized, for the next block's input.

Every linear layer is reached through `quantbench.layers` (nn.Linear and GPT-2's transposed
Conv1D alike), weights always in (out_features, in_features) orientation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch
from torch import nn

from ..layers import LayerRule, QLinear, get_module, is_linear, set_module
from ..sources import Calibration, Reference
from ..spec import SpecError, format_config
from . import copy_variant, register_method

MIN_TOKENS = 128  # fewer calibration tokens than this cannot estimate a 64-wide Hessian or scale

# Where transformers keeps the decoder blocks, by model family.
BLOCK_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers", "transformer.blocks")


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The list of decoder blocks and its dotted path (`model.layers` for Llama, `transformer.h`
    for GPT-2)."""
    for path in BLOCK_PATHS:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return path, blocks
    raise SpecError(
        f"cannot find the decoder blocks of {type(model).__name__}: calibrated methods look for a "
        f"ModuleList at one of {', '.join(BLOCK_PATHS)}"
    )


def max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
        n = getattr(cfg, attr, None)
        if n:
            return int(n)
    return None


def check_calibration(model: nn.Module, calib: Calibration) -> torch.Tensor:
    """The calibration ids (N, L), checked against what the model accepts."""
    ids = calib.input_ids
    if ids.dim() != 2 or ids.dtype != torch.long:
        raise ValueError(f"calibration input_ids must be a (N, L) int64 tensor, got {tuple(ids.shape)} {ids.dtype}")
    n, length = ids.shape
    if n * length < MIN_TOKENS:
        raise ValueError(
            f"calibration has {n} x {length} = {n * length} tokens; calibrated methods need at least "
            f"{MIN_TOKENS} (the default is 32 x 512)"
        )
    limit = max_positions(model)
    if limit is not None and length > limit:
        raise ValueError(
            f"calibration sequences of {length} tokens are longer than the model allows ({limit}); "
            f"use sequences of at most {limit} tokens"
        )
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and int(ids.max()) >= vocab:
        raise ValueError(f"calibration ids go up to {int(ids.max())} but the model's vocabulary has {vocab} entries")
    return ids


class _Caught(Exception):
    """Raised by the pre-hook on block 0 once it has its inputs."""


@dataclass(frozen=True)
class BlockInputs:
    hidden: torch.Tensor  # (N, L, hidden)
    args: tuple  # the block's other positional arguments (GPT-2 passes its mask positionally)
    kwargs: dict

    def run(self, block: nn.Module) -> torch.Tensor:
        out = block(self.hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out  # (N, L, hidden)


def first_block_inputs(model: nn.Module, block: nn.Module, ids: torch.Tensor) -> BlockInputs:
    """Run `ids` through the model up to `block` and catch what it is called with."""
    caught: dict = {}

    def hook(_m, args, kwargs):
        if args:
            caught["hidden"], caught["args"] = args[0], tuple(args[1:])
        else:
            caught["hidden"], caught["args"] = kwargs.pop("hidden_states"), ()
        caught["kwargs"] = dict(kwargs)
        raise _Caught

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=ids, use_cache=False)
    except _Caught:
        pass
    finally:
        handle.remove()
    if "hidden" not in caught:
        raise SpecError(f"{type(model).__name__} never called its first decoder block")
    kwargs = caught["kwargs"]
    kwargs["use_cache"] = False
    for name in ("past_key_values", "cache"):  # the KV cache's argument before and since transformers 5.24
        kwargs.pop(name, None)
    return BlockInputs(caught["hidden"], caught["args"], kwargs)


@dataclass(frozen=True)
class Block:
    """One decoder block during calibration: its dotted name, the module, its inputs."""

    name: str  # e.g. "model.layers.3"
    module: nn.Module
    inputs: BlockInputs
    linears: tuple[str, ...]  # the block's linear layers to quantize, relative names ("mlp.up_proj")

    def forward(self) -> torch.Tensor:
        """The block's output on the calibration inputs with its current weights: (N, L, hidden)."""
        return self.inputs.run(self.module)

    def linear(self, rel: str) -> nn.Module:
        return get_module(self.module, rel)

    def set_layer(self, rel: str, new: nn.Module) -> None:
        set_module(self.module, rel, new)

    def full_name(self, rel: str) -> str:
        return f"{self.name}.{rel}"


def run_sequential(
    model: nn.Module, calib: Calibration, names: list[str], process: Callable[[Block], torch.Tensor]
) -> None:
    """Calibrate `model` block by block. `names` are the linear layers to quantize (full dotted
    names, all inside decoder blocks); `process(block)` quantizes a block in place and returns its
    output on the quantized weights, which feeds the next block."""
    ids = check_calibration(model, calib)
    prefix, blocks = decoder_blocks(model)
    outside = [n for n in names if not n.startswith(prefix + ".")]
    if outside:
        raise SpecError(
            f"calibrated methods quantize linear layers inside the decoder blocks ({prefix}.*); "
            f"these are outside: {', '.join(outside[:4])}"
        )
    model.eval()
    with torch.inference_mode():
        inputs = first_block_inputs(model, blocks[0], ids.to(_device(model)))
        for i, module in enumerate(blocks):
            name = f"{prefix}.{i}"
            rel = tuple(n[len(name) + 1 :] for n in names if n.startswith(name + "."))
            hidden = process(Block(name, module, inputs, rel)) if rel else inputs.run(module)
            inputs = replace(inputs, hidden=hidden)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def pre_hooks(block: Block, fn: Callable[[str, nn.Module, torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Call `fn(rel_name, module, x)` before each of the block's selected linear layers runs on its
    input x (N, L, in); a tensor it returns replaces the input."""
    handles = []
    for rel in block.linears:
        m = block.linear(rel)
        if not is_linear(m):
            raise SpecError(f"{block.full_name(rel)} is {type(m).__name__}, not a linear layer")

        def hook(mod, args, rel=rel):
            new = fn(rel, mod, args[0])
            return None if new is None else (new,) + tuple(args[1:])

        handles.append(m.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class PerInput:
    """`fn(x)` computed once per distinct input tensor: q, k and v of one attention (and gate and
    up of one MLP) read the very same tensor, so its statistics are computed once."""

    def __init__(self, fn: Callable[[torch.Tensor], object]):
        self.fn = fn
        self._last: tuple[torch.Tensor, object] | None = None  # holding x keeps its id unique

    def __call__(self, x: torch.Tensor):
        # Identity, not equality: blocks do not write into a tensor after passing it to a layer.
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        value = self.fn(x)
        self._last = (x, value)
        return value


def gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X / T in float32 for inputs x (..., n), T the number of tokens: (n, n).

    Symmetric, so only the blocks on and above the diagonal are multiplied (a quarter fewer
    flops with two blocks; wider inputs use four)."""
    X = x.reshape(-1, x.shape[-1]).float()  # (T, n)
    t, n = X.shape
    parts = 4 if n >= 1024 else 2 if n >= 256 else 1
    edges = [n * k // parts for k in range(parts + 1)]
    G = torch.empty(n, n, dtype=torch.float32, device=X.device)
    for a in range(parts):
        ra = slice(edges[a], edges[a + 1])
        for b in range(a, parts):
            rb = slice(edges[b], edges[b + 1])
            G[ra, rb] = X[:, ra].T @ X[:, rb]
            if b != a:
                G[rb, ra] = G[ra, rb].T
    return G.div_(t)


def swap_in(block: Block, rel: str, q) -> None:
    """Replace a float linear layer of the block by a QLinear holding `q`."""
    m = block.linear(rel)
    block.set_layer(rel, QLinear(q, getattr(m, "bias", None)))


def register_calibrated(
    name: str, config_type: type, description: str, quantize: Callable[[nn.Module, Calibration, object, LayerRule], dict[str, str]]
) -> type:
    """Register a method that needs calibration data and quantizes a copy of the reference in
    place with `quantize(model, calib, cfg, rule) -> {layer name: spec}`."""

    class CalibratedMethod:
        needs_calibration = True

        @staticmethod
        def build(ref: Reference, cfg, calib: Calibration | None, rule: LayerRule = LayerRule()):
            if calib is None:
                raise SpecError(f"method {format_config(cfg, name)} needs calibration data")
            return copy_variant(ref, format_config(cfg, name), lambda m: quantize(m, calib, cfg, rule))

    CalibratedMethod.config_type = config_type
    CalibratedMethod.description = description
    CalibratedMethod.__name__ = CalibratedMethod.__qualname__ = name.upper()
    return register_method(name)(CalibratedMethod)
