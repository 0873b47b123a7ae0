"""Greedy generations: a left-padded batch continues each prompt as it would continue alone."""

import torch

from quantbench.eval.generate import PROMPTS, generations
from quantbench.variant import TorchVariant


def test_batched_greedy_equals_one_prompt_at_a_time(tiny_model):
    v = TorchVariant("fp32", tiny_model)
    prompts = [[5, 9, 3], [7, 1, 2, 8, 4, 6], [11]]  # different lengths: the short ones are padded
    alone = [v.generate(torch.tensor([p]), 6) for p in prompts]
    assert v.generate_batch(prompts, 6) == alone
    assert all(len(a) == 6 for a in alone)


class _OneAtATime:
    """A variant without generate_batch (as llama.cpp's): prompts go one by one."""

    def __init__(self):
        self.calls = []

    def generate(self, ids, n):
        self.calls.append(ids.shape)
        return list(range(n))


class _Tok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(text) % 7 + 1, 3]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_generations_without_a_batch_method_go_prompt_by_prompt():
    v = _OneAtATime()
    out = generations(v, _Tok(), 3)
    assert v.calls == [torch.Size([1, 2])] * len(PROMPTS)
    assert [g["prompt"] for g in out] == [p for _, p in PROMPTS] and out[0]["text"] == "0 1 2"
