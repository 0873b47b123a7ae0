"""A .gguf model source is converted by transformers once, then read from quantbench's cache."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantbench import cache
from quantbench.sources import load_reference


def test_gguf_reference_is_converted_once_and_equals_transformers_own_load(tiny_f32_gguf):
    path = Path(tiny_f32_gguf["llama"])
    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)

    first = load_reference(str(path))
    converted = [e for e in cache.entries() if e.kind == "gguf-conversion" and e.label == path.name]
    assert len(converted) == 1
    second = load_reference(str(path))  # read from the entry: no second conversion
    assert [e for e in cache.entries() if e.kind == "gguf-conversion" and e.label == path.name] == converted

    ids = torch.tensor([tokenizer("the cat sat on the mat")["input_ids"]])
    with torch.no_grad():
        expect = direct(ids).logits
    for ref in (first, second):
        assert ref.info.gguf_file == str(path) and ref.info.weights_sha256  # the source is still the .gguf file
        a, b = direct.state_dict(), ref.model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert ref.tokenizer("the cat sat on the mat")["input_ids"] == ids[0].tolist()
        with torch.no_grad():
            assert torch.equal(ref.model(ids).logits, expect)
