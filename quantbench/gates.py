"""Pass/fail gates for benchmark runs: quality per method family, memory against the formats'
theoretical size, and regression against a saved run. Pure functions over result rows; the
pytest plugin turns their messages into failures.

Each message names the figure, the measured value, the threshold and the reference figure, e.g.

    int-b4-g64-asym (4-bit grouped): mean KL divergence 0.3101 > threshold 0.2500
    (reference: 0 by definition; PPL 13.286 vs reference PPL 10.511)
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .formats import parse_format_spec
from .layers import QLinear, TiedQLinear, get_weight
from .methods import MethodSpec
from .spec import SpecError


@dataclass(frozen=True)
class Thresholds:
    ppl_ratio: float  # most PPL / PPL_ref allowed
    kld_mean: float  # most mean KL divergence from the reference allowed (nats)
    top1: float  # least top-1 agreement with the reference allowed
    bytes_slack: float = 0.02  # weights may differ from the formats' theoretical size by this fraction
    peak_rss_mb: float | None = None  # most peak resident memory; None: the rule in `rss_limit`


# Defaults per method family, measured on the embedded SmolLM2-135M (fp32 reference, embedded
# pydoc text, seed 0) on 2026-11-24 with the benchmark budget (2 windows of 512) and the smoke
# budget (2 windows of 256). Each threshold is the family's worst measured variant with a margin:
# x1.5 on mean KL, x1.5 on ln(PPL ratio), x1.5 on the top-1 disagreement; rounded up.
#   family             worst measured: KLD mean / PPL ratio / top-1 (variant)
#   16-bit             0.0014 / 1.0011 / 0.9765  (bf16)
#   8-bit              0.0032 / 1.0067 / 0.9647  (absmax and zeropoint per channel, gguf Q8_0)
#   8-bit per-tensor   0.0666 / 1.0626 / 0.8471  (absmax per tensor)
#   8-bit activations  0.0185 / 1.0176 / 0.9295  (llm-int8 and bnb-int8: int8 activations as well as weights)
#   6-bit              0.0202 / 1.0143 / 0.9353  (int6 g64 asym)
#   5-bit              0.0888 / 1.1667 / 0.8392  (gguf Q5_0; int5 g64 asym 0.078 / 1.104 / 0.869)
#   4-bit grouped      0.3101 / 1.3434 / 0.7255  (int4 g64 asym; nf4, Q4_0, GPTQ g64 below; Q4_1: 0, the model's own grid)
#   4-bit per-channel  0.7264 / 1.9177 / 0.5765  (int4 per channel asym)
#   3-bit grouped      1.3119 / 3.2352 / 0.4608  (int3 g64 asym)
#   3-bit per-channel  2.9393 / 19.283 / 0.2627  (int3 per channel asym)
#   2-bit              9.4234 / 14263  / 0.0059  (int2 g64 asym: the gate only checks that it runs)
DEFAULTS: dict[str, Thresholds] = {
    "reference": Thresholds(ppl_ratio=1.000001, kld_mean=1e-6, top1=0.9999),  # the same model: exact
    "16-bit": Thresholds(ppl_ratio=1.005, kld_mean=0.0025, top1=0.96),
    "8-bit": Thresholds(ppl_ratio=1.011, kld_mean=0.005, top1=0.94),
    "8-bit per-tensor": Thresholds(ppl_ratio=1.10, kld_mean=0.10, top1=0.77),
    "8-bit activations": Thresholds(ppl_ratio=1.03, kld_mean=0.028, top1=0.89),
    "6-bit": Thresholds(ppl_ratio=1.022, kld_mean=0.031, top1=0.90),
    "5-bit": Thresholds(ppl_ratio=1.26, kld_mean=0.14, top1=0.75),
    "4-bit grouped": Thresholds(ppl_ratio=1.56, kld_mean=0.47, top1=0.58),
    "4-bit per-channel": Thresholds(ppl_ratio=2.7, kld_mean=1.1, top1=0.36),
    "3-bit grouped": Thresholds(ppl_ratio=5.9, kld_mean=2.0, top1=0.19),
    "3-bit per-channel": Thresholds(ppl_ratio=85.0, kld_mean=4.5, top1=0.0),
    "2-bit": Thresholds(ppl_ratio=2e6, kld_mean=15.0, top1=0.0),
}
LOOSEST = "2-bit"
ACTIVATION_INT8 = ("llm-int8", "bnb-int8")  # LLM.int8(): the inputs are rounded to int8 too

FIGURES = {  # threshold field -> (figure's name, row key, bound)
    "ppl_ratio": ("perplexity ratio PPL/PPL_ref", "ppl_ratio", "max"),
    "kld_mean": ("mean KL divergence", "kld_mean", "max"),
    "top1": ("top-1 agreement", "top1_agreement", "min"),
}


def nominal_bits(spec: MethodSpec) -> int | None:
    """The bits a method stores its quantized weights in, read from its config: `bits`, a GGUF
    type name (Q4_K -> 4), or the method's own name (nf4, bf16...)."""
    cfg = spec.config
    if isinstance(getattr(cfg, "bits", None), int):
        return cfg.bits
    gtype = getattr(cfg, "type", None)
    if isinstance(gtype, str):
        m = re.match(r"^(?:I|T)?Q(\d)", gtype)
        if m:
            return int(m.group(1))
        if gtype.upper() in ("F16", "BF16"):
            return 16
    return {"fp32": 32, "bf16": 16, "fp16": 16, "nf4": 4, "fp4": 4, "llm-int8": 8}.get(spec.name)


