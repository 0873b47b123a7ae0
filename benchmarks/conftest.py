"""The fixtures of these benchmarks (qb_reference, qb_variant, qb_metrics...) come from quantbench's
pytest plugin, which pytest loads through quantbench's `pytest11` entry point once quantbench is
installed (`pip install -e .`). The matrix and thresholds are in pyproject.toml's [tool.quantbench]."""
