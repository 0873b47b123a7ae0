"""Issue 2's speed bars. The reference's evaluation forward achieves at least 0.75 of the
machine's fp32 matmul FLOPs/s, both measured in this run, side by side; and scoring a variant
(log-softmax, KL, reading the stored reference logits) adds at most 15% to its own forward time.

Measured before any code existed, on the 2-core development machine: a 2048x2048 fp32 matmul at
about 195 GFLOP/s, a plain transformers forward of the embedded model over 512-token windows at
about 0.68 of that.
"""

import pytest

from quantbench.eval.flops import forward_flops, matmul_flops_per_s
from quantbench.pytest_plugin import mean_seconds
from quantbench.variant import TorchVariant


TARGET = 0.75


def test_reference_throughput(benchmark, qb_reference, qb_settings):
    ref = TorchVariant("reference", qb_reference.ref.model)
    window = qb_reference.windows[:1]  # (1, C), as the reference logits are computed
    benchmark.group = "reference-throughput"
    benchmark.pedantic(ref.logits, args=(window,), rounds=qb_settings.latency_rounds, warmup_rounds=1)
    t = mean_seconds(benchmark)
    if t is None:
        pytest.skip("pytest-benchmark is disabled (xdist or --benchmark-disable): nothing was timed")
    matmul = matmul_flops_per_s(device=ref.device)
    model = forward_flops(qb_reference.ref.model, window.shape[1]) / t
    ratio = model / matmul
    benchmark.extra_info.update(model_flops_per_s=model, matmul_flops_per_s=matmul, ratio=ratio, target=TARGET)
    assert ratio >= TARGET, (
        f"reference forward reaches {model / 1e9:.1f} GFLOP/s = {ratio:.2f} of the measured fp32 matmul "
        f"{matmul / 1e9:.1f} GFLOP/s; target {TARGET}"
    )


def test_bookkeeping_overhead(qb_metrics, qb_label):
    """Issue 2: scoring (log-softmax, KL, reading the reference logits) adds at most 15% to the
    variant's own forward time, both measured in the same evaluation loop."""
    overhead = qb_metrics["eval_seconds"] / qb_metrics["forward_seconds"] - 1
    assert overhead <= 0.15, (
        f"{qb_label}: perplexity/KL bookkeeping adds {overhead:.1%} to the forward time "
        f"({qb_metrics['eval_seconds']:.2f} s in all, {qb_metrics['forward_seconds']:.2f} s in the forward); target 15%"
    )
