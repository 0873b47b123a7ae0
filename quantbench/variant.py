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

    def logits(self, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) int64 token ids -> (B, T, V) float32 next-token logits. With `out`, a
        (B, T, V) float32 tensor on the variant's device, the logits are written into it and it
        is returned: callers that run window after window reuse one buffer (see `head_logits`)."""

    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> list[int]:
        """Greedy continuation of a (1, T) prompt, with a KV cache; the new token ids."""

    def weight_bytes(self) -> int:
        """Exact bytes of the weights as the variant stores them."""

    def artifact_bytes(self) -> int:
        """Size on disk of the saved variant."""

    def close(self) -> None: ...


# Output-head columns per matmul on the CPU. The embedded model's head is a (511 x 576) @
# (576 x 49,152) product per window, a fifth of its forward's FLOPs: MKL ran it at 115-125 GFLOP/s
# as one matmul, and at 157-166 in slices of 1024-2048 columns written in place (each slice's
# weights and outputs, 4-5 MB, stay in cache), against 176 for the 2048^2 square matmul
# (AMD EPYC, AVX2, 2 cores, 32 MB L3). Every output element is the same dot product either way:
# the slices are bit-identical to the single matmul (tests/test_variant.py).
HEAD_COLUMNS = 2048
PROBE_TOKENS = 16  # tokens of the first call that check the split against the model's own forward


def head_logits(hidden: torch.Tensor, head: nn.Linear, out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, D) final hidden states -> (B, T, V) float32 logits through `head`, in slices of
    HEAD_COLUMNS columns on the CPU, written into `out` when given. A reused `out` also spares the
    page faults of a fresh (B, T, V) tensor: 23 ms of the embedded model's 1.1 s forward."""
    B, T, D = hidden.shape
    V = head.out_features
    if out is None:
        out = torch.empty(B, T, V, dtype=torch.float32, device=hidden.device)
    elif out.shape != (B, T, V) or out.dtype != torch.float32 or out.device != hidden.device:
        raise ValueError(
            f"out is {tuple(out.shape)} {out.dtype} on {out.device}; the logits need ({B}, {T}, {V}) "
            f"torch.float32 on {hidden.device}"
        )
    h, o = hidden.reshape(B * T, D), out.view(B * T, V)  # (BT, D), (BT, V)
    step = HEAD_COLUMNS if hidden.device.type == "cpu" else V
    for a in range(0, V, step):
        w = head.weight[a : a + step].t()  # (D, step)
        if head.bias is None:
            torch.mm(h, w, out=o[:, a : a + step])
        else:
            torch.addmm(head.bias[a : a + step], h, w, out=o[:, a : a + step])
    return out


def split_head(model: nn.Module, probe: torch.Tensor) -> tuple[nn.Module, nn.Linear] | bool:
    """(body, head) when the model's logits are exactly `head(body(ids).last_hidden_state)`, with a
    plain float32 nn.Linear head; else False. Exactly: the split's logits on the (1, t) `probe`
    must equal the model's own bit for bit, so a model that scales or soft-caps its logits (Gemma 2,
    Cohere), a quantized head, or a body whose output is not float32 keeps the model's forward."""
    body = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head else None
    if body is None or body is model or type(head) is not nn.Linear or head.weight.dtype != torch.float32:
        return False
    hidden = getattr(body(input_ids=probe, use_cache=False), "last_hidden_state", None)
    if hidden is None or hidden.dtype != torch.float32 or hidden.shape[:2] != probe.shape:
        return False
    own = model(input_ids=probe, use_cache=False).logits
    return (body, head) if torch.equal(head_logits(hidden, head), own) else False


@dataclass
class TorchVariant:
    """A transformers causal LM (or any module whose output has `.logits`)."""

    name: str
    model: nn.Module
    n_weights: int = 0
    layer_specs: dict[str, str] = field(default_factory=dict)
    # (body, head) when the logits are head(body(ids)) and that split was checked; False when the
    # model's own forward is used; None until the first call checks it (`split_head`)
    _split: tuple[nn.Module, nn.Linear] | bool | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.model.eval()
        if not self.n_weights:
            self.n_weights = count_weights(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        ids = ids.to(self.device)
        if self._split is None:
            self._split = split_head(self.model, ids[:1, :PROBE_TOKENS])
        if self._split:
            body, head = self._split
            return head_logits(body(input_ids=ids, use_cache=False).last_hidden_state, head, out)
        logits = self.model(input_ids=ids, use_cache=False).logits.float()
        return logits if out is None else out.copy_(logits)

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
