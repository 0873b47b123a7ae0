"""A variant against its reference, window by window, on exactly the same tokens.

The reference's logits at the scored positions are computed once and kept on disk, not in
memory: the embedded model's vocabulary is 49,152 wide, about 200 KB a token in float32. Beside
them go each scored row's max, argmax and sum of exps, the reference's own figures that every
variant is scored against. Each variant then runs window by window, and each window's reference
logits are mapped from the file a few rows at a time as the scoring goes: only the chunk being
scored is mapped, so the file never counts in the process's resident set beyond one chunk.
"""

from __future__ import annotations

import json
import mmap
import os
import time
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..variant import Variant
from .metrics import RefStats, TokenScores, reference_stats, score_chunks, summarize
from .protocols import Protocol

Progress = Callable[[int], None]


def stats_path(path: Path) -> Path:
    """Where `reference_logits` keeps the reference's per-row statistics (`reference_stats`)
    beside `path`."""
    return path.with_name(path.name + ".stats.npz")


@dataclass(frozen=True)
class RefLogits:
    """Reference logits at the scored positions: (n_windows, scored, vocab) float32 in a file, and
    beside it (`stats_path`) each row's max, argmax and sum of exps, when `reference_logits` wrote
    them."""

    path: Path
    n_windows: int
    scored: int
    vocab: int

    def window(self, i: int) -> torch.Tensor:
        """Window i's logits (scored, vocab)."""
        return self.rows(i, 0, self.scored)

    def rows(self, i: int, a: int, b: int) -> torch.Tensor:
        """Rows a:b of window i, (b - a, vocab), mapped from the file (private, copy-on-write: the
        file never changes). The mapping lives as long as the tensor. Reading the page cache
        through a mapping spares the copy into a buffer: for a 511-row window, 1 ms to map its
        chunks against 14 ms to read them (Xeon, 2 cores)."""
        if not (0 <= i < self.n_windows and 0 <= a < b <= self.scored):
            raise IndexError(f"rows {a}:{b} of window {i}: the file holds {self.n_windows} windows of {self.scored} rows")
        offset, size = (i * self.scored + a) * self.vocab * 4, (b - a) * self.vocab * 4
        start = offset - offset % mmap.ALLOCATIONGRANULARITY  # a mapping starts on that boundary
        with open(self.path, "rb") as f:
            if os.fstat(f.fileno()).st_size < offset + size:  # reading a page past the end would be SIGBUS
                raise ValueError(f"{self.path} is truncated: window {i} is incomplete; delete it to rebuild")
            m = mmap.mmap(f.fileno(), offset - start + size, access=mmap.ACCESS_COPY, offset=start)
        flat = np.frombuffer(m, dtype=np.float32, count=(b - a) * self.vocab, offset=offset - start)
        return torch.from_numpy(flat).view(b - a, self.vocab)

    @cached_property
    def _stats(self) -> RefStats | None:
        p = stats_path(self.path)
        if not p.exists():
            return None
        want = (self.n_windows, self.scored)
        with np.load(p) as z:
            if set(z.files) != set(STATS):
                raise ValueError(f"{p} holds {sorted(z.files)}, not {list(STATS)}; delete it to rebuild")
            stats = tuple(torch.from_numpy(z[k]) for k in STATS)
        if any(x.shape != want for x in stats):
            raise ValueError(f"{p} holds {[tuple(x.shape) for x in stats]} rows, not {want}; delete it to rebuild")
        return stats  # type: ignore[return-value]

    def stats(self, i: int) -> RefStats | None:
        """Window i's per-row max, argmax and sum of exps, (scored,) each; None if not stored."""
        return None if self._stats is None else tuple(x[i] for x in self._stats)  # type: ignore[return-value]


STATS = ("max", "argmax", "expsum")  # the arrays of a stats file, in `RefStats` order


# Rows (batch x context) per reference forward. At one 512-token window the embedded model's
# matmuls have 511 rows, and this host's BLAS ran its forward at 0.70 of the 2048^2 matmul's rate;
# two windows at once (1,022 rows) ran at 0.78 (AMD EPYC, AVX2, 2 cores). Each window's logits are
# bit-identical either way (tests/test_variant.py).
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
    """Compute the reference's scored logits into `path`, and their rows' statistics beside it
    (`stats_path`), or reuse both if the sidecar JSON records the same `key` (model hash,
    windows, protocol, dtype, device) and the logits' size is whole.
    The reference runs `batch_size` windows at a time (default `reference_batch`), into one
    logits buffer reused from batch to batch."""
    n, context = windows.shape
    batch_size = batch_size or reference_batch(context)
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists() and stats_path(path).exists():
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
    stats: list[RefStats] = []  # per window: (scored,) each
    with open(tmp, "wb") as f:
        for s, e in _batches(n, batch_size):
            logits = ref.logits(fed[s:e], out=None if buf is None else buf[: e - s])
            buf = logits if buf is None else buf
            sel = protocol.select(logits).float()  # (b, scored, V)
            vocab = sel.shape[-1]
            f.write(sel.contiguous().cpu().numpy().tobytes())
            stats += [tuple(x.cpu() for x in reference_stats(w)) for w in sel]  # type: ignore[misc]
            if progress:
                progress(e - s)
    size = tmp.stat().st_size
    tmp_stats = stats_path(tmp)
    with open(tmp_stats, "wb") as f:
        np.savez(f, **{k: torch.stack([s[j] for s in stats]).numpy() for j, k in enumerate(STATS)})
    os.replace(tmp_stats, stats_path(path))
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
            parts.append(score_chunks(partial(ref.rows, i), sel[i - s], targets[i], ref.stats(i)))
        if progress:
            progress(e - s)
    scores = TokenScores.cat(parts)
    return QualityRun(summarize(scores), scores, time.perf_counter() - t0, forward)
