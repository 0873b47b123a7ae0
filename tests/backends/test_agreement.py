"""Issue 5's agreement between our formats and bitsandbytes, variant against variant on the same
tokens: our NF4 and `bnb-nf4` store identical bytes and give equal logits; our LLM.int8() and
`bnb-int8` are within a KL divergence of 1e-4 of each other. The layer-level byte and bit
comparisons are in tests/formats (test_nf4.py, test_llm_int8.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")

from bitsandbytes.nn import Linear4bit  # noqa: E402

from quantbench.layers import QLinear  # noqa: E402
from quantbench.methods import parse_method  # noqa: E402

# bitsandbytes picks its CPU dequantization kernel by torch's CPU capability; its AVX-512 kernel
# misreads a block wider than a row (the tiny models' width is 64): measured on an AVX-512 Xeon
# with bitsandbytes 0.50.2, a (64, 64) layer in blocks of 128 dequantized up to 8.4 away from
# `quantize_4bit`'s own codes, which ours matches byte for byte (tests/formats/test_nf4.py).
BNB_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
WIDER_THAN_A_ROW = pytest.mark.xfail(BNB_AVX512, strict=True, reason="bitsandbytes' AVX-512 CPU dequantize_4bit "
                                     "misreads blocks wider than a row")
PAIRS = [
    ("nf4:block=64,double_quant=true", "bnb-nf4:double_quant=true,loader=replace"),
    ("nf4:block=64,double_quant=false", "bnb-nf4:loader=replace"),
    pytest.param("nf4:block=128,double_quant=true", "bnb-nf4:block=128,double_quant=true,loader=replace",
                 marks=WIDER_THAN_A_ROW),
]


def token_ids(ref) -> torch.Tensor:
    return torch.randint(0, ref.model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))


def mean_kl(a: torch.Tensor, b: torch.Tensor) -> float:
    p, q = torch.log_softmax(a.float(), -1), torch.log_softmax(b.float(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def packed(module) -> tuple[bytes, bytes]:
    """(codes, absmax bytes) of one 4-bit layer, ours or bitsandbytes'; nested absmax included."""
    if isinstance(module, QLinear):
        q = module.qtensor
        return q.codes.numpy().tobytes(), q.tensors()["absmax"].numpy().tobytes()
    st = module.weight.quant_state
    return module.weight.data.numpy().tobytes(), st.absmax.numpy().tobytes()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("ours,theirs", PAIRS, ids=["b64-dq", "b64", "b128-dq"])
def test_our_nf4_and_bitsandbytes_nf4_store_the_same_bytes_and_compute_the_same(arch, ours, theirs, tiny_refs):
    ref = tiny_refs[arch]
    a, b = parse_method(ours).build(ref), parse_method(theirs).build(ref)
    try:
        mods_a = {n: m for n, m in a.model.named_modules() if isinstance(m, QLinear)}
        mods_b = {n: m for n, m in b.model.named_modules() if isinstance(m, Linear4bit)}
        assert mods_a and sorted(mods_a) == sorted(mods_b)
        for name in mods_a:
            assert packed(mods_a[name]) == packed(mods_b[name]), name
        assert a.weight_bytes() == b.weight_bytes()
        ids = token_ids(ref)
        torch.testing.assert_close(a.logits(ids), b.logits(ids), rtol=1e-5, atol=1e-5)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("threshold", [6.0, 1.0])
def test_our_llm_int8_and_bitsandbytes_int8_are_within_1e_4_kl(arch, threshold, tiny_refs):
    ref = tiny_refs[arch]
    a = parse_method(f"llm-int8:threshold={threshold}").build(ref)
    b = parse_method(f"bnb-int8:threshold={threshold}").build(ref)
    try:
        ids = token_ids(ref)
        la, lb = a.logits(ids), b.logits(ids)
        assert mean_kl(la, lb) < 1e-4
        assert mean_kl(ref.model(ids).logits, la) > 0  # the comparison sees quantization at all
    finally:
        a.close()
        b.close()
