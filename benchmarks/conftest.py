"""The fixtures of these benchmarks (qb_reference, qb_variant, qb_metrics...) come from quantbench's
pytest plugin, which pytest loads through quantbench's `pytest11` entry point once quantbench is
installed (`pip install -e .`). The matrix and thresholds are in pyproject.toml's [tool.quantbench]."""

import pytest


@pytest.hookimpl(tryfirst=True)  # before `-m smoke` deselects
def pytest_collection_modifyitems(items):
    """The speed bars (test_throughput.py) are not part of the smoke subset, whose variants they
    would otherwise inherit: shared CI runners' timings are too noisy to gate on."""
    for item in items:
        if item.module.__name__.endswith("test_throughput"):
            item.own_markers[:] = [m for m in item.own_markers if m.name != "smoke"]
