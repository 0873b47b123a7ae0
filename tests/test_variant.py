"""TorchVariant's logits: the split forward (the model's body, then its output head in column
slices written into a reused buffer) against the model's own forward, and the models it must
leave alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantbench import variant as variant_module
from quantbench.eval.protocols import Protocol
from quantbench.eval.quality import reference_batch, reference_logits
from quantbench.variant import TorchVariant

from conftest import tiny_llama

VOCAB = 256


@pytest.fixture(autouse=True)
def _narrow_slices(monkeypatch):
    """A 256-token vocabulary in slices of 48 columns: five whole slices and a short one."""
    monkeypatch.setattr(variant_module, "HEAD_COLUMNS", 48)


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _own(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.float()


def test_split_logits_equal_the_models_own_bit_for_bit(tiny_model):
    v = TorchVariant("t", tiny_model)
    ids = _ids(3, 40)
    got = v.logits(ids)
    assert v._split, "the split was not taken for a plain Llama / GPT-2"
    assert got.dtype == torch.float32 and torch.equal(got, _own(tiny_model, ids))


def test_the_out_buffer_is_written_returned_and_reused(tiny_model):
    v = TorchVariant("t", tiny_model)
    ids = _ids(2, 40)
    out = torch.full((2, 40, VOCAB), float("nan"))
    assert v.logits(ids, out=out) is out
    assert torch.equal(out, _own(tiny_model, ids))
    assert v.logits(ids[1:], out=out[:1]) is not None and torch.equal(out[0], out[1])  # a smaller last batch
    # each window of a batch is what it is alone
    assert torch.equal(v.logits(ids[:1])[0], _own(tiny_model, ids)[0])


def test_an_out_of_the_wrong_shape_is_refused(tiny_model):
    v = TorchVariant("t", tiny_model)
    with pytest.raises(ValueError, match=r"out is \(2, 39, 256\).*need \(2, 40, 256\) torch.float32"):
        v.logits(_ids(2, 40), out=torch.empty(2, 39, VOCAB))


def test_a_model_that_soft_caps_its_logits_keeps_its_own_forward():
    model = tiny_llama()
    plain = model.forward

    def capped(**kw):
        out = plain(**kw)
        out.logits = 0.5 * torch.tanh(out.logits / 0.5)  # Gemma 2's final_logit_softcapping, tight
        return out

    model.forward = capped
    v = TorchVariant("t", model)
    ids = _ids(2, 24)
    got = v.logits(ids)
    assert v._split is False
    assert torch.equal(got, _own(model, ids)) and got.abs().max() < 0.5


class _RoundedHead(nn.Linear):
    """A head that is not a plain nn.Linear, as a quantized one is."""

    def forward(self, x):
        return super().forward(x).round()


@pytest.mark.parametrize("change", ["quantized head", "bf16"])
def test_a_head_the_split_cannot_reproduce_keeps_the_models_forward(change):
    model = tiny_llama()
    if change == "bf16":
        model = model.to(torch.bfloat16)
    else:
        head = _RoundedHead(64, VOCAB, bias=False)
        head.weight = model.lm_head.weight
        model.lm_head = head
    v = TorchVariant("t", model)
    ids = _ids(1, 24)
    out = torch.empty(1, 24, VOCAB)
    assert v.logits(ids, out=out) is out
    assert v._split is False and torch.equal(out, _own(model, ids))


def test_reference_logits_in_batches_are_the_logits_window_by_window(tmp_path):
    """Batched reference windows (and a smaller last batch into the reused buffer) write the
    same bytes as one window at a time."""
    assert reference_batch(512) == 2 and reference_batch(4096) == 1 and reference_batch(64) == 16
    v = TorchVariant("t", tiny_llama())
    windows = _ids(5, 32, seed=1)
    protocol = Protocol("llama.cpp", 32, None)
    files = {}
    for batch in (1, 2, None):
        r = reference_logits(v, windows, protocol, tmp_path / f"b{batch}.f32", {"batch": batch}, batch_size=batch)
        files[batch] = r.path.read_bytes()
        assert torch.equal(r.window(4), protocol.select(_own(v.model, windows[4:5]))[0])
    assert files[1] == files[2] == files[None]
