"""A run's expensive steps served from the on-disk cache (quantbench/cache.py).

Three kinds of entry, each keyed by everything that made it:

    reference  the reference's logits at the scored positions of the evaluation windows
               (model weights hash, dtype, device, windows hash, protocol, torch, code version)
    variant    a quantized torch variant, saved as its difference from the reference
               (model weights hash, dtype, device, method spec, calibration set, torch, and
               the code that makes and stores variants: an edit to the evaluation keeps them)
    row        a variant's measured quality and memory figures, generations included, without
               its latency (the variant key plus the windows, protocol and generation length)

Latency is never cached: it is what a benchmark run measures. A warm run therefore loads the
reference, reads every row and restores each variant only for its latency measurement. `row`
serves a caller that wants only the figures (benchmarks/test_calibrated_quality.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from . import cache
from .eval.metrics import scoring_path
from .eval.protocols import Protocol
from .eval.quality import RefLogits, reference_logits
from .methods import MethodSpec
from .persist import load_variant, save_variant, saveable
from .variant import Variant

if TYPE_CHECKING:  # run.py imports this module
    from .run import Session

LATENCY_KEYS = ("prefill_tokens_per_s", "prefill_batch_tokens_per_s", "decode_tokens_per_s")


def cached_reference_logits(
    ref: Variant, windows: torch.Tensor, protocol: Protocol, key: dict, progress: Callable | None = None
) -> RefLogits:
    key = {**key, "code": cache.code_version()}
    built = []

    def build(d: Path) -> dict:
        built.append(d)
        r = reference_logits(ref, windows, protocol, d / "logits.f32", key, progress=progress)
        return {"n_windows": r.n_windows, "scored": r.scored, "vocab": r.vocab}

    entry = cache.get_or_build("reference", key, build, label=f"reference logits, {windows.shape[0]} windows")
    if not built and progress:
        progress(windows.shape[0])
    i = entry.info
    return RefLogits(entry.file("logits.f32"), i["n_windows"], i["scored"], i["vocab"])


def variant_key(session: Session, spec: MethodSpec) -> dict:
    calib = session.calib.key() if (spec.method.needs_calibration and session.calib is not None) else None
    ref = session.ref_key
    return {
        "model": ref["model"],
        "dtype": ref["dtype"],
        "device": ref["device"],
        "torch": ref["torch"],
        "spec": str(spec),
        "calibration": calib,
        "code": cache.code_version(*cache.VARIANT_ROOTS),  # what makes and stores it, not what measures it
    }


def variant(session: Session, spec: MethodSpec) -> tuple[Variant, float, bool]:
    """(variant, quantize_seconds, came from the cache). A variant that cannot be saved
    (see persist.saveable) is built every time."""
    key = variant_key(session, spec)
    ref_model = session.ref.model
    entry = cache.lookup("variant", key)
    if entry is not None:
        v = load_variant(entry.path, entry.info, ref_model)
        return v, entry.info["quantize_seconds"], True
    v, seconds = session.build(spec)
    if saveable(v, ref_model):
        cache.get_or_build(
            "variant", key, lambda d: {**save_variant(v, ref_model, d), "quantize_seconds": seconds},  # type: ignore[arg-type]
            label=f"{str(spec)} of {session.ref.info.source}",
        )
    return v, seconds, False


def row_key(session: Session, spec: MethodSpec) -> dict:
    cfg = session.cfg
    return {
        **variant_key(session, spec),
        "code": cache.code_version(),  # every module that makes figures
        "windows": session.ref_key["windows"],
        "protocol": session.ref_key["protocol"],
        "generate": cfg.generate_tokens if cfg.generate else 0,
        "scoring": scoring_path(session.ref.device),
    }


def measure(session: Session, spec: MethodSpec, get_variant: Callable[[], tuple[Variant, float]]) -> tuple[dict, bool]:
    """(the row of `spec`, came from the cache). On a miss the variant is measured with
    `session.measure` and the row is stored without its latency figures."""
    key = row_key(session, spec)
    row = cache.get_json("row", key)
    if row is not None:
        return row, True  # type: ignore[return-value]
    t = time.perf_counter()
    row = session.measure(str(spec), variant=get_variant())
    stored = {k: (None if k in LATENCY_KEYS else v) for k, v in row.items()}
    stored["measure_seconds"] = time.perf_counter() - t
    cache.put_json("row", key, stored, label=f"{str(spec)} of {session.ref.info.source}")
    return {**stored, **{k: row[k] for k in LATENCY_KEYS}}, False


def row(session: Session, spec: MethodSpec) -> tuple[dict, bool]:
    """(the row of `spec`, came from the cache), for a caller that holds no variant: on a miss
    the variant comes from the variant cache (or is built and stored there), is measured, and
    is closed. A row read from the cache is added to the session's results, as a measured one is."""
    built: list[Variant] = []

    def get_variant() -> tuple[Variant, float]:
        v, seconds, _ = variant(session, spec)
        built.append(v)
        return v, seconds

    try:
        got, hit = measure(session, spec, get_variant)
    finally:
        for v in built:
            v.close()
    if hit:
        session.doc["results"].append(got)
    return got, hit
