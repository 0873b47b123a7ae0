"""Issue 5's bars for the llama.cpp backend, measured side by side in one run on the embedded model.

* Speed: the harness's llama.cpp variant scores the evaluation windows at least 0.9x as fast as
  llama-cpp-python driven directly (`Llama(logits_all=True)`, one `eval` per window) with the
  same llama.cpp settings (threads, n_batch = n_ubatch = the variant's chunk) on the same Q4_K_M
  file and the same windows; and the prefill speed the harness reports (llama.cpp's own
  counters) is within 10% of that direct figure. The harness adds nothing worth naming. Rounds
  alternate direct / harness so both see the same machine load, and the speed bar is on the
  median of the per-round ratios. The ratio of the two medians, which may come from different
  rounds, read 0.88x in one full run where llama.cpp's counters over the harness's rounds (227,
  198 and 165 tok/s: the host slowed from round to round) agreed with the direct figures of the
  same rounds (median ratio 0.994). The counters are read over the harness's run of the same
  windows; each round's counters are compared with that round's direct figure, and the median of
  those ratios is asserted. Counters read over one window at another moment of the round measured
  0.79x once and 1.14-1.17x in two runs of a later day, on a host whose speed moved 20% from one
  window to the next; over the same run they agreed with its wall clock within 1%. What
  `own_speed` reports (one window, and decode) is recorded.
  llama-cpp-python with a whole window as one batch (n_batch = 512) is measured alongside and
  recorded, not asserted: on an idle machine it runs at the chunked speed, on an oversubscribed
  one (llama.cpp's threads spin at every graph barrier) fewer chunks are faster.
* Memory: the Q4_K_M variant's peak resident memory while it evaluates the windows, measured in
  a fresh process, is at most 1.5x its file size plus the context's KV cache. "The variant's"
  memory is the process's peak (VmHWM) minus its resident set just before the variant was
  loaded, minus the logits it hands back (one (1, C, V) float32 window at a time), which belong
  to the evaluation that asked for them.

Run: python -m pytest benchmarks/test_llamacpp_backend.py  (about 2-4 minutes on 2 cores)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

from quantbench.backends.llamacpp import LlamaCppVariant, cores, direct_llama  # noqa: E402
from quantbench.methods import parse_method  # noqa: E402
from quantbench.sources import load_reference, load_text, split_tokens, tokenize  # noqa: E402
from quantbench.sources.text import windows as eval_windows  # noqa: E402

CONTEXT = 512
N_WINDOWS = 4
ROUNDS = 3


@pytest.fixture(scope="module")
def q4km(tmp_path_factory):
    """The embedded model's Q4_K_M (quantized by llama.cpp), its evaluation windows and KV size."""
    ref = load_reference("smollm2-135m")
    stream = tokenize(ref.tokenizer, load_text())
    split = split_tokens(len(stream), CONTEXT, N_WINDOWS, 0, 0, seed=0)
    wins = eval_windows(stream, split)  # (N_WINDOWS, CONTEXT)
    path = tmp_path_factory.mktemp("llamacpp") / "q4_k_m.gguf"
    parse_method(f"llamacpp:type=Q4_K_M,keep={path}").build(ref).close()
    cfg = ref.model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_bytes = CONTEXT * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 2  # K and V, f16
    del ref
    return path, wins, kv_bytes


def _tokens_per_s(fn, wins: torch.Tensor) -> float:
    t = time.perf_counter()
    for w in wins:
        fn(w)
    return wins.numel() / (time.perf_counter() - t)


def _direct(path: Path, batch: int):
    return direct_llama(path, n_ctx=CONTEXT, n_batch=batch, n_ubatch=batch, n_threads=cores(),
                        n_threads_batch=cores(), logits_all=True, verbose=False)


