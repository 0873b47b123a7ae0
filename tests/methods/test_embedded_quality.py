"""On the embedded model (SmolLM2-135M): 4-bit groups of 64, GPTQ and AWQ below RTN in mean KL."""

from __future__ import annotations

import pytest

from quantbench.methods import parse_method

from .conftest import mean_kl


@pytest.fixture(scope="module")
def embedded():
    from quantbench.sources import load_reference, load_text, split_tokens, tokenize
    from quantbench.sources.text import calibration, windows

    ref = load_reference("smollm2-135m")
    stream = tokenize(ref.tokenizer, load_text())
    split = split_tokens(len(stream), context=256, n_eval=4, n_calib=16, calib_len=256, seed=0)
    return ref, calibration(stream, split), windows(stream, split)


@pytest.mark.slow
def test_gptq_and_awq_beat_rtn_at_4_bits(embedded):
    ref, calib, ids = embedded
    kl = {
        spec: mean_kl(ref.model, parse_method(spec).build(ref, calib).model, ids)
        for spec in ("int:bits=4,group=64,sym=false", "gptq:bits=4,group=64", "awq:bits=4,group=64")
    }
    rtn = kl.pop("int:bits=4,group=64,sym=false")
    assert all(v < rtn for v in kl.values()), (rtn, kl)
