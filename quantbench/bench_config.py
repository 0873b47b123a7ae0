"""What a benchmark session measures: the matrix of models and methods, the run settings and the
thresholds, from `[tool.quantbench]` in the project's pyproject.toml (or a TOML file given with
--qb-config), overridden by the --qb-* options.

    [tool.quantbench]
    models = ["smollm2-135m"]
    methods = ["fp32", "absmax:bits=8,granularity=channel", "int:bits=4,group=64,sym=false"]
    tokens = 1024            # evaluation tokens: tokens // context windows
    context = 512
    text = "pydoc"           # the embedded text, a file path, or "wikitext2"
    latency_rounds = 3
    smoke = { methods = ["fp32", "int:bits=4,group=64,sym=false"], tokens = 512, context = 256 }
    regression = { ppl_rel = 0.01, kld_rel = 0.10, kld_abs = 1e-4 }

    [tool.quantbench.thresholds."4-bit grouped"]         # a family (see quantbench.gates)
    kld_mean = 0.4
    [tool.quantbench.thresholds."int:bits=3,group=64,sym=false"]   # one spec
    top1 = 0.5
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .gates import DEFAULTS, Thresholds, Tolerance
from .methods import methods, parse_method
from .run import DEFAULT_METHODS, RunConfig
from .sources import EMBEDDED_MODEL, EMBEDDED_TEXT
from .spec import SpecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

RUN_KEYS = ("tokens", "context", "protocol", "device", "dtype", "seed", "calib_samples", "calib_len",
            "generate_tokens", "decode_tokens", "batch_size")
KEYS = ("models", "methods", "text", "latency_rounds", "smoke", "regression", "thresholds") + RUN_KEYS
THRESHOLD_KEYS = tuple(f.name for f in dataclasses.fields(Thresholds))

# A benchmark's own defaults: smaller than `quantbench run`'s, since every variant is also timed.
BENCH_RUN = dict(tokens=1024, context=512, measure_speed=False)
SMOKE = dict(methods=("fp32", "absmax:bits=8,granularity=channel", "int:bits=4,group=64,sym=false"),
             tokens=512, context=256)


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    methods: tuple[str, ...]  # canonical spec strings
    run: RunConfig  # `model` is set per model
    thresholds: dict[str, dict] = field(default_factory=dict)  # family or spec -> Thresholds fields
    tolerance: Tolerance = Tolerance()
    smoke_methods: tuple[str, ...] = ()
    latency_rounds: int = 3
    source: str = "defaults"  # where the table came from

    def config_for(self, model: str) -> RunConfig:
        return dataclasses.replace(self.run, model=model)


def read_table(config_path: str | None, rootdir: Path) -> tuple[dict, str]:
    """The quantbench table: from --qb-config (a pyproject.toml with [tool.quantbench], or a file
    whose top level is the table), else the project's pyproject.toml, else empty."""
    if config_path:
        p = Path(config_path)
        if not p.is_file():
            raise SpecError(f"--qb-config: {config_path} does not exist")
        doc = tomllib.loads(p.read_text())
        return doc.get("tool", {}).get("quantbench", doc), str(p)
    p = rootdir / "pyproject.toml"
    if p.is_file():
        table = tomllib.loads(p.read_text()).get("tool", {}).get("quantbench")
        if table is not None:
            return table, f"{p} [tool.quantbench]"
    return {}, "defaults"


def default_matrix() -> tuple[str, ...]:
    """DEFAULT_METHODS that this install registers (a missing backend is kept: its variants skip
    with the reason)."""
    known = methods()
    return tuple(s for s in DEFAULT_METHODS if s.partition(":")[0] in known)


def canonical(specs) -> tuple[str, ...]:
    return tuple(dict.fromkeys(str(parse_method(s)) for s in specs))  # SpecError lists what is valid


def resolve(table: dict, options: dict, smoke: bool, source: str = "") -> Settings:
    """Settings from a config table and the command line's --qb-* values (None: not given)."""
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise SpecError(f"[tool.quantbench]: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(KEYS)}")
    run = {**BENCH_RUN, **{k: table[k] for k in RUN_KEYS if k in table}}
    smoke_table = {**SMOKE, **table.get("smoke", {})}
    if smoke:
        run.update({k: smoke_table[k] for k in ("tokens", "context") if k in smoke_table})
    text = options.get("text") or table.get("text") or EMBEDDED_TEXT
    if text == "wikitext2":
        run["dataset"] = "wikitext2"
    elif text != EMBEDDED_TEXT:
        run["text_file"] = text
    for opt in ("tokens", "context", "device", "dtype"):
        if options.get(opt) is not None:
            run[opt] = options[opt]
    models = tuple(options.get("models") or table.get("models") or (EMBEDDED_MODEL,))
    specs = options.get("methods") or table.get("methods") or default_matrix()
    specs = canonical(specs)
    smoke_methods = canonical(smoke_table.get("methods", ()))
    if smoke and not options.get("methods"):
        specs = smoke_methods
    thresholds = table.get("thresholds", {})
    for name, values in thresholds.items():
        bad = sorted(set(values) - set(THRESHOLD_KEYS))
        if bad:
            raise SpecError(f"thresholds {name!r}: unknown key(s) {', '.join(bad)}; valid: {', '.join(THRESHOLD_KEYS)}")
    thresholds = {(n if n in DEFAULTS else str(parse_method(n))): v for n, v in thresholds.items()}
    reg = table.get("regression", {})
    bad = sorted(set(reg) - {f.name for f in dataclasses.fields(Tolerance)})
    if bad:
        raise SpecError(f"regression: unknown key(s) {', '.join(bad)}; valid: ppl_rel, kld_rel, kld_abs")
    try:
        cfg = RunConfig(**run)
    except TypeError as e:
        raise SpecError(f"[tool.quantbench]: {e}") from None
    return Settings(
        models=models,
        methods=specs,
        run=cfg,
        thresholds=thresholds,
        tolerance=Tolerance(**reg),
        smoke_methods=smoke_methods,
        latency_rounds=int(table.get("latency_rounds", 3)),
        source=source,
    )