def test_harness_speed_matches_llama_cpp_python(benchmark, q4km):
    path, wins, _ = q4km
    ours = LlamaCppVariant(path, "llamacpp:type=Q4_K_M")
    direct, whole = _direct(path, ours.ubatch), _direct(path, CONTEXT)

    def driver(llm):
        def run(w: torch.Tensor) -> None:
            llm.reset()
            llm.eval(w.tolist())

        return run

    def run_ours(w: torch.Tensor) -> None:
        ours.logits(w[None])

    runs = {"direct": driver(direct), "harness": run_ours, "whole_window": driver(whole)}
    try:
        for run in runs.values():  # warm-up: allocations, page faults of the mapped file
            run(wins[0])
        tps: dict[str, list[float]] = {k: [] for k in runs}
        counted: list[float] = []  # llama.cpp's prefill counters over the harness's own run
        own: list[dict] = []  # what the harness reports (own_speed: one window, and decode)
        for _ in range(ROUNDS):
            for k, run in runs.items():
                with ours.counters() as c:
                    tps[k].append(_tokens_per_s(run, wins))
                if k == "harness":
                    counted.append(c["prefill_tokens_per_s"])
            own.append(ours.own_speed(wins[:1], wins[:1, :16], 16))
        direct_tps, ours_tps, whole_tps = (statistics.median(tps[k]) for k in runs)
        ratios = [h / d for h, d in zip(tps["harness"], tps["direct"])]  # round by round, side by side
        reported = {k: statistics.median(c[k] for c in own) for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
        reported_ratio = statistics.median(c / d for c, d in zip(counted, tps["direct"]))
        benchmark.group = "llamacpp-prefill"
        benchmark.pedantic(run_ours, args=(wins[0],), rounds=1, iterations=1)
    finally:
        direct.close()
        whole.close()
        ours.close()
    ratio = statistics.median(ratios)
    benchmark.extra_info.update(direct_tokens_per_s=direct_tps, harness_tokens_per_s=ours_tps, ratio=ratio,
                                ratios=ratios, rounds_tokens_per_s=tps,
                                whole_window_direct_tokens_per_s=whole_tps, counted_prefill_tokens_per_s=counted,
                                reported_prefill_tokens_per_s=reported["prefill_tokens_per_s"],
                                reported_decode_tokens_per_s=reported["decode_tokens_per_s"],
                                reported_ratio=reported_ratio, threads=cores(), ubatch=ours.ubatch)
    detail = ", ".join(f"{h:.0f}/{d:.0f}" for h, d in zip(tps["harness"], tps["direct"]))
    assert ratio >= 0.9, (
        f"harness vs llama-cpp-python direct: a median {ratio:.2f}x over {ROUNDS} rounds (tok/s per round, "
        f"harness/direct: {detail})"
    )
    assert abs(reported_ratio - 1) <= 0.1, (
        f"llama.cpp's counters over the harness's windows report {statistics.median(counted):.0f} tok/s, "
        f"llama-cpp-python direct {direct_tps:.0f} tok/s in the same rounds (median ratio {reported_ratio:.2f}x)"
    )


_MEASURE = r"""
import json, sys, torch
import llama_cpp  # the library's code is mapped before the baseline: it is not the variant's memory
from quantbench.backends.llamacpp import LlamaCppVariant
from quantbench.eval.memory import PeakRSS, rss_bytes
path, wins = sys.argv[1], torch.load(sys.argv[2])
before = rss_bytes()
with PeakRSS() as peak:
    v = LlamaCppVariant(path, "q4_k_m")
    for w in wins:
        out = v.logits(w[None])
        del out
print(json.dumps({"before": before, "peak": peak.bytes, "logits": wins.shape[1] * v.n_vocab * 4}))
v.close()
"""


def test_peak_memory_within_one_and_a_half_file_sizes_plus_kv(benchmark, q4km, tmp_path):
    path, wins, kv_bytes = q4km
    torch.save(wins, tmp_path / "wins.pt")
    root = Path(__file__).resolve().parents[1]

    def measure() -> dict:
        out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(tmp_path / "wins.pt")], cwd=root,
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    benchmark.group = "llamacpp-memory"
    m = benchmark.pedantic(measure, rounds=1, iterations=1)
    variant = m["peak"] - m["before"] - m["logits"]
    file_bytes = path.stat().st_size
    bar = 1.5 * file_bytes + kv_bytes
    benchmark.extra_info.update(variant_peak_bytes=variant, file_bytes=file_bytes, kv_bytes=kv_bytes,
                                bar_bytes=bar, ratio_to_file=variant / file_bytes)
    assert variant <= bar, (
        f"Q4_K_M variant peaks at {variant / 2**20:.1f} MiB; bar 1.5 x {file_bytes / 2**20:.1f} MiB file "
        f"+ {kv_bytes / 2**20:.1f} MiB KV = {bar / 2**20:.1f} MiB"
    )
