"""The results file: one JSON document per run, versioned.

    {
      "schema": "quantbench.results", "schema_version": 1,
      "created": ISO time, "versions": {"quantbench", "torch", "transformers", "python"},
      "device": "cpu", "dtype": "fp32",
      "model": {source, kind, path, weights_sha256, architecture, n_ctx, vocab_size, gguf_file},
      "text": {name, sha256, chars, n_tokens},
      "split": {context, eval_starts, calib_len, calib_starts, seed, n_stream},
      "protocol": {name, context, bos_token_id, bos, scored_per_window},
      "notes": [...],
      "results": [ one row per variant, ROW_KEYS at least ]
    }

Every number in a row was measured in the run that wrote it.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA = "quantbench.results"
SCHEMA_VERSION = 1

ROW_KEYS = (
    "method",  # method name, e.g. "absmax"
    "spec",  # canonical spec string, e.g. "absmax:granularity=channel"
    "params",  # the method's parameters, all of them, defaults included
    "ppl",
    "ppl_stderr",
    "ln_ppl_ratio",
    "ln_ppl_ratio_stderr",
    "kld_mean",
    "kld_stderr",
    "kld_median",
    "kld_p90",
    "kld_p99",
    "kld_max",
    "top1_agreement",
    "dp_mean",
    "dp_rms",
    "logits_mse",
    "next_token_accuracy",
    "weight_bytes",
    "bits_per_weight",
    "compression_vs_fp16",
    "compression_vs_fp32",
    "artifact_bytes",
    "peak_rss_bytes",
    "variant_rss_bytes",
    "prefill_tokens_per_s",
    "prefill_batch_tokens_per_s",
    "decode_tokens_per_s",
    "quantize_seconds",
    "eval_seconds",
    "forward_seconds",
    "generations",
    "layer_specs",
)


class ResultsError(ValueError):
    pass


def versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {
        "quantbench": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def new_results(**top: Any) -> dict:
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        **top,
        "results": [],
    }


def validate(doc: dict, source: str = "results") -> dict:
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ResultsError(f"{source} is not a quantbench results file (no \"schema\": \"{SCHEMA}\")")
    v = doc.get("schema_version")
    if v != SCHEMA_VERSION:
        raise ResultsError(f"{source} has schema_version {v}; this quantbench reads version {SCHEMA_VERSION}")
    for i, row in enumerate(doc.get("results", [])):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ResultsError(f"{source}: result {i} lacks {', '.join(missing)}")
    return doc


def save(doc: dict, path: str | Path) -> Path:
    """Write atomically: a reader never sees half a file, and a failed write leaves the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(validate(doc), indent=1, allow_nan=True))
    os.replace(tmp, path)
    return path


def load(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ResultsError(f"results file {str(path)!r} does not exist")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path} is not valid JSON: {e}") from e
    return validate(doc, str(path))
