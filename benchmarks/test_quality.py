"""Quality gates: every variant's perplexity ratio, mean KL divergence and top-1 agreement
against its family's thresholds (quantbench.gates.DEFAULTS, overridable in [tool.quantbench])."""

from quantbench import gates
from quantbench.pytest_plugin import fail_with


def test_quality(qb_metrics, qb_thresholds, qb_label):
    fail_with(gates.quality_failures(qb_metrics, qb_thresholds, qb_label))

