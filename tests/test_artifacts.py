"""A quantized model saved to a directory loads back to bit-identical weights and logits."""

import pytest
import torch

import quantbench
from quantbench.artifacts import ArtifactError
from quantbench.cli import main
from quantbench.layers import QLinear


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_quantize_cli_and_load_back(tiny_model_dirs, tmp_path, arch):
    from quantbench.methods import parse_method
    from quantbench.sources import load_reference

    out = tmp_path / "q"
    assert main(["quantize", "--model", tiny_model_dirs[arch], "--method", "int:bits=4,group=32,sym=false",
                 "--out", str(out), "--context", "64", "--calib-samples", "0"]) == 0
    loaded = quantbench.load_quantized(out)
    ref = load_reference(tiny_model_dirs[arch])
    fresh = parse_method("int:bits=4,group=32,sym=false").build(ref).model
    qnames = [n for n, m in fresh.named_modules() if isinstance(m, QLinear)]
    assert qnames and all(isinstance(loaded.get_submodule(n), QLinear) for n in qnames)
    for n in qnames:
        assert loaded.get_submodule(n).qtensor.equal(fresh.get_submodule(n).qtensor), n
    x = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, fresh(x).logits)
    assert (out / "config.json").is_file() and (out / "quantbench.json").is_file()


def test_loading_a_directory_that_is_not_ours(tmp_path):
    with pytest.raises(ArtifactError, match="not a quantbench model directory"):
        quantbench.load_quantized(tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gguf_mix_round_trip_keeps_the_quantized_embedding_and_its_tied_head(tiny_model_dirs, tmp_path, arch):
    from quantbench.layers import QEmbedding, TiedQLinear, weight_bytes
    from quantbench.methods import parse_method
    from quantbench.sources import load_reference

    out = tmp_path / "q"
    assert main(["quantize", "--model", tiny_model_dirs[arch], "--method", "gguf-mix:Q4_K_M",
                 "--out", str(out), "--context", "64", "--calib-samples", "0"]) == 0
    loaded = quantbench.load_quantized(out)
    fresh = parse_method("gguf-mix:Q4_K_M").build(load_reference(tiny_model_dirs[arch])).model
    emb, head = loaded.get_input_embeddings(), loaded.get_output_embeddings()
    assert isinstance(emb, QEmbedding) and emb.qtensor.equal(fresh.get_input_embeddings().qtensor)
    assert isinstance(head, TiedQLinear) and head.embedding is emb
    assert weight_bytes(loaded) == weight_bytes(fresh)
    x = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, fresh(x).logits)
