"""Sources: where models and text come from, and the evaluation/calibration split."""

from .models import EMBEDDED_MODEL, ModelInfo, Reference, SourceError, load_reference
from .text import EMBEDDED_TEXT, Calibration, Split, TextSource, load_text, split_tokens, tokenize

__all__ = [
    "EMBEDDED_MODEL",
    "EMBEDDED_TEXT",
    "Calibration",
    "ModelInfo",
    "Reference",
    "SourceError",
    "Split",
    "TextSource",
    "load_reference",
    "load_text",
    "split_tokens",
    "tokenize",
]
