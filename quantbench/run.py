"""One benchmark run: source -> reference -> method -> variant -> metrics -> results.

`Session` holds what every variant of a run shares (the reference, the token windows, the
calibration set and the reference logits on disk); `Session.measure(spec)` builds one variant
and measures it. The CLI and the pytest plugin both drive this, so their numbers agree.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import transformers

from . import results as R
from .cached import cached_reference_logits
from .eval.generate import generations
from .eval.memory import PeakRSS, rss_bytes
from .eval.metrics import scoring_path, warm_up
from .eval.protocols import Protocol
from .eval.quality import RefLogits, evaluate_quality
from .eval.speed import measure_speed
from .eval.weights import weight_histogram
from .methods import MethodSpec, missing_requirements, parse_method
from .sources import EMBEDDED_MODEL, Calibration, Reference, load_reference, load_text, split_tokens, tokenize
from .sources.models import SourceError
from .sources.text import calibration, windows
from .variant import TorchVariant, Variant

# The benchmark matrix (benchmarks/, `quantbench run --methods all`): every family once or twice.
DEFAULT_METHODS = (
    "fp32",
    "bf16",
    "absmax:bits=8,granularity=tensor",
    "absmax:bits=8,granularity=channel",
    "zeropoint:bits=8,granularity=channel",
    "int:bits=4,group=64,sym=false",
    "int:bits=3,group=64,sym=false",
    "nf4:block=64,double_quant=true",
    "llm-int8",
    "gguf:Q8_0",
    "gguf:Q4_0",
    "gguf-mix:Q4_K_M",
    "gptq:bits=4,group=64",
    "awq:bits=4,group=64",
)

# What `quantbench run` measures with no --methods: one of each kind of method, chosen to keep
# the job short on 2 CPU cores. Measured on the 2-core development machine (fp32 matmul about
# 65 GFLOP/s) from an empty cache: 5 min 34 s, GPTQ's calibration and quantization a minute of it.
# Packed formats decode slower than fp32 (each step dequantizes every weight; NF4's lookup is the
# slowest) and bf16 runs without native support on most CPUs, so the quick set leaves those to
# `--methods all`, which runs the benchmark matrix.
QUICK_METHODS = (
    "fp32",
    "absmax:bits=8,granularity=channel",
    "int:bits=4,group=64,sym=false",
    "gguf:Q4_0",
    "gptq:bits=4,group=64",
)


@dataclass(frozen=True)
class RunConfig:
    model: str = EMBEDDED_MODEL
    text_file: str | None = None
    dataset: str | None = None
    tokens: int = 2048  # evaluation tokens: tokens // context windows
    context: int = 512
    protocol: str = "disjoint"
    bos: bool | None = None  # None: as the tokenizer says
    device: str = "cpu"
    dtype: str = "fp32"
    seed: int = 0
    batch_size: int = 2  # for the batched prefill speed
    calib_samples: int = 32
    calib_len: int = 256
    generate_tokens: int = 16
    decode_tokens: int = 16
    measure_speed: bool = True
    generate: bool = True


def default_methods(which: tuple[str, ...] = QUICK_METHODS) -> list[str]:
    """The specs of `which` that are registered and whose libraries are installed here."""
    from .methods import methods

    known = methods()
    out = []
    for spec in which:
        name = spec.partition(":")[0]
        if name in known and not missing_requirements(known[name]):
            out.append(spec)
    return out


@dataclass
class Session:
    cfg: RunConfig
    progress: Callable[[str, int], Callable[[int], None] | None] = lambda desc, total: None
    reference_logits: bool = True  # False: only sources and calibration (for `quantbench quantize`)
    ref: Reference = field(init=False)
    windows: torch.Tensor = field(init=False)  # (n, C)
    calib: Calibration | None = field(init=False)
    protocol: Protocol = field(init=False)
    ref_logits: RefLogits | None = field(init=False, default=None)
    ref_key: dict | None = field(init=False, default=None)
    doc: dict = field(init=False)

    def __post_init__(self) -> None:
        cfg = self.cfg
        text = load_text(cfg.text_file, cfg.dataset)
        self.ref = load_reference(cfg.model, cfg.dtype, cfg.device)
        if cfg.context > self.ref.info.n_ctx:
            raise SourceError(
                f"context {cfg.context} is longer than the model allows ({self.ref.info.n_ctx} tokens); lower --context"
            )
        stream = tokenize(self.ref.tokenizer, text)
        n_eval = cfg.tokens // cfg.context
        if n_eval < 1:
            raise SourceError(f"--tokens {cfg.tokens} is less than one window of --context {cfg.context}")
        split = split_tokens(len(stream), cfg.context, n_eval, cfg.calib_samples, cfg.calib_len, cfg.seed)
        self.windows = windows(stream, split)
        self.calib = calibration(stream, split) if cfg.calib_samples else None
        add_bos = cfg.bos if cfg.bos is not None else bool(getattr(self.ref.tokenizer, "add_bos_token", False))
        bos = self.ref.tokenizer.bos_token_id if add_bos else None
        self.protocol = Protocol(cfg.protocol, cfg.context, bos)  # type: ignore[arg-type]
        self.doc = R.new_results(
            device=str(self.ref.device),
            dtype=cfg.dtype,
            model=self.ref.info.to_dict(),
            text={**text.to_dict(), "n_tokens": len(stream)},
            split=split.to_dict(),
            protocol=self.protocol.to_dict(),
            run=dataclasses.asdict(cfg),
            notes=notes_for(self.ref),
        )
        if not self.reference_logits:
            return
        key = {
            "model": self.ref.info.weights_sha256,
            "dtype": cfg.dtype,
            "device": str(self.ref.device),
            "windows": hashlib.sha256(self.windows.numpy().tobytes()).hexdigest(),
            "protocol": self.protocol.to_dict(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "scoring": scoring_path(self.ref.device),  # the stored row statistics are the scoring kernel's
        }
        self.ref_key = key  # what every cached figure of this session is keyed on (quantbench/cached.py)
        ref_variant = TorchVariant("reference", self.ref.model)
        self.ref_logits = cached_reference_logits(
            ref_variant, self.windows, self.protocol, key, progress=self.progress("reference", len(self.windows))
        )
        warm_up(self.ref_logits.vocab, self.ref.device)

    def build(self, spec: MethodSpec) -> tuple[Variant, float]:
        t = time.perf_counter()
        variant = spec.build(self.ref, self.calib)
        return variant, time.perf_counter() - t

    def measure(self, spec_str: str, variant: tuple[Variant, float] | None = None) -> dict:
        """Build the variant of `spec_str` (unless given) and measure it; the result row.
        A variant built here is closed afterwards; a given one stays open for its owner."""
        spec = parse_method(spec_str)
        owned = variant is None
        gc.collect()
        before = rss_bytes()
        variant, quantize_seconds = variant or self.build(spec)
        try:
            with PeakRSS() as peak:
                q = evaluate_quality(
                    variant, self.windows, self.protocol, self.ref_logits, progress=self.progress(str(spec), len(self.windows))
                )
            speed = measure_speed(variant, self.windows, self.cfg.batch_size, self.cfg.decode_tokens) if self.cfg.measure_speed else None
            gens = generations(variant, self.ref.tokenizer, self.cfg.generate_tokens) if self.cfg.generate else []
            wbytes = variant.weight_bytes()
            row = {
                "method": spec.name,
                "spec": str(spec),
                "params": dataclasses.asdict(spec.config) if dataclasses.is_dataclass(spec.config) else {},
                **q.quality.to_dict(),
                "weight_bytes": wbytes,
                "n_weights": variant.n_weights,
                "bits_per_weight": 8.0 * wbytes / variant.n_weights,
                "compression_vs_fp16": 2.0 * variant.n_weights / wbytes,
                "compression_vs_fp32": 4.0 * variant.n_weights / wbytes,
                "artifact_bytes": variant.artifact_bytes(),
                "peak_rss_bytes": peak.bytes,
                "variant_rss_bytes": peak.bytes - before,
                **(speed.to_dict() if speed else {k: None for k in ("prefill_tokens_per_s", "prefill_batch_tokens_per_s", "decode_tokens_per_s")}),
                "quantize_seconds": quantize_seconds,
                "eval_seconds": q.eval_seconds,
                "forward_seconds": q.forward_seconds,
                "generations": gens,
                "layer_specs": dict(variant.layer_specs),
                "device": str(variant.device),
                "weight_histogram": weight_histogram(self.ref.model, variant),
            }
        finally:
            if owned:
                variant.close()
            del variant
            gc.collect()
        self.doc["results"].append(row)
        return row


def notes_for(ref: Reference) -> list[str]:
    notes = []
    if ref.info.kind == "embedded":
        notes.append(
            "The embedded reference is SmolLM2-135M-Instruct dequantized from a Q4_1 GGUF file: its weights lie on a "
            "Q4_1 grid (blocks of 32 with a scale and a minimum). Re-quantizing to Q4_1 is nearly lossless, and formats "
            "with 32-element blocks look better here than they would on a model trained in float."
        )
    elif ref.info.kind == "gguf":
        notes.append("The reference was dequantized from a GGUF file: quality figures are relative to that file's grid.")
    return notes


def write_token_dump(session: Session, path: str | Path) -> Path:
    """The evaluation windows' token ids exactly as fed to the model, for outside tools."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "model": session.doc["model"],
        "protocol": session.doc["protocol"],
        "split": session.doc["split"],
        "windows": session.protocol.prepare(session.windows).tolist(),
    }
    path.write_text(json.dumps(doc))
    return path


def run(cfg: RunConfig, specs: list[str], progress=None, on_row=None, dump_tokens: str | None = None) -> dict:
    """Measure every spec; returns the results document. A method whose library is missing is
    recorded as skipped with its reason, never silently dropped."""
    parsed = [parse_method(s) for s in specs]  # fail on a bad spec before any work
    session = Session(cfg, progress) if progress else Session(cfg)
    if dump_tokens:
        write_token_dump(session, dump_tokens)
    session.doc["skipped"] = []
    for spec in parsed:
        missing = missing_requirements(spec.method)
        if missing:
            session.doc["skipped"].append({"spec": str(spec), "reason": f"needs {', '.join(missing)}"})
            continue
        row = session.measure(str(spec))
        if on_row:
            on_row(row)
    return session.doc


def save_results(doc: dict, path: str | Path) -> Path:
    return R.save(doc, path)
