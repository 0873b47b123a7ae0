"""Tables and plots from a results document. Nothing here recomputes a figure."""

from __future__ import annotations

import math
from pathlib import Path

from tabulate import tabulate

# (header, row key, format)
COLUMNS = (
    ("method", "spec", "s"),
    ("bpw", "bits_per_weight", ".2f"),
    ("weights MB", "weight_bytes", "mb"),
    ("PPL", "ppl", "ppl"),
    ("ln(PPL/ref)", "ln_ppl_ratio", ".4f"),
    ("KLD mean", "kld_mean", ".5f"),
    ("KLD p99", "kld_p99", ".4f"),
    ("top-1 agree", "top1_agreement", ".2%"),
    ("next-tok acc", "next_token_accuracy", ".2%"),
    ("prefill tok/s", "prefill_tokens_per_s", ".0f"),
    ("decode tok/s", "decode_tokens_per_s", ".1f"),
    ("peak RSS MB", "peak_rss_bytes", "mb"),
    ("quant s", "quantize_seconds", ".1f"),
)


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if fmt == "s":
        return str(v)
    if fmt == "mb":
        return f"{v / 1e6:.1f}"
    if fmt == "ppl":
        return f"{v:.3f} ± {row.get('ppl_stderr', float('nan')):.3f}"
    return format(v, fmt)


def table(doc: dict, fmt: str = "simple") -> str:
    """The comparison table; `fmt` is a tabulate format ("github" for markdown)."""
    rows = [[_cell(r, key, f) for _, key, f in COLUMNS] for r in doc["results"]]
    return tabulate(rows, headers=[h for h, _, _ in COLUMNS], tablefmt=fmt, disable_numparse=True)


def header(doc: dict) -> str:
    m, t, p = doc["model"], doc["text"], doc["protocol"]
    n_tokens = len(doc["split"]["eval_starts"]) * p["scored_per_window"]
    lines = [
        f"model {m['source']} ({m['architecture']}, sha256 {m['weights_sha256'][:12]}) as {doc['dtype']} on {doc['device']}",
        f"text {t['name']}: {n_tokens} scored tokens in {len(doc['split']['eval_starts'])} windows of {p['context']}, "
        f"protocol {p['name']}, BOS {p['bos']}, seed {doc['split']['seed']}",
    ]
    lines += [f"note: {n}" for n in doc.get("notes", [])]
    lines += [f"skipped {s['spec']}: {s['reason']}" for s in doc.get("skipped", [])]
    return "\n".join(lines)


def generations_table(doc: dict, fmt: str = "simple", width: int = 60) -> str:
    rows = []
    for r in doc["results"]:
        for g in r.get("generations", []):
            text = g["text"].replace("\n", "⏎")
            rows.append([r["spec"], g["prompt"][:32], text[:width]])
    return tabulate(rows, headers=["method", "prompt", "continuation"], tablefmt=fmt, disable_numparse=True)


def render(doc: dict, markdown: bool = False) -> str:
    fmt = "github" if markdown else "simple"
    return "\n\n".join([header(doc), table(doc, fmt)])


def generations_markdown(doc: dict) -> str:
    """The generated texts side by side: one table per prompt, one row per variant."""
    parts = []
    rows = [r for r in doc["results"] if r.get("generations")]
    for i, g0 in enumerate(rows[0]["generations"] if rows else []):
        parts.append(f"### {g0['kind']}: {g0['prompt'].strip()!r}\n")
        table = [[r["spec"], r["generations"][i]["text"].replace("\n", " ⏎ ").replace("|", "\\|").strip()] for r in rows]
        parts.append(tabulate(table, headers=["method", "continuation"], tablefmt="github", disable_numparse=True))
        parts.append("")
    return "\n".join(parts)


def plots(doc: dict, out_dir: str | Path) -> list[Path]:
    """Every plot (quantbench/plots.py) and the generations side by side (generations.md)."""
    from .plots import write_plots

    paths = write_plots(doc, out_dir)
    if any(r.get("generations") for r in doc["results"]):
        md = Path(out_dir) / "generations.md"
        md.write_text(generations_markdown(doc))
        paths.append(md)
    return paths