def family(spec: MethodSpec, ref_dtype: str = "fp32") -> str:
    if spec.name == ref_dtype:
        return "reference"
    bits = nominal_bits(spec)
    if bits is None:
        return "unknown"
    if bits >= 16:
        return "16-bit"
    cfg = spec.config
    per_tensor = getattr(cfg, "group", None) == -1 or getattr(cfg, "granularity", None) == "tensor"
    if spec.name in ACTIVATION_INT8:
        return "8-bit activations"
    if bits >= 7:
        return "8-bit per-tensor" if per_tensor else "8-bit"
    if bits >= 5:
        return f"{bits}-bit"
    if bits <= 2:
        return "2-bit"
    group = getattr(cfg, "group", None)
    grouped = (isinstance(group, int) and group > 0) or not isinstance(group, int)  # block formats have no `group`
    return f"{bits}-bit {'grouped' if grouped else 'per-channel'}"


def thresholds_for(spec: MethodSpec, overrides: dict[str, dict], ref_dtype: str = "fp32") -> tuple[str, Thresholds]:
    """The family's defaults, then the config's values for the family, then for this very spec."""
    fam = family(spec, ref_dtype)
    th = DEFAULTS.get(fam, DEFAULTS[LOOSEST])
    for name in (fam, str(spec)):
        if name in overrides:
            th = dataclasses.replace(th, **overrides[name])
    return fam, th


def quality_failures(row: dict, th: Thresholds, label: str) -> list[str]:
    ref_ppl = row["ref_ppl"]
    figures = {**row, "ppl_ratio": row["ppl"] / ref_ppl}
    ref_note = {
        "ppl_ratio": f"PPL {row['ppl']:.3f} vs reference PPL {ref_ppl:.3f}",
        "kld_mean": f"reference: 0 by definition; PPL {row['ppl']:.3f} vs reference PPL {ref_ppl:.3f}",
        "top1": f"reference: 100% by definition; PPL {row['ppl']:.3f} vs reference PPL {ref_ppl:.3f}",
    }
    out = []
    for field, (name, key, bound) in FIGURES.items():
        value, limit = figures[key], getattr(th, field)
        bad = value > limit if bound == "max" else value < limit
        if bad or math.isnan(value):
            op = ">" if bound == "max" else "<"
            out.append(f"{label}: {name} {value:.4g} {op} threshold {limit:.4g} ({ref_note[field]})")
    return out


def theoretical_bytes(variant: object, ref_model: nn.Module) -> tuple[int, list[tuple[str, float, float]]] | None:
    """(bytes the variant's weights should take, per quantized layer (name, stored bpw, format
    bpw)), from each layer's FormatConfig.bits_per_weight and the other tensors' own sizes.
    None when a layer's format is not a quantbench format or the variant keeps no torch model."""
    model = getattr(variant, "model", None)
    specs: dict[str, str] = dict(getattr(variant, "layer_specs", {}))
    if not isinstance(model, nn.Module):
        return None
    layers, total = [], 0.0
    for name, spec in specs.items():
        try:
            cfg = parse_format_spec(spec)
        except SpecError:
            return None
        if isinstance(model.get_submodule(name), TiedQLinear):
            continue  # a tied output head stores nothing: its bytes are the embedding's, counted once
        out_f, in_f = get_weight(ref_model.get_submodule(name)).shape
        bpw = cfg.bits_per_weight((out_f, in_f))
        total += bpw * out_f * in_f / 8
        m = model.get_submodule(name)
        if isinstance(m, QLinear):
            layers.append((name, m.qtensor.bits_per_weight, bpw))
    seen: set[tuple[int, int]] = set()
    for pname, t in list(model.named_parameters()) + list(model.named_buffers()):
        owner, _, leaf = pname.rpartition(".")
        if owner in specs and leaf != "bias":
            continue  # the quantized weight itself: counted above
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ident not in seen:
            seen.add(ident)
            total += t.numel() * t.element_size()
    return round(total), layers


