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
    """The continuation of every prompt: in one batch where the variant offers `generate_batch`
    (a torch model), else one prompt at a time (llama.cpp)."""
    prompts = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for _, prompt in PROMPTS]
    batch = getattr(variant, "generate_batch", None)
    if batch is not None:
        news = batch(prompts, max_new_tokens)
    else:
        news = [variant.generate(torch.tensor([p], dtype=torch.long), max_new_tokens) for p in prompts]
    return [
        {"kind": kind, "prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=True)}
        for (kind, prompt), new in zip(PROMPTS, news)
    ]
