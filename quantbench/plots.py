"""Plots of a results document (matplotlib, Agg): nothing here recomputes a figure.

    ppl_vs_bpw.png, kld_vs_bpw.png   quality against bits per weight, the Pareto front marked
    weight_memory.png                 bytes of the weights per variant
    speed.png                         prefill and decode tokens/s per variant
    weight_histograms.png             one layer's weights before and after, one panel per variant

Variants sit on the y axis of the bar charts, so long spec strings stay readable.
"""

from __future__ import annotations

import math
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)
    return path


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (smaller is better on both), by x."""
    front, best = [], math.inf
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def quality_vs_bpw(doc: dict, out: Path) -> list[Path]:
    plt = _plt()
    rows = [r for r in doc["results"] if r.get("bits_per_weight")]
    paths = []
    for key, label, fname in (
        ("ppl", "perplexity", "ppl_vs_bpw.png"),
        ("kld_mean", "mean KL divergence from the reference (nats)", "kld_vs_bpw.png"),
    ):
        fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
        pts = sorted((r["bits_per_weight"], r[key], r["spec"]) for r in rows if r.get(key) is not None)
        front = pareto([(x, y) for x, y, _ in pts])
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", zorder=3)
        for x, y, s in pts:
            ax.annotate(s, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if len(front) > 1:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:orange", label="Pareto front")
            ax.legend()
        if key == "kld_mean" and any(p[1] > 0 for p in pts):
            ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_xlabel("bits per weight (all parameters, embeddings included)")
        ax.set_ylabel(label)
        ax.set_title(f"{doc['model']['source']}: {label} vs size")
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out / fname))
    return paths


def _barh(ax, labels: list[str], values: list[float], color: str, fmt: str, invert: bool = True) -> None:
    y = list(range(len(labels)))
    ax.barh(y, values, color=color)
    ax.set_yticks(y, labels, fontsize=8)
    if invert:  # the matrix's order, top to bottom (once: axes that share y share the inversion)
        ax.invert_yaxis()
    top = max(values) if values else 1
    for yi, v in zip(y, values):
        ax.text(v + 0.01 * top, yi, format(v, fmt), va="center", fontsize=7)
    ax.set_xlim(0, 1.15 * top)
    ax.grid(axis="x", alpha=0.3)


def weight_memory(doc: dict, out: Path) -> Path:
    plt = _plt()
    rows = [r for r in doc["results"] if r.get("weight_bytes")]
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.32 * len(rows)), dpi=110)
    _barh(ax, [r["spec"] for r in rows], [r["weight_bytes"] / 1e6 for r in rows], "tab:blue", ".3g")
    ax.set_xlabel("weights as stored (MB)")
    ax.set_title(f"{doc['model']['source']}: weight memory per variant")
    return _save(fig, out / "weight_memory.png")


def speed(doc: dict, out: Path) -> Path | None:
    plt = _plt()
    rows = [r for r in doc["results"] if r.get("prefill_tokens_per_s") or r.get("decode_tokens_per_s")]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.9 + 0.32 * len(rows)), dpi=110, sharey=True)
    for i, (ax, key, title, color) in enumerate((
        (axes[0], "prefill_tokens_per_s", f"prefill, one window of {doc['protocol']['context']}", "tab:green"),
        (axes[1], "decode_tokens_per_s", "greedy decode", "tab:purple"),
    )):
        values = [r.get(key) or 0.0 for r in rows]
        _barh(ax, [r["spec"] for r in rows], values, color, ".0f" if i == 0 else ".1f", invert=i == 0)
        ax.set_xlabel("tokens / s")
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"{doc['model']['source']} on {doc['device']}: speed per variant")
    return _save(fig, out / "speed.png")


def weight_histograms(doc: dict, out: Path) -> Path | None:
    plt = _plt()
    rows = [r for r in doc["results"] if r.get("weight_histogram")]
    if not rows:
        return None
    cols = min(3, len(rows))
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), dpi=110, squeeze=False)
    for ax, r in zip(axes.flat, rows):
        h = r["weight_histogram"]
        width = (h["hi"] - h["lo"]) / h["bins"]
        edges = [h["lo"] + i * width for i in range(h["bins"])]
        ax.bar(edges, h["before"], width=width, align="edge", color="0.7", label="reference")
        ax.step(edges + [h["hi"]], h["after"] + [h["after"][-1]], where="post", color="tab:red", lw=0.9, label="quantized")
        ax.set_yscale("log")
        ax.set_title(r["spec"], fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{rows[0]['weight_histogram']['layer']}: weights before and after (counts, log scale)", fontsize=10)
    return _save(fig, out / "weight_histograms.png")


def write_plots(doc: dict, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = quality_vs_bpw(doc, out) + [weight_memory(doc, out), speed(doc, out), weight_histograms(doc, out)]
    return [p for p in paths if p is not None]
