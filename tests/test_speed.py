"""Decode speed: timed over cached single-token steps, never as a difference lost in noise."""

import pytest
import torch

from quantbench.eval.speed import decode_tokens_per_s
from quantbench.variant import TorchVariant


def test_decode_steps_are_what_generate_computes(tiny_model):
    """A decoder's steps are single-token cached forwards after one prefill of the prompt, and
    they pick the tokens generate picks."""
    v = TorchVariant("fp32", tiny_model)
    prompt = torch.tensor([[1, 5, 9, 3]])
    calls = []
    hook = tiny_model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"][0].tolist()), with_kwargs=True)
    try:
        step = v.decoder(prompt)
        for _ in range(5):
            step()
    finally:
        hook.remove()
    assert calls[0] == [1, 5, 9, 3] and all(len(c) == 1 for c in calls[1:])  # one prefill, then a token a step
    assert [c[0] for c in calls[1:]] == v.generate(prompt, 5)
    assert decode_tokens_per_s(v, prompt, 5) > 0


class _Flat:
    """A variant without a decoder whose generate time does not grow with n."""

    name = "flat"
    device = torch.device("cpu")

    def generate(self, ids, n):
        return [0] * n


def test_decode_difference_lost_in_noise_is_an_error_not_a_figure(monkeypatch):
    import quantbench.eval.speed as S

    monkeypatch.setattr(S, "_timed", lambda fn, device, repeats: 0.5)  # 1 and n + 1 tokens: same time
    with pytest.raises(RuntimeError, match="timing noise"):
        decode_tokens_per_s(_Flat(), torch.tensor([[1, 2]]), 8)
