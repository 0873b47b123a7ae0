"""Integration on the embedded SmolLM2-135M: a few windows through the real pipeline, and
perplexity agreement with llama.cpp's own computation on the same GGUF file and tokens."""

import math

import numpy as np
import pytest
import torch

from quantbench.run import RunConfig, Session

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    cfg = RunConfig(tokens=1024, context=256, protocol="llama.cpp", calib_samples=4, calib_len=128,
                    measure_speed=False, generate=False)
    return Session(cfg)


def test_embedded_reference_and_int8(session):
    assert session.ref.info.kind == "embedded" and session.ref.info.vocab_size == 49152
    assert session.windows.shape == (4, 256)
    assert session.calib.input_ids.shape == (4, 128)
    fp32 = session.measure("fp32")
    int8 = session.measure("absmax:bits=8,granularity=channel")
    assert fp32["kld_mean"] == 0.0 and fp32["top1_agreement"] == 1.0
    assert 5 < fp32["ppl"] < 100  # English prose, a 135M instruct model
    assert 0 < int8["kld_mean"] < 0.02 and int8["top1_agreement"] > 0.9
    assert abs(int8["ln_ppl_ratio"]) < 0.02


def test_perplexity_agrees_with_llamacpp_on_same_gguf_and_tokens(session):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from quantbench.backends.llamacpp import direct_llama

    ctx = session.protocol.context
    llm = direct_llama(session.ref.info.gguf_file, n_ctx=ctx, n_batch=ctx, logits_all=True, n_threads=2, verbose=False)
    fed = session.protocol.prepare(session.windows)
    first = session.protocol.first
    nll = []
    for w in fed.tolist():
        llm.reset()
        llm.eval(w)
        logits = torch.from_numpy(np.asarray(llm.scores[:ctx], dtype=np.float32))  # (C, V)
        logp = torch.log_softmax(logits[first : ctx - 1].double(), -1)
        nll.append(-logp.gather(-1, torch.tensor(w[first + 1 :]).unsqueeze(-1)).squeeze(-1))
    ppl_llamacpp = math.exp(torch.cat(nll).mean().item())
    ppl_ours = session.measure("fp32")["ppl"]
    # llama.cpp computes with the Q4_1 blocks and 8-bit activations; transformers with the
    # dequantized float weights: the two agree within 1%.
    assert ppl_ours == pytest.approx(ppl_llamacpp, rel=0.01)
