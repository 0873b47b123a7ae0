"""Perplexity protocols: which positions of a window of C tokens are scored.

`disjoint`  non-overlapping windows of C tokens; the logits at positions 0..C-2 predict tokens
            1..C-1 and all of them are scored (lm-evaluation-harness's rolling loglikelihood
            without overlap, and the GPTQ paper's wikitext2 perplexity).
`llama.cpp` chunks of C tokens; only the second half is scored: logits at positions
            C/2..C-2 predict tokens C/2+1..C-1, so every scored token has at least C/2 tokens of
            context (llama.cpp's `llama-perplexity`, `first = n_ctx/2`).

BOS: with `bos=True` the first token of every window is replaced by the tokenizer's BOS token,
as `llama-perplexity` does when the model's GGUF says `add_bos_token`. The default follows the
tokenizer (SmolLM2 adds no BOS). Either way the choice is recorded in the results.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

ProtocolName = Literal["disjoint", "llama.cpp"]
PROTOCOLS: tuple[str, ...] = ("disjoint", "llama.cpp")


@dataclass(frozen=True)
class Protocol:
    name: ProtocolName
    context: int
    bos_token_id: int | None  # None: windows are the text's tokens as they are

    def __post_init__(self) -> None:
        if self.name not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.name!r}; choose one of {', '.join(PROTOCOLS)}")
        if self.context < (4 if self.name == "llama.cpp" else 2):
            raise ValueError(f"context {self.context} is too short for the {self.name} protocol")

    @property
    def first(self) -> int:
        """Position of the first scored logit in a window."""
        return 0 if self.name == "disjoint" else self.context // 2

    @property
    def scored_per_window(self) -> int:
        return self.context - 1 - self.first

    def prepare(self, windows: torch.Tensor) -> torch.Tensor:
        """(n, C) windows as they are fed to the model."""
        if self.bos_token_id is None:
            return windows
        w = windows.clone()
        w[:, 0] = self.bos_token_id
        return w

    def targets(self, windows: torch.Tensor) -> torch.Tensor:
        """(n, scored) ids of the tokens each scored logit predicts."""
        return windows[:, self.first + 1 :]

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """(n, C, V) -> (n, scored, V): the logits that are scored."""
        return logits[:, self.first : self.context - 1]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scored_per_window"] = self.scored_per_window
        d["bos"] = "replace first token" if self.bos_token_id is not None else "none"
        return d
