"""Shared fixtures: tiny random Llama and GPT-2 models built from configs (no download)."""

from __future__ import annotations

import os

import huggingface_hub.constants
import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # the plugin skips gpu-marked tests without CUDA


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def tiny_llama(seed: int = 0, vocab: int = 256, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, vocab: int = 256, hidden: int = 64, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request):
    return (tiny_llama if request.param == "llama" else tiny_gpt2)()


def _tiny_tokenizer(vocab: int):
    """A byte-level BPE trained in a second on the embedded prose (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from quantbench.sources import load_text

    text = load_text().text[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    """Directories holding a tiny Llama and a tiny GPT-2 with a matching tokenizer, as
    `quantbench run --model DIR` loads them."""
    tok = _tiny_tokenizer(512)
    dirs = {}
    for arch, make in (("llama", tiny_llama), ("gpt2", tiny_gpt2)):
        d = tmp_path_factory.mktemp(f"tiny-{arch}")
        make(vocab=len(tok)).save_pretrained(d)
        tok.save_pretrained(d)
        dirs[arch] = str(d)
    return dirs


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests write their reference logits and variants under a temporary cache, never the user's."""
    monkeypatch.setenv("QUANTBENCH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "qb-cache"))


# No test reaches the network. The pytest plugin imports transformers (and so huggingface_hub)
# before this file runs, so the environment variable alone comes too late: set the constant too.
os.environ["HF_HUB_OFFLINE"] = "1"
huggingface_hub.constants.HF_HUB_OFFLINE = True
