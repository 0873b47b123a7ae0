"""A variant is anything that maps token ids to next-token logits.

The reference, every quantized torch model and every llama.cpp model meet the evaluation layer
through this one protocol; the evaluation never asks how a variant was made.
"""

from __future__ import annotations

import contextlib
import inspect
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn

from .layers import count_weights, weight_bytes


@runtime_checkable
class Variant(Protocol):
    name: str  # the method spec that made it, e.g. "int:bits=4,group=64"
    n_weights: int  # weight elements of the float reference: the denominator of bits per weight
    layer_specs: dict[str, str]  # module name -> the format that layer is stored in
    device: torch.device

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 token ids -> (B, T, V) float32 next-token logits."""

    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> list[int]:
        """Greedy continuation of a (1, T) prompt, with a KV cache; the new token ids."""

    def weight_bytes(self) -> int:
        """Exact bytes of the weights as the variant stores them."""

    def artifact_bytes(self) -> int:
        """Size on disk of the saved variant."""

    def close(self) -> None: ...


@dataclass
class TorchVariant:
    """A transformers causal LM (or any module whose output has `.logits`)."""

    name: str
    model: nn.Module
    n_weights: int = 0
    layer_specs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model.eval()
        if not self.n_weights:
            self.n_weights = count_weights(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids.to(self.device), use_cache=False)
        return out.logits.float()

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> list[int]:
        return self._greedy(ids, torch.ones_like(ids), max_new_tokens)[0]

    @torch.inference_mode()
    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of several prompts in one left-padded batch (the attention mask
        hides the padding): each step runs every prompt at once, so a format that dequantizes
        its weights on every forward pays that once per step, not once per prompt."""
        width = max(map(len, prompts))
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
        return self._greedy(ids, mask, max_new_tokens)

    def _greedy(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,  # fixed length, so decode speed is comparable
            do_sample=False,
            num_beams=1,
            pad_token_id=getattr(self.model.generation_config, "pad_token_id", None) or 0,
        )
        return out[:, ids.shape[1] :].tolist()

    @torch.inference_mode()
    def decoder(self, ids: torch.Tensor) -> Callable[[], None]:
        """Prefill the (1, T) prompt with the KV cache and return a step: each call picks the
        greedy next token and runs it through the model as a single-token cached forward."""
        state = self.model(input_ids=ids.to(self.device), use_cache=True)
        # transformers 5.24 renamed the KV cache's argument and output field past_key_values ->
        # cache (the old argument warns, and goes in 5.40); older versions know only the old name.
        name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

        @torch.inference_mode()
        def step() -> None:
            nonlocal state
            token = state.logits[:, -1:].argmax(-1)
            state = self.model(input_ids=token, use_cache=True, **{name: getattr(state, name)})

        return step

    def weight_bytes(self) -> int:
        return weight_bytes(self.model)

    def artifact_bytes(self) -> int:
        from safetensors.torch import save_model

        with tempfile.TemporaryDirectory(prefix="quantbench-") as d:
            path = Path(d) / "model.safetensors"
            save_model(self.model, str(path))
            return path.stat().st_size

    def close(self) -> None:
        with contextlib.suppress(AttributeError):
            del self.model
