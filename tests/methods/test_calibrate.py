"""The sequential calibration driver: block discovery, input capture, bad inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantbench.methods import parse_method
from quantbench.methods.calibrate import decoder_blocks, first_block_inputs, gram, run_sequential
from quantbench.spec import SpecError

from .conftest import make_calib, make_ref


def test_blocks_rerun_from_captured_inputs_reproduce_the_model(tiny_ref):
    """Catching block 0's arguments (Llama's position embeddings, GPT-2's positional mask) and
    running the blocks one by one gives the model's own hidden states."""
    model = tiny_ref.model
    ids = make_calib(3, 16).input_ids
    path, blocks = decoder_blocks(model)
    assert path in ("model.layers", "transformer.h") and len(blocks) == 2
    with torch.inference_mode():
        inputs = first_block_inputs(model, blocks[0], ids)
        hidden = inputs.hidden
        for block in blocks:
            hidden = type(inputs)(hidden, inputs.args, inputs.kwargs).run(block)
        want = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        final_norm = model.model.norm if path == "model.layers" else model.transformer.ln_f
        assert torch.allclose(inputs.hidden, want[0])
        assert torch.allclose(final_norm(hidden), want[-1], atol=1e-5)


def test_every_block_sees_the_quantized_outputs_of_the_one_before(tiny_ref):
    model = tiny_ref.model
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear,)) or type(m).__name__ == "Conv1D"]
    names = [n for n in names if n.startswith(decoder_blocks(model)[0])]
    seen = []

    def process(block):
        seen.append((block.name, block.inputs.hidden.clone()))
        return block.forward() * 0 + len(seen)  # a marker the next block must receive

    run_sequential(model, make_calib(4, 32), names, process)
    assert [n for n, _ in seen] == [f"{decoder_blocks(model)[0]}.{i}" for i in range(2)]
    assert torch.all(seen[1][1] == 1)


def test_gram_is_mean_outer_product():
    for y in (torch.randn(3, 50, 300), torch.randn(40, 1100), torch.randn(200, 1)):  # 2, 4 and 1 blocks
        Y = y.reshape(-1, y.shape[-1])
        G = gram(y)
        assert torch.allclose(G, (Y.double().T @ Y.double() / len(Y)).float(), atol=1e-5) and torch.equal(G, G.T)


@pytest.mark.parametrize("spec", ["gptq:bits=4,group=32", "awq:bits=4,group=32"])
def test_bad_calibration_is_a_clear_error(tiny_ref, spec):
    m = parse_method(spec)
    with pytest.raises(ValueError, match="at least 128"):
        m.build(tiny_ref, make_calib(2, 16))
    with pytest.raises(ValueError, match="longer than the model allows \\(256\\)"):
        m.build(tiny_ref, make_calib(1, 300))
    with pytest.raises(ValueError, match="vocabulary"):
        m.build(tiny_ref, make_calib(8, 32, vocab=1000))
    with pytest.raises(SpecError, match="needs calibration"):
        m.build(tiny_ref, None)


class NoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, 16)
        self.layers = nn.ModuleList([nn.LayerNorm(16)])
        self.config = type("Config", (), {"vocab_size": 256, "model_type": "none"})()


@pytest.mark.parametrize("spec", ["gptq", "awq"])
def test_model_without_linear_layers_is_a_clear_error(spec):
    with pytest.raises(SpecError, match="no linear layer"):
        parse_method(spec).build(make_ref(NoLinear()), make_calib())


def test_model_without_known_blocks_is_a_clear_error():
    model = nn.Sequential(nn.Embedding(256, 16), nn.Linear(16, 16))
    model.config = type("Config", (), {"vocab_size": 256, "model_type": "none"})()
    with pytest.raises(SpecError, match="cannot find the decoder blocks"):
        parse_method("gptq:group=0").build(make_ref(model), make_calib())
