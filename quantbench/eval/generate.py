"""Greedy continuations of a fixed prompt set, stored beside the numbers.

Three factual prompts, whose right answers a reader can check at a glance, and three creative
ones, where a damaged model tends to loop or drift first.
"""

from __future__ import annotations

import torch

from ..variant import Variant

PROMPTS: tuple[tuple[str, str], ...] = (
    ("factual", "The capital of France is"),
    ("factual", "Water boils at a temperature of"),
    ("factual", "The largest planet in our solar system is"),
    ("creative", "Once upon a time, in a small village by the sea,"),
    ("creative", "The old robot opened the door and"),
    ("creative", "Here is a short poem about autumn:\n"),
)


def generations(variant: Variant, tokenizer, max_new_tokens: int = 24) -> list[dict]:
    out = []
    for kind, prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], dtype=torch.long)
        new = variant.generate(ids, max_new_tokens)
        out.append({"kind": kind, "prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=True)})
    return out
