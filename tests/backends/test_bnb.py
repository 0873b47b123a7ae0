"""bitsandbytes as variants: both build paths, stored bytes, evaluation through quantbench.run."""

from __future__ import annotations

import pytest
import torch

from quantbench.methods import parse_method
from quantbench.spec import SpecError

from . import needs_bnb

pytestmark = needs_bnb
FAST = dict(tokens=256, context=64, calib_samples=0, measure_speed=False, generate=False)


def _linear_shapes(model) -> list[tuple[int, int, bool]]:
    """(out, in, has_bias) of every linear layer but the head, from the float model."""
    from quantbench.layers import LayerRule, get_module, get_weight

    out = []
    for name in LayerRule().select(model):
        m = get_module(model, name)
        out.append((*get_weight(m).shape, getattr(m, "bias", None) is not None))
    return out


def _expected_bytes(ref, spec: str) -> int:
    """Weight bytes by hand: float parameters at 4 bytes, each linear layer as bnb stores it."""
    from quantbench.layers import weight_bytes

    cfg = parse_method(spec).config
    total = weight_bytes(ref.model)  # every float32 parameter and buffer
    for rows, cols, bias in _linear_shapes(ref.model):
        total -= 4 * rows * cols
        n = rows * cols
        if spec.startswith("bnb-int8"):
            total += n + 4 * rows  # int8 codes + one float32 absmax (SCB) per row
        else:
            blocks = -(-n // cfg.block)
            total += n // 2  # two 4-bit codes per byte
            # float32 absmax per block, or uint8 codes + float32 absmax per 256 codes + float32 offset
            total += blocks + 4 * -(-blocks // 256) + 4 if cfg.double_quant else 4 * blocks
    return total


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bnb_variants_evaluate_through_run(arch, tiny_model_dirs, tiny_refs):
    from quantbench.run import RunConfig, run

    # int8 through transformers (auto, a directory); nf4 by replacement; fp4 block 128: replacement (auto)
    specs = ["bnb-int8", "bnb-nf4:double_quant=true,loader=replace", "bnb-fp4:block=128"]
    doc = run(RunConfig(model=tiny_model_dirs[arch], **FAST), specs)
    rows = {r["spec"]: r for r in doc["results"]}
    assert list(rows) == specs
    ref = tiny_refs[arch]
    for spec, r in rows.items():
        assert r["weight_bytes"] == _expected_bytes(ref, spec), spec
        assert 0 < r["kld_mean"] < 0.01 and r["ppl"] > 1
        assert set(r["layer_specs"].values()) == {spec.replace(",loader=replace", "")}  # the format, not the path
        assert len(r["layer_specs"]) == len(_linear_shapes(ref.model))
    assert rows["bnb-int8"]["kld_mean"] < rows[specs[1]]["kld_mean"]  # 8 bits beat 4


def _stored(model) -> dict[str, torch.Tensor]:
    """Every tensor bitsandbytes keeps for the model's bnb layers, by name."""
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, Linear8bitLt):
            out[name + ".CB"] = m.weight.data
            out[name + ".SCB"] = m.weight.SCB if m.weight.SCB is not None else m.state.SCB
        elif isinstance(m, Linear4bit):
            qs = m.weight.quant_state
            out[name + ".codes"] = m.weight.data
            out[name + ".absmax"] = qs.absmax
            if qs.state2 is not None:
                out[name + ".absmax2"] = qs.state2.absmax
                out[name + ".offset"] = qs.offset
    return out


@pytest.mark.parametrize("spec", ["bnb-int8:threshold=4.0", "bnb-nf4:double_quant=true", "bnb-fp4"])
def test_transformers_and_replacement_paths_store_identical_bytes(spec, tiny_refs):
    """transformers' BitsAndBytesConfig path and the layer replacement give the same tensors and
    the same logits (GPT-2: the replacement takes Conv1D weights in nn.Linear orientation)."""
    for arch in ("llama", "gpt2"):
        ref = tiny_refs[arch]
        a = parse_method(spec + (",loader=transformers" if ":" in spec else ":loader=transformers")).build(ref)
        b = parse_method(spec + (",loader=replace" if ":" in spec else ":loader=replace")).build(ref)
        sa, sb = _stored(a.model), _stored(b.model)
        assert sa.keys() == sb.keys() and sa
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), (arch, k)
        ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(a.logits(ids), b.logits(ids), rtol=0, atol=0)
        assert a.weight_bytes() == b.weight_bytes()
        a.close()
        b.close()


def test_weight_bytes_do_not_change_after_use(tiny_refs):
    """bitsandbytes moves LLM.int8()'s row scales from the weight to the layer state on the first
    forward: the count follows them instead of losing or double counting them."""
    v = parse_method("bnb-int8").build(tiny_refs["llama"])
    before = v.weight_bytes()
    assert len(v.generate(torch.zeros(1, 8, dtype=torch.long), 3)) == 3
    assert v.weight_bytes() == before == _expected_bytes(tiny_refs["llama"], "bnb-int8")


def test_spec_errors(tiny_refs, tiny_f32_gguf):
    from quantbench.sources import load_reference

    with pytest.raises(SpecError, match="block=48 is not supported; choose one of 32, 64"):
        parse_method("bnb-nf4:block=48")
    with pytest.raises(SpecError, match="loader=transformers has no block size"):
        parse_method("bnb-nf4:block=128,loader=transformers")
    with pytest.raises(SpecError, match="threshold=-1.0 must be >= 0"):
        parse_method("bnb-int8:threshold=-1")
    with pytest.raises(SpecError, match="compute_dtype='fp8' is not valid"):
        parse_method("bnb-nf4:compute_dtype=fp8")
    gguf_ref = load_reference(tiny_f32_gguf["llama"])
    with pytest.raises(SpecError, match="transformers refuses a quantization config with a .gguf file"):
        parse_method("bnb-int8:loader=transformers").build(gguf_ref)
    v = parse_method("bnb-int8").build(gguf_ref)  # auto: the replacement path
    assert v.weight_bytes() == _expected_bytes(gguf_ref, "bnb-int8")
    v.close()


def test_list_says_which_backends_are_installed(capsys):
    from quantbench.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "bnb-nf4" in out and "llamacpp" in out
    assert "bitsandbytes installed" in out


@pytest.mark.parametrize("compute_dtype", ["fp32", "bf16"])
def test_4bit_layers_multiply_in_the_compute_dtype_asked_for(compute_dtype, tiny_refs):
    """bitsandbytes' AVX512-BF16 CPU path multiplies in bf16 whatever the compute dtype: a variant
    keeps it only when bf16 is asked for (on other CPUs bitsandbytes never takes it)."""
    from bitsandbytes.functional import has_avx512bf16
    from bitsandbytes.nn import Linear4bit

    v = parse_method(f"bnb-nf4:compute_dtype={compute_dtype},loader=replace").build(tiny_refs["llama"])
    try:
        fused = [m.support_avx512bf16_for_cpu for m in v.model.modules() if isinstance(m, Linear4bit)]
        assert fused and set(fused) == ({has_avx512bf16()} if compute_dtype == "bf16" else {False})
    finally:
        v.close()
