"""Memory gates: the weights take what their formats say (FormatConfig.bits_per_weight per
quantized layer, every other tensor at its own size), and the peak resident memory during the
evaluation stays under its threshold."""

from quantbench import gates
from quantbench.pytest_plugin import fail_with


def test_memory(qb_variant, qb_metrics, qb_reference, qb_thresholds, qb_label):
    theory = gates.theoretical_bytes(qb_variant, qb_reference.ref.model)
    fail_with(gates.memory_failures(qb_metrics, theory, qb_thresholds, qb_label))
