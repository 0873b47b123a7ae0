"""Fixtures for the calibrated methods: tiny references and calibration sets (no download)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from quantbench.sources import Calibration, ModelInfo, Reference


def make_ref(model) -> Reference:
    cfg = model.config
    info = ModelInfo(
        source=f"tiny-{cfg.model_type}",
        kind="directory",
        path="",
        weights_sha256="0" * 64,
        architecture=cfg.model_type,
        n_ctx=256,
        vocab_size=cfg.vocab_size,
    )
    return Reference(model=model, tokenizer=None, info=info, dtype="fp32", device=torch.device("cpu"))


def make_calib(n: int = 8, length: int = 32, vocab: int = 256, seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(input_ids=torch.randint(0, vocab, (n, length), generator=g), seed=seed, starts=tuple(range(n)))


TINY = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(params=sorted(TINY))
def tiny_ref(request) -> Reference:
    return make_ref(TINY[request.param]())


@pytest.fixture
def calib() -> Calibration:
    return make_calib()


def mean_kl(ref_model, model, ids: torch.Tensor) -> float:
    """Mean over tokens of KL(reference || model) of the next-token distributions."""
    with torch.inference_mode():
        p = torch.log_softmax(ref_model(input_ids=ids, use_cache=False).logits.float(), -1)
        q = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()
