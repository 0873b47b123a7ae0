"""The on-disk cache: where it lives. Entries are written atomically by their owners."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$QUANTBENCH_CACHE_DIR, else $XDG_CACHE_HOME/quantbench, else ~/.cache/quantbench."""
    base = os.environ.get("QUANTBENCH_CACHE_DIR")
    if base:
        return Path(base).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "quantbench"
