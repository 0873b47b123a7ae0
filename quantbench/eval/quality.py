"""A variant against its reference, window by window, on exactly the same tokens.

The reference's logits at the scored positions are computed once and kept on disk, not in
memory: the embedded model's vocabulary is 49,152 wide, about 200 KB a token in float32. Each
variant then runs window by window, and each window's reference logits are read back from the
file a few rows at a time, as the scoring goes (plain reads into one small buffer, not a memory
map, so they do not count in the process's resident set).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..variant import Variant
from .metrics import ROWS, Quality, TokenScores, score_chunks, summarize
from .protocols import Protocol

Progress = Callable[[int], None]


@dataclass(frozen=True)
class RefLogits:
    """Reference logits at the scored positions: (n_windows, scored, vocab) float32 in a file."""

    path: Path
    n_windows: int
    scored: int
    vocab: int

    def window(self, i: int) -> torch.Tensor:
        """Window i's logits (scored, vocab)."""
        return self.rows(i, 0, self.scored)

    def rows(self, i: int, a: int, b: int, out: np.ndarray | None = None) -> torch.Tensor:
        """Rows a:b of window i, (b - a, vocab), read into `out` (a float32 buffer reused from chunk
        to chunk) if given. A buffer of a few rows stays in the CPU's cache, where the scoring then
        finds them: reading a 511-row window in 64-row pieces takes a quarter of the time of
        reading it whole into a 100 MB array (measured 9 ms against 38 from the page cache)."""
        if not (0 <= i < self.n_windows and 0 <= a < b <= self.scored):
            raise IndexError(f"rows {a}:{b} of window {i}: the file holds {self.n_windows} windows of {self.scored} rows")
        count = (b - a) * self.vocab
        buf = np.empty(count, dtype=np.float32) if out is None else out[:count]
        with open(self.path, "rb", buffering=0) as f:
            f.seek((i * self.scored + a) * self.vocab * 4)
            got = f.readinto(buf)
        if got != count * 4:
            raise ValueError(f"{self.path} is truncated: window {i} is incomplete; delete it to rebuild")
        return torch.from_numpy(buf).view(b - a, self.vocab)


# Rows (batch x context) per reference forward. At one 512-token window the embedded model's
# matmuls have 511 rows, and this host's BLAS ran its forward at 0.70 of the 2048^2 matmul's rate;
# two windows at once (1,022 rows) ran at 0.78 (AMD EPYC, AVX2, 2 cores). Each window's logits are
# bit-identical either way (tests/eval/test_quality.py).
BATCH_ROWS = 1024


def reference_batch(context: int) -> int:
    """Windows per reference forward: as many as fit in BATCH_ROWS rows, at least one."""
    return max(1, BATCH_ROWS // context)


def _batches(n: int, size: int):
    for s in range(0, n, size):
        yield s, min(n, s + size)


def reference_logits(
    ref: Variant,
    windows: torch.Tensor,
    protocol: Protocol,
    path: Path,
    key: dict,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> RefLogits:
    """Compute the reference's scored logits into `path`, or reuse the file if its sidecar JSON
    records the same `key` (model hash, windows, protocol, dtype, device) and its size is whole.
    The reference runs `batch_size` windows at a time (default `reference_batch`), into one
    logits buffer reused from batch to batch."""
    n, context = windows.shape
    batch_size = batch_size or reference_batch(context)
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key and path.stat().st_size == meta["bytes"]:
            if progress:
                progress(n)
            return RefLogits(path, n, meta["scored"], meta["vocab"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fed = protocol.prepare(windows)
    vocab = 0
    buf = None  # (batch, C, V): the first batch's logits, then every batch's
    with open(tmp, "wb") as f:
        for s, e in _batches(n, batch_size):
            logits = ref.logits(fed[s:e], out=None if buf is None else buf[: e - s])
            buf = logits if buf is None else buf
            sel = protocol.select(logits)  # (b, scored, V)
            vocab = sel.shape[-1]
            f.write(sel.contiguous().cpu().numpy().astype(np.float32, copy=False).tobytes())
            if progress:
                progress(e - s)
    size = tmp.stat().st_size
    os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
    meta = {"key": key, "bytes": size, "scored": protocol.scored_per_window, "vocab": vocab}
    tmp_meta = meta_path.with_name(f"{meta_path.name}.{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp_meta, meta_path)
    return RefLogits(path, n, protocol.scored_per_window, vocab)


@dataclass(frozen=True)
class QualityRun:
    quality: Quality
    scores: TokenScores
    eval_seconds: float  # the whole loop
    forward_seconds: float  # inside the variant's forward only


def evaluate_quality(
    variant: Variant,
    windows: torch.Tensor,
    protocol: Protocol,
    ref: RefLogits,
    batch_size: int = 1,
    progress: Progress | None = None,
) -> QualityRun:
    """Score `variant` on every window against the stored reference logits."""
    n = windows.shape[0]
    if ref.n_windows != n:
        raise ValueError(f"reference logits hold {ref.n_windows} windows, but {n} were given")
    fed = protocol.prepare(windows)
    targets = protocol.targets(windows)  # (n, scored)
    parts: list[TokenScores] = []
    buffer = np.empty((ROWS + 1) * ref.vocab, dtype=np.float32)  # the longest chunk row_chunks makes
    forward = 0.0
    out = None  # the first batch's logits, the buffer of every later batch (see `head_logits`)
    t0 = time.perf_counter()
    for s, e in _batches(n, batch_size):
        t = time.perf_counter()
        logits = variant.logits(fed[s:e], out=None if out is None else out[: e - s])  # (b, C, V)
        forward += time.perf_counter() - t
        out = logits if out is None else out
        sel = protocol.select(logits)
        if sel.shape[-1] != ref.vocab:
            raise ValueError(
                f"the variant's vocabulary ({sel.shape[-1]}) differs from the reference's ({ref.vocab}): "
                "a tokenizer that does not match the model"
            )
        for i in range(s, e):
            parts.append(score_chunks(partial(ref.rows, i, out=buffer), sel[i - s], targets[i].to(sel.device)))
        if progress:
            progress(e - s)
    scores = TokenScores.cat(parts)
    return QualityRun(summarize(scores), scores, time.perf_counter() - t0, forward)
