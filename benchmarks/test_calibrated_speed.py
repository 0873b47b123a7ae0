"""Calibrated methods against their floor: one forward pass of the model over the calibration set.

Issue 4's bars, on the embedded model (SmolLM2-135M) with 32 x 256 calibration tokens, 4-bit groups
of 64: the whole quantization (capture, statistics, search, rounding, sequential re-runs) takes at
most 2x that forward pass for GPTQ and 4x for AWQ. Both are timed in the same run, on the same
machine state: the method is built ROUNDS times, with the forward pass timed before the first
build and after each one; each build's ratio is to the mean of the forward passes just before and
after it, and the figure is the median of those ratios. On a shared 2-core VM one forward pass took
anywhere from 18.6 s to 25.3 s within ten minutes, so a single build against its neighbours could
land on either side of the bar by chance; the median of three is a steadier reading of the ratio.

    python -m pytest benchmarks/test_calibrated_speed.py -m slow

The comparison with llm-compressor and GPTQModel (same job, same run) is in
test_reference_methods.py: they pin other transformers versions and run in their own environments.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from quantbench.methods import parse_method
from quantbench.sources import load_reference, load_text, split_tokens, tokenize
from quantbench.sources.text import calibration

BARS = {"gptq:bits=4,group=64": 2.0, "awq:bits=4,group=64": 4.0}
ROUNDS = 3


@pytest.fixture(scope="module")
def embedded():
    ref = load_reference("smollm2-135m")
    stream = tokenize(ref.tokenizer, load_text())
    split = split_tokens(len(stream), context=256, n_eval=0, n_calib=32, calib_len=256, seed=0)
    return ref, calibration(stream, split)


def forward_seconds(ref, calib) -> float:
    with torch.inference_mode():
        t = time.perf_counter()
        ref.model(input_ids=calib.input_ids, use_cache=False)
        return time.perf_counter() - t


@pytest.mark.slow
@pytest.mark.parametrize("spec", sorted(BARS))
def test_quantization_time_over_one_forward_pass(benchmark, embedded, spec):
    ref, calib = embedded
    method = parse_method(spec)
    forwards: list[float] = []  # before each build, then once after the last
    took: list[float] = []

    def build():
        t = time.perf_counter()
        method.build(ref, calib)
        took.append(time.perf_counter() - t)

    benchmark.pedantic(build, setup=lambda: forwards.append(forward_seconds(ref, calib)), rounds=ROUNDS, iterations=1)
    forwards.append(forward_seconds(ref, calib))
    ratios = [t / ((a + b) / 2) for t, a, b in zip(took, forwards, forwards[1:])]
    ratio = statistics.median(ratios)
    benchmark.extra_info.update(
        forward_s=[round(f, 2) for f in forwards], method_s=[round(t, 2) for t in took],
        ratios=[round(r, 3) for r in ratios], ratio=round(ratio, 3), bar=BARS[spec],
    )
    detail = ", ".join(f"{t:.1f} s / {(a + b) / 2:.1f} s" for t, a, b in zip(took, forwards, forwards[1:]))
    assert ratio <= BARS[spec], (
        f"{spec}: a median {ratio:.2f}x one forward pass over {ROUNDS} builds (build / forward pass beside it: "
        f"{detail}); the bar is {BARS[spec]}x"
    )
