"""Decode speed: timed over cached single-token steps, never as a difference lost in noise."""

import pytest
import torch

from quantbench.eval.speed import decode_tokens_per_s
from quantbench.variant import TorchVariant


def test_decode_steps_are_what_generate_computes(tiny_model):
    """decode_seconds runs the same greedy cached steps as generate: same tokens, so the time
    it reports is the time of those tokens. Checked by generating through a counting model."""
    v = TorchVariant("fp32", tiny_model)
    prompt = torch.tensor([[1, 5, 9, 3]])
    calls = []
    hook = tiny_model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        assert v.decode_seconds(prompt, 5) > 0
    finally:
        hook.remove()
    assert calls == [4, 1, 1, 1, 1, 1]  # one prefill of the prompt, then one token per step
    assert decode_tokens_per_s(v, prompt, 5) > 0


class _Flat:
    """A variant without its own decode timer whose generate time does not grow with n."""

    name = "flat"
    device = torch.device("cpu")

    def generate(self, ids, n):
        return [0] * n


def test_decode_difference_lost_in_noise_is_an_error_not_a_figure(monkeypatch):
    import quantbench.eval.speed as S

    monkeypatch.setattr(S, "_timed", lambda fn, device, repeats: 0.5)  # 1 and n + 1 tokens: same time
    with pytest.raises(RuntimeError, match="timing noise"):
        decode_tokens_per_s(_Flat(), torch.tensor([[1, 2]]), 8)
