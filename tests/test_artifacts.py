"""A quantized model saved to a directory loads back to bit-identical weights and logits."""

import pytest
import torch

import quantbench
from quantbench.artifacts import ArtifactError
from quantbench.cli import main
from quantbench.layers import QLinear


def quantize_and_load(model_dir: str, out, spec: str):
    """`quantbench quantize` to `out`, loaded back; and the same variant built afresh."""
    from quantbench.methods import parse_method
    from quantbench.sources import load_reference

    assert main(["quantize", "--model", model_dir, "--method", spec,
                 "--out", str(out), "--context", "64", "--calib-samples", "0"]) == 0
    return quantbench.load_quantized(out), parse_method(spec).build(load_reference(model_dir)).model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_quantize_cli_and_load_back(tiny_model_dirs, tmp_path, arch):
    out = tmp_path / "q"
    loaded, fresh = quantize_and_load(tiny_model_dirs[arch], out, "int:bits=4,group=32,sym=false")
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

    loaded, fresh = quantize_and_load(tiny_model_dirs[arch], tmp_path / "q", "gguf-mix:Q4_K_M")
    emb, head = loaded.get_input_embeddings(), loaded.get_output_embeddings()
    assert isinstance(emb, QEmbedding) and emb.qtensor.equal(fresh.get_input_embeddings().qtensor)
    assert isinstance(head, TiedQLinear) and head.embedding is emb
    assert weight_bytes(loaded) == weight_bytes(fresh)
    x = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, fresh(x).logits)