def memory_failures(row: dict, theory: tuple[int, list] | None, th: Thresholds, label: str) -> list[str]:
    out = []
    if theory is not None:
        expected, layers = theory
        got = row["weight_bytes"]
        rel = got / expected - 1
        if abs(rel) > th.bytes_slack:
            out.append(
                f"{label}: weight bytes {got / 1e6:.3f} MB differ from the formats' theoretical "
                f"{expected / 1e6:.3f} MB by {rel:+.2%} (slack {th.bytes_slack:.0%}); bits per weight "
                f"{row['bits_per_weight']:.4f} vs theoretical {8 * expected / row['n_weights']:.4f}"
            )
        for name, stored, bpw in layers:
            if abs(stored / bpw - 1) > th.bytes_slack:
                out.append(f"{label}: layer {name} stores {stored:.4f} bits per weight, its format {bpw:.4f}")
    limit = th.peak_rss_mb * 1e6 if th.peak_rss_mb is not None else rss_limit(row)
    if row["peak_rss_bytes"] > limit:
        out.append(
            f"{label}: peak RSS {row['peak_rss_bytes'] / 1e6:.0f} MB > threshold {limit / 1e6:.0f} MB "
            f"(variant weights {row['weight_bytes'] / 1e6:.0f} MB, fp32 reference {4 * row['n_weights'] / 1e6:.0f} MB)"
        )
    return out


def rss_limit(row: dict, context: int = 512, vocab: int = 49152) -> float:
    """Default peak-RSS rule: the fp32 reference and a variant copy of it kept at once (x3 for
    a transient copy while quantizing), 16 logits-sized buffers for the evaluation working set,
    and 1 GB for the interpreter and libraries. It catches leaks and logits held in memory."""
    return 3 * 4 * row["n_weights"] + 16 * 4 * context * vocab + 1e9


@dataclass(frozen=True)
class Tolerance:
    ppl_rel: float = 0.01  # PPL may rise by 1%...
    kld_rel: float = 0.10  # ...and mean KL by 10%,
    kld_abs: float = 1e-4  # plus this much, for variants whose KL is near 0


def load_baseline(path: str | Path) -> dict[tuple[str, str], dict]:
    """(model weights sha256, spec) -> {"ppl", "kld_mean", "windows_sha256"} from a quantbench
    results JSON or a pytest-benchmark JSON whose benchmarks carry quantbench's extra_info."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"--qb-compare: {path} does not exist")
    doc = json.loads(p.read_text())
    out: dict[tuple[str, str], dict] = {}
    if doc.get("schema") == "quantbench.results":
        for r in doc["results"]:
            out[(doc["model"]["weights_sha256"], r["spec"])] = {**r, "windows_sha256": doc.get("windows_sha256")}
    elif "benchmarks" in doc:
        for b in doc["benchmarks"]:
            info = b.get("extra_info", {})
            if "spec" in info and "model_sha256" in info:
                out.setdefault((info["model_sha256"], info["spec"]), info)
    else:
        raise SpecError(f"--qb-compare: {path} is neither a quantbench results file nor a pytest-benchmark JSON")
    return out


def regression_failures(row: dict, base: dict, tol: Tolerance, label: str) -> list[str]:
    out = []
    if row["ppl"] > base["ppl"] * (1 + tol.ppl_rel):
        out.append(f"{label}: PPL {row['ppl']:.4f} regressed from the baseline's {base['ppl']:.4f} "
                   f"({row['ppl'] / base['ppl'] - 1:+.2%}, tolerance +{tol.ppl_rel:.1%})")
    limit = base["kld_mean"] * (1 + tol.kld_rel) + tol.kld_abs
    if row["kld_mean"] > limit:
        out.append(f"{label}: mean KL divergence {row['kld_mean']:.5f} regressed from the baseline's "
                   f"{base['kld_mean']:.5f} (threshold {limit:.5f}: +{tol.kld_rel:.0%} + {tol.kld_abs:g})")
    return out
