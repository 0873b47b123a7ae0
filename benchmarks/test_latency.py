"""Latency with pytest-benchmark: prefill of one window of C tokens and greedy decoding, per
variant. Every quality and memory figure of the variant goes into the benchmark's extra_info, so
--benchmark-save / --benchmark-compare / --benchmark-compare-fail=mean:10% work as usual.

Under pytest-xdist pytest-benchmark disables itself (timings from parallel workers are not
reliable); the tests then run each call once, untimed, and record no latency.
"""

from quantbench.pytest_plugin import mean_seconds


PROMPT_TOKENS = 16


def test_prefill(benchmark, qb_variant, qb_reference, qb_settings, qb_record):
    window = qb_reference.windows[:1]  # (1, C)
    benchmark.group = "prefill"
    benchmark.pedantic(qb_variant.logits, args=(window,), rounds=qb_settings.latency_rounds, warmup_rounds=1)
    t = mean_seconds(benchmark)
    qb_record(benchmark, **({"prefill_tokens_per_s": window.numel() / t} if t else {}))


def test_decode(benchmark, qb_variant, qb_reference, qb_settings, qb_record):
    """Greedy generation of `decode_tokens` tokens after a 16-token prompt, with the KV cache.
    Tokens per second counts the new tokens only; the short prompt's prefill is included in the
    time (about one decode step's worth on the CPU)."""
    prompt = qb_reference.windows[:1, :PROMPT_TOKENS]  # (1, 16)
    n = qb_settings.run.decode_tokens
    benchmark.group = "decode"
    benchmark.pedantic(qb_variant.generate, args=(prompt, n), rounds=qb_settings.latency_rounds, warmup_rounds=1)
    t = mean_seconds(benchmark)
    qb_record(benchmark, **({"decode_tokens_per_s": n / t} if t else {}))
