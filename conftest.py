"""pytest setup for this repository's checkout: `pytest tests` and `pytest benchmarks` from its root.

quantbench's options and fixtures (--qb-*, qb_reference, qb_variant, qb_metrics...) are not here:
they come from its plugin, `quantbench.pytest_plugin`, which pytest loads through the `pytest11`
entry point, so that any project that installs quantbench has them. What this file adds is for
the repository alone: the helpers in `tests/` that drive the reference libraries (`ggml_ref`,
libggml's quantizers through llama-cpp-python's shared library) are importable from
`benchmarks/` too, which times ours against them.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent / "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
