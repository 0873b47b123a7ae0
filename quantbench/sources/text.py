"""Where text comes from, and how its tokens are split between evaluation and calibration.

Sources: the embedded default `pydoc` (the English prose of CPython's `pydoc_data.topics`, which
every CPython ships), any local text file, and `wikitext2` through `datasets` when the user has
it cached.

Split: the token stream is cut into consecutive blocks of C tokens (the evaluation context).
A seeded permutation picks the evaluation blocks; calibration sequences are drawn, with the same
seed, only from stretches of the stream that no evaluation block touches. The two never overlap,
and the chosen offsets are recorded in the results.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .models import SourceError

EMBEDDED_TEXT = "pydoc"
DATASETS = ("wikitext2",)


@dataclass(frozen=True)
class TextSource:
    name: str  # "pydoc", a file path, or "wikitext2"
    text: str = field(repr=False)
    sha256: str

    def to_dict(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "chars": len(self.text)}


def _source(name: str, text: str) -> TextSource:
    return TextSource(name=name, text=text, sha256=hashlib.sha256(text.encode()).hexdigest())


def load_text(text_file: str | None = None, dataset: str | None = None) -> TextSource:
    """The embedded prose, a UTF-8 text file, or a dataset by name (not both)."""
    if text_file and dataset:
        raise SourceError("pass either a text file or a dataset, not both")
    if text_file:
        p = Path(text_file).expanduser()
        if not p.is_file():
            raise SourceError(f"text file {text_file!r} does not exist")
        try:
            return _source(str(p), p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise SourceError(f"text file {text_file!r} is not UTF-8 text ({e})") from e
    if dataset:
        if dataset != "wikitext2":
            raise SourceError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
        return _wikitext2()
    from pydoc_data import topics

    # Sorted keys: the same text on every CPython of a given version, whatever dict order.
    return _source(EMBEDDED_TEXT, "\n\n".join(topics.topics[k] for k in sorted(topics.topics)))


def _wikitext2() -> TextSource:
    try:
        import datasets
    except ImportError:
        raise SourceError(
            "the wikitext2 dataset needs the `datasets` package (pip install quantbench[datasets]); "
            "otherwise use the embedded text (the default) or --text-file PATH"
        ) from None
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as e:  # datasets raises many types when offline
        raise SourceError(
            f"wikitext-2 is not in the local datasets cache and cannot be downloaded here ({type(e).__name__}); "
            "use the embedded text (the default) or --text-file PATH"
        ) from e
    # "\n\n".join over the test split, as the GPTQ paper and lm-evaluation-harness do.
    return _source("wikitext2", "\n\n".join(ds["text"]))


def tokenize(tokenizer, text: TextSource) -> torch.Tensor:
    """The whole text as one stream of token ids, without special tokens."""
    ids = tokenizer(text.text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class Split:
    """Disjoint evaluation windows and calibration sequences, as offsets into the token stream."""

    context: int
    eval_starts: tuple[int, ...]
    calib_len: int
    calib_starts: tuple[int, ...]
    seed: int
    n_stream: int

    def to_dict(self) -> dict:
        return asdict(self)


def split_tokens(n_stream: int, context: int, n_eval: int, n_calib: int, calib_len: int, seed: int) -> Split:
    """Choose `n_eval` windows of `context` tokens and `n_calib` sequences of `calib_len` tokens
    that never overlap, deterministically from `seed`."""
    if context < 2:
        raise SourceError(f"context {context} is too short; at least 2 tokens are needed to score one")
    n_blocks = n_stream // context
    if n_eval > n_blocks:
        raise SourceError(
            f"the text has {n_stream} tokens: room for {n_blocks} windows of {context}, but {n_eval} were asked "
            f"({n_eval * context} tokens); lower --tokens or --context, or use a longer text"
        )
    g = torch.Generator().manual_seed(seed)
    eval_blocks = sorted(torch.randperm(n_blocks, generator=g)[:n_eval].tolist())
    eval_starts = tuple(b * context for b in eval_blocks)
    calib_starts: list[int] = []
    if n_calib:
        # Free stretches between evaluation windows; sequences are laid end to end inside them.
        taken = set(eval_blocks)
        free: list[tuple[int, int]] = []
        start = 0
        for b in list(range(n_blocks)) + [None]:
            if b is None or b in taken:
                end = n_stream if b is None else b * context
                if end - start >= calib_len:
                    free.append((start, end))
                if b is not None:
                    start = (b + 1) * context
        slots = [s for lo, hi in free for s in range(lo, hi - calib_len + 1, calib_len)]
        if len(slots) < n_calib:
            raise SourceError(
                f"not enough text outside the {n_eval} evaluation windows for {n_calib} calibration sequences of "
                f"{calib_len} tokens (room for {len(slots)}): the calibration and evaluation requests would overlap; "
                f"ask for fewer tokens of either, or use a longer text"
            )
        pick = torch.randperm(len(slots), generator=g)[:n_calib].tolist()
        calib_starts = sorted(slots[i] for i in pick)
    return Split(context, eval_starts, calib_len, tuple(calib_starts), seed, n_stream)


@dataclass(frozen=True)
class Calibration:
    """N sequences of L token ids for calibrated methods, never seen by the evaluation."""

    input_ids: torch.Tensor  # (N, L) int64
    seed: int
    starts: tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()

    def key(self) -> str:
        """What identifies this calibration set in cache keys."""
        h = hashlib.sha256(self.input_ids.numpy().tobytes()).hexdigest()[:16]
        return f"{tuple(self.input_ids.shape)}:{self.seed}:{h}"


def windows(stream: torch.Tensor, split: Split) -> torch.Tensor:
    """(n_eval, C) evaluation windows."""
    return torch.stack([stream[s : s + split.context] for s in split.eval_starts])


def calibration(stream: torch.Tensor, split: Split) -> Calibration:
    ids = torch.stack([stream[s : s + split.calib_len] for s in split.calib_starts])
    return Calibration(input_ids=ids, seed=split.seed, starts=split.calib_starts)

