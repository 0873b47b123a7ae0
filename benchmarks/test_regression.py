"""Quality regression gate: perplexity and mean KL divergence against a saved run.

    pytest benchmarks --qb-compare results/base.json
    pytest benchmarks --qb-compare .benchmarks/Linux-CPython-3.11-64bit/0001_base.json

Tolerances (regression = {ppl_rel, kld_rel, kld_abs} in [tool.quantbench]): PPL may rise by 1%,
mean KL by 10% plus 1e-4. Both figures are deterministic on one machine, so the tolerance is for
other machines and library versions. Skipped, with the reason, when no baseline is given or the
baseline lacks the variant or was measured on other tokens.
"""

from quantbench import gates
from quantbench.pytest_plugin import fail_with


def test_no_quality_regression(qb_metrics, qb_baseline, qb_settings, qb_label):
    fail_with(gates.regression_failures(qb_metrics, qb_baseline, qb_settings.tolerance, qb_label))
