"""selective (keep layers in reference precision) and mixed (per-layer widths under a budget)."""

from __future__ import annotations

import pytest
import torch

from quantbench.layers import QLinear
from quantbench.methods import parse_method
from quantbench.methods.mixed import choose_widths, layer_sensitivity
from quantbench.methods.selective import inner_spec
from quantbench.spec import SpecError

from .conftest import TINY, make_calib, make_ref, mean_kl


@pytest.fixture(params=sorted(TINY))
def ref4(request):
    """A tiny model with four blocks, so first and last leave two in the middle."""
    return make_ref(TINY[request.param](layers=4))


def quantized(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}


def test_inner_spec_syntax():
    assert inner_spec("gptq;bits=4;group=64") == "gptq:bits=4,group=64"
    assert inner_spec("gptq:bits=4;group=64") == "gptq:bits=4,group=64"
    assert inner_spec("gguf;Q4_K") == "gguf:Q4_K"
    assert inner_spec("fp16") == "fp16"


def test_default_keeps_first_and_last_block(ref4):
    v = parse_method("selective").build(ref4, None)
    prefix = "model.layers" if ref4.info.architecture == "llama" else "transformer.h"
    blocks = {int(n[len(prefix) + 1 :].split(".")[0]) for n in quantized(v.model)}
    assert blocks == {1, 2}
    assert set(v.layer_specs) == set(quantized(v.model))
    assert set(v.layer_specs.values()) == {"int:bits=4,sym=false,group=64"}
    assert v.name == "selective"


def test_patterns_and_calibrated_inner_method(ref4):
    spec = "selective:method=gptq;bits=3;group=32,keep=first|lm_head|*.0.*|*mlp*"
    v = parse_method(spec).build(ref4, make_calib())
    q = quantized(v.model)
    assert q and not any("mlp" in n or ".0." in n for n in q)
    assert v.name == spec.replace("keep=first|lm_head|", "keep=first|lm_head|")
    with pytest.raises(SpecError, match="needs calibration"):
        parse_method(spec).build(ref4, None)


def test_selective_errors(ref4):
    with pytest.raises(SpecError, match="matches no linear layer"):
        parse_method("selective:keep=first|*.nothing_here").build(ref4, None)
    with pytest.raises(SpecError, match="';' between its parameters"):
        parse_method("selective:method=gptq;bitz=4")
    with pytest.raises(SpecError, match="has no parameter 'group'"):
        parse_method("selective:method=gptq:bits=4,group=64")  # ',' belongs to selective
    with pytest.raises(SpecError, match="does not quantize chosen layers"):
        parse_method("selective:method=fp16").build(ref4, None)
    with pytest.raises(SpecError, match="cannot be selective"):
        parse_method("selective:method=selective")
    with pytest.raises(SpecError, match="inside the decoder blocks"):  # keeping no lm_head quantizes it
        parse_method("selective:method=gptq;group=32,keep=first").build(ref4, make_calib())


def test_greedy_assignment_meets_the_budget_and_is_maximal():
    g = torch.Generator().manual_seed(0)
    cost = torch.tensor([[2, 3, 4, 8]]) * torch.randint(10, 100, (12, 1), generator=g)
    sens = torch.rand(12, 1, generator=g) * torch.tensor([[8.0, 4.0, 2.0, 0.1]])
    for budget in (int(cost[:, 0].sum()), int(cost[:, 2].sum()), int(cost[:, 3].sum())):
        pick = torch.tensor(choose_widths(sens, cost, budget))
        spent = int(cost.gather(1, pick[:, None]).sum())
        assert spent <= budget
        # no single upgrade that would still fit lowers the sensitivity
        extra, gain = cost - cost.gather(1, pick[:, None]), sens.gather(1, pick[:, None]) - sens
        assert not ((extra > 0) & (extra <= budget - spent) & (gain > 0)).any()
    assert choose_widths(sens, cost, int(cost[:, 3].sum())) == [3] * 12
    with pytest.raises(SpecError, match="below"):
        choose_widths(sens, cost, int(cost[:, 0].sum()) - 1)


def test_mixed_meets_the_budget_from_stored_bytes(tiny_ref):
    calib, ids = make_calib(8, 32), make_calib(4, 32, seed=9).input_ids
    budget = 4.0  # g32 with fp16 scales and u8 zeros: 2.75, 3.75, 4.75 and 8.75 bits per weight
    v = parse_method(f"mixed:budget_bpw={budget},bits=2|3|4|8,group=32,tokens=64").build(tiny_ref, calib)
    q = quantized(v.model)
    stored = sum(m.qtensor.nbytes for m in q.values())
    n = sum(m.qtensor.numel for m in q.values())
    assert 8 * stored / n <= budget
    assert set(v.layer_specs) == set(q) and len({m.qtensor.config.bits for m in q.values()}) > 1
    assert v.layer_specs == {k: m.qtensor.config.spec() for k, m in q.items()}
    rtn3 = parse_method("int:bits=3,group=32,sym=false").build(tiny_ref, None)
    assert mean_kl(tiny_ref.model, v.model, ids) < mean_kl(tiny_ref.model, rtn3.model, ids)


def test_sensitivity_from_cached_block_inputs_equals_the_whole_model(tiny_ref):
    """Running only the blocks from the layer's own onward gives the KL of the whole model."""
    import copy

    from quantbench.formats import quantize_tensor
    from quantbench.formats.integer import IntConfig
    from quantbench.layers import get_weight, set_weight

    model, ids = tiny_ref.model, make_calib(2, 32).input_ids
    names = [n for n in quantized(parse_method("int:bits=2,group=32").build(tiny_ref, None).model)]
    name, cfg = names[-3], IntConfig(bits=2, sym=False, group=32)
    sens, cost = layer_sensitivity(model, ids, [name], [cfg])
    direct = copy.deepcopy(model)
    q = quantize_tensor(get_weight(model.get_submodule(name)), cfg)
    set_weight(direct.get_submodule(name), q.dequantize())
    assert sens[0, 0].item() == pytest.approx(mean_kl(model, direct, ids), rel=1e-4, abs=1e-9)
    assert cost[0, 0].item() == q.nbytes


def test_mixed_errors(tiny_ref):
    with pytest.raises(SpecError, match="below the smallest width"):
        parse_method("mixed:budget_bpw=2,bits=2|4,group=32").build(tiny_ref, make_calib())
    for bad in ("mixed:bits=2|2", "mixed:bits=9", "mixed:budget_bpw=0", "mixed:tokens=0"):
        with pytest.raises(SpecError):
            parse_method(bad)
