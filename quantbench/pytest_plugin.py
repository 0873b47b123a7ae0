"""pytest plugin for quantbench benchmarks (registered through the pytest11 entry point)."""
