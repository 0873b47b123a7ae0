"""quantbench's pytest plugin (entry point `pytest11`): options, fixtures and gates for
benchmark suites such as benchmarks/ in this repository.

Fixtures
    qb_reference    the run's Session for one model (reference, windows, calibration, reference
                    logits); built once per process and model
    qb_calibration  the calibration set of that Session
    qb_variant      one variant of the matrix, parametrized with readable ids (`int-b4-g64-asym`);
                    skipped when its backend is missing, failed when it fails to quantize
    qb_metrics      the variant's result row (quality and memory figures, from the cache when warm)
    qb_thresholds / qb_label / qb_baseline / qb_record   gates' inputs and the latency recorder

The matrix is parametrized with session scope, so pytest orders the tests variant by variant
and each variant is built (or restored from the cache) once. Under pytest-xdist each test is
marked `xdist_group(<model>)` (or per variant with --qb-xdist-group variant), and every worker
sends its rows to the controller, which merges them into one results file and one table.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import re
from pathlib import Path

import pytest

from . import gates
from .bench_config import Settings, read_table, resolve
from .spec import SpecError

STATE = pytest.StashKey["QBState"]()
WORKER_PAYLOADS = pytest.StashKey[list]()  # on the xdist controller: what each worker sent
MERGED = pytest.StashKey[dict]()  # model -> merged results document
WRITTEN = pytest.StashKey[list]()
LATENCY = ("prefill_tokens_per_s", "prefill_batch_tokens_per_s", "decode_tokens_per_s")


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("quantbench", "quantbench benchmarks")
    g.addoption("--qb-model", action="append", dest="qb_models", metavar="MODEL",
                help="model(s) to benchmark: smollm2-135m, a directory, a .gguf file or a hub id (repeatable)")
    g.addoption("--qb-methods", action="append", metavar="SPECS", help="method specs, comma separated")
    g.addoption("--qb-text", metavar="TEXT", help="pydoc (embedded), a UTF-8 file, or wikitext2")
    g.addoption("--qb-tokens", type=int, metavar="N", help="evaluation tokens")
    g.addoption("--qb-context", type=int, metavar="C", help="tokens per window")
    g.addoption("--qb-device", metavar="DEV", help="cpu or cuda")
    g.addoption("--qb-dtype", choices=["fp32", "bf16", "fp16"], help="reference precision")
    g.addoption("--qb-config", metavar="TOML", help="the matrix and thresholds (default: [tool.quantbench] in pyproject.toml)")
    g.addoption("--qb-compare", metavar="JSON", help="fail on PPL/KL regressions against this results or pytest-benchmark JSON")
    g.addoption("--qb-results", metavar="JSON", default="results/benchmark.json", help="where to write the merged results")
    g.addoption("--qb-plots", metavar="DIR", help="also write the report's plots here")
    g.addoption("--qb-xdist-group", choices=["model", "variant"], default="model",
                help="xdist_group per model (each worker loads a model once) or per variant")


def variant_id(spec: str) -> str:
    """A readable test id: int:bits=4,group=64,sym=false -> int-b4-g64-asym, gguf:Q4_K -> gguf-Q4_K."""
    from .methods import parse_method

    ms = parse_method(spec)
    cfg = ms.config
    parts = [ms.name]
    if not dataclasses.is_dataclass(cfg):
        return ms.name
    order = {"bits": 0, "group": 1}  # bits and group first, then the rest in the config's order
    for f in sorted(dataclasses.fields(cfg), key=lambda f: order.get(f.name, 2)):
        v = getattr(cfg, f.name)
        if not f.init or (f.name != "bits" and v == f.default):
            continue
        if f.name == "bits":
            parts.append(f"b{v}")
        elif f.name == "group" and isinstance(v, int):
            parts.append({0: "ch", -1: "tensor"}.get(v, f"g{v}"))
        elif f.name == "sym":
            parts.append("sym" if v else "asym")
        elif isinstance(v, bool):
            parts.append(f.name if v else f"no_{f.name}")
        elif isinstance(v, str):
            parts.append(v)
        else:
            parts.append(f"{f.name}{v}")
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", "-".join(map(str, parts)))


def model_id(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(model).name.removesuffix(".gguf")) or "model"


class QBState:
    """What one pytest process holds: the settings, the current Session and variant, the rows.
    Settings are read on first use, so a project that has quantbench installed but runs no
    benchmark never imports torch through this plugin."""

    def __init__(self, config: pytest.Config):
        self._config = config
        self._settings: tuple[Settings, dict | None] | None = None
        self._session: tuple[str, object] | None = None
        self._variant: tuple[tuple[str, str], object] | None = None
        self._failed: dict[tuple[str, str], str] = {}
        self.rows: dict[tuple[str, str], dict] = {}
        self.latency: dict[tuple[str, str], dict] = {}
        self.docs: dict[str, dict] = {}
        self.skipped: dict[tuple[str, str], str] = {}
        self.cache_hits: dict[str, int] = {"row": 0, "variant": 0}

    def _load(self) -> tuple[Settings, dict | None]:
        if self._settings is None:
            o = self._config.option
            try:
                from .cli import split_methods

                table, source = read_table(o.qb_config, Path(self._config.rootpath))
                options = {
                    "models": o.qb_models, "methods": split_methods(o.qb_methods) if o.qb_methods else None,
                    "text": o.qb_text, "tokens": o.qb_tokens, "context": o.qb_context, "device": o.qb_device,
                    "dtype": o.qb_dtype,
                }
                expr = o.markexpr or ""
                smoke = bool(re.search(r"\bsmoke\b", expr)) and not re.search(r"\bnot\s+smoke\b", expr)
                settings = resolve(table, options, smoke, source)
                baseline = gates.load_baseline(o.qb_compare) if o.qb_compare else None
            except SpecError as e:
                raise pytest.UsageError(f"quantbench: {e}") from None
            self._settings = (settings, baseline)
        return self._settings

    @property
    def settings(self) -> Settings:
        return self._load()[0]

    @property
    def baseline(self) -> dict | None:
        return self._load()[1]

    def session(self, model: str):
        from .run import Session

        if self._session is None or self._session[0] != model:
            device = self.settings.run.device
            if device.startswith("cuda") and not _cuda():
                pytest.skip(f"--qb-device {device}: CUDA is not available here")
            self._session = None
            self._drop_variant()
            gc.collect()
            s = Session(self.settings.config_for(model))
            self.docs[model] = {**{k: v for k, v in s.doc.items() if k != "results"},
                                "windows_sha256": s.ref_key["windows"]}
            self._session = (model, s)
        return self._session[1]

    def _drop_variant(self) -> None:
        if self._variant is not None:
            self._variant[1][0].close()
            self._variant = None
            gc.collect()

    def _check(self, model: str, spec: str):
        from .methods import missing_requirements, parse_method

        ms = parse_method(spec)
        missing = missing_requirements(ms.method)
        if missing:
            reason = f"{spec} needs {', '.join(missing)}, which is not installed here"
            self.skipped[(model, spec)] = reason
            pytest.skip(reason)
        if (model, spec) in self._failed:
            pytest.fail(self._failed[(model, spec)], pytrace=False)
        return ms

    def variant(self, model: str, spec: str) -> tuple[object, float]:
        from . import cached

        ms = self._check(model, spec)
        if self._variant is not None and self._variant[0] == (model, spec):
            return self._variant[1]
        session = self.session(model)
        self._drop_variant()
        try:
            v, seconds, hit = cached.variant(session, ms)
        except Exception as e:
            self._failed[(model, spec)] = f"quantizing {spec} failed: {type(e).__name__}: {e}"
            raise
        self.cache_hits["variant"] += hit
        self._variant = ((model, spec), (v, seconds))
        return self._variant[1]

    def metrics(self, model: str, spec: str) -> dict:
        from . import cached

        ms = self._check(model, spec)
        if (model, spec) not in self.rows:
            row, hit = cached.measure(self.session(model), ms, lambda: self.variant(model, spec))
            self.cache_hits["row"] += hit
            self.rows[(model, spec)] = row
        return self.rows[(model, spec)]

    def payload(self) -> dict:
        return {
            "docs": self.docs,
            "rows": [[m, s, r] for (m, s), r in self.rows.items()],
            "latency": [[m, s, v] for (m, s), v in self.latency.items()],
            "skipped": [[m, s, r] for (m, s), r in self.skipped.items()],
            "cache_hits": self.cache_hits,
        }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """The `gpu` marker itself skips a test where CUDA is absent, whatever fixtures it uses."""
    if item.get_closest_marker("gpu") is not None and not _cuda():
        pytest.skip("marked gpu: needs CUDA, which is not available here")


def _state(config: pytest.Config) -> QBState:
    return config.stash[STATE]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "smoke: a small benchmark that CI runs on every change")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")
    config.stash[STATE] = QBState(config)
    config.stash[WORKER_PAYLOADS] = []
    o = config.option
    if any((o.qb_models, o.qb_methods, o.qb_config, o.qb_compare, o.qb_text)):
        config.stash[STATE].settings  # asked for quantbench: report a bad matrix as a usage error now


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    names = set(metafunc.fixturenames)
    per_variant = metafunc.config.option.qb_xdist_group == "variant"
    if names & {"qb_variant", "qb_metrics", "qb_spec", "qb_thresholds", "qb_baseline", "qb_record", "qb_label"}:
        st = _state(metafunc.config).settings
        several = len(st.models) > 1
        params = []
        for model in st.models:
            for spec in st.methods:
                vid = variant_id(spec)
                group = f"{model_id(model)}-{vid}" if per_variant else model_id(model)
                marks = [pytest.mark.xdist_group(group)] + ([pytest.mark.gpu] if st.run.device.startswith("cuda") else [])
                if spec in st.smoke_methods:
                    marks.append(pytest.mark.smoke)
                params.append(pytest.param(model, spec, marks=marks, id=f"{model_id(model)}-{vid}" if several else vid))
        metafunc.parametrize(["qb_model", "qb_spec"], params, scope="session")
    elif names & {"qb_reference", "qb_calibration", "qb_model"}:
        st = _state(metafunc.config).settings
        gpu = [pytest.mark.gpu] if st.run.device.startswith("cuda") else []
        params = [pytest.param(m, marks=[pytest.mark.xdist_group(model_id(m))] + gpu, id=model_id(m)) for m in st.models]
        metafunc.parametrize("qb_model", params, scope="session")


@pytest.fixture(scope="session")
def qb_settings(pytestconfig) -> Settings:
    return _state(pytestconfig).settings


@pytest.fixture
def qb_reference(pytestconfig, qb_model):
    """The Session of `qb_model`: reference model, windows, calibration, reference logits."""
    return _state(pytestconfig).session(qb_model)


@pytest.fixture
def qb_calibration(qb_reference):
    return qb_reference.calib


@pytest.fixture
def qb_variant(pytestconfig, qb_model, qb_spec):
    """The variant of `qb_spec` (a Variant: .logits, .generate, .weight_bytes...)."""
    return _state(pytestconfig).variant(qb_model, qb_spec)[0]


@pytest.fixture
def qb_metrics(pytestconfig, qb_model, qb_spec) -> dict:
    """The variant's result row: quality and memory figures against the reference."""
    return _state(pytestconfig).metrics(qb_model, qb_spec)


@pytest.fixture
def qb_thresholds(qb_settings, qb_spec) -> gates.Thresholds:
    from .methods import parse_method

    return gates.thresholds_for(parse_method(qb_spec), qb_settings.thresholds, qb_settings.run.dtype)[1]


@pytest.fixture
def qb_label(qb_settings, qb_spec) -> str:
    from .methods import parse_method

    return f"{variant_id(qb_spec)} ({gates.family(parse_method(qb_spec), qb_settings.run.dtype)})"


@pytest.fixture
def qb_baseline(pytestconfig, qb_model, qb_spec, qb_reference) -> dict:
    """The baseline's row for this variant (--qb-compare); skips when there is none to compare."""
    base = _state(pytestconfig).baseline
    if base is None:
        pytest.skip("no baseline: pass --qb-compare RESULTS.json (or a pytest-benchmark JSON) to gate regressions")
    row = base.get((qb_reference.ref.info.weights_sha256, qb_spec))
    if row is None:
        pytest.skip(f"{qb_spec} of {qb_model} is not in the baseline")
    if row.get("windows_sha256") not in (None, qb_reference.ref_key["windows"]):
        pytest.skip("the baseline was measured on other token windows (another --qb-tokens/--qb-context/text)")
    return row


@pytest.fixture
def qb_record(pytestconfig, qb_model, qb_spec, qb_metrics):
    """record(benchmark, **latency): stores latency figures in the row and puts every quality
    and memory figure into the pytest-benchmark `extra_info`."""
    state = _state(pytestconfig)

    def record(benchmark, **latency) -> None:
        state.latency.setdefault((qb_model, qb_spec), {}).update(latency)
        doc = state.docs.get(qb_model, {})
        benchmark.extra_info.update(extra_info(qb_metrics, qb_model, doc))
        benchmark.extra_info.update(latency)

    return record


def extra_info(row: dict, model: str, doc: dict) -> dict:
    """Every scalar figure of a row, plus what identifies it for --qb-compare."""
    info = {k: v for k, v in row.items() if isinstance(v, (int, float, str, bool)) or v is None}
    info = {k: v for k, v in info.items() if k not in LATENCY}
    info["model"] = model
    info["model_sha256"] = doc.get("model", {}).get("weights_sha256")
    info["windows_sha256"] = doc.get("windows_sha256")
    return info


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    state = _state(config)
    if state._settings is None and not config.stash[WORKER_PAYLOADS]:
        return  # no quantbench fixture was used
    state._drop_variant()
    payload = state.payload()
    if hasattr(config, "workeroutput"):  # an xdist worker: the controller merges
        config.workeroutput["quantbench"] = json.dumps(payload, allow_nan=True)
        return
    payloads = [payload] + config.stash[WORKER_PAYLOADS]
    for p in payloads[1:]:
        for k, n in p.get("cache_hits", {}).items():
            state.cache_hits[k] += n
    config.stash[MERGED] = merge(state.settings, payloads)
    written = []
    for model, doc in config.stash[MERGED].items():
        if not doc["results"]:
            continue
        path = Path(config.option.qb_results)
        if len(config.stash[MERGED]) > 1:
            path = path.with_name(f"{path.stem}-{model_id(model)}{path.suffix}")
        from .results import save

        written.append(str(save(doc, path)))
        if config.option.qb_plots:
            from .report import plots

            plots(doc, Path(config.option.qb_plots) / model_id(model))
    config.stash[WRITTEN] = written


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """xdist controller: a worker finished; keep its rows for the merge."""
    data = getattr(node, "workeroutput", {}).get("quantbench")
    if data:
        node.config.stash[WORKER_PAYLOADS].append(json.loads(data))


def merge(settings: Settings, payloads: list[dict]) -> dict[str, dict]:
    """One results document per model from every process's rows, in the matrix's order."""
    docs: dict[str, dict] = {}
    rows: dict[tuple[str, str], dict] = {}
    skipped: dict[tuple[str, str], str] = {}
    for p in payloads:
        docs.update({m: d for m, d in p["docs"].items() if m not in docs})
        for m, s, r in p["rows"]:
            rows.setdefault((m, s), dict(r))
        for m, s, r in p["skipped"]:
            skipped[(m, s)] = r
    for p in payloads:
        for m, s, lat in p["latency"]:
            if (m, s) in rows:
                rows[(m, s)].update(lat)
    out = {}
    for model in settings.models:
        if model not in docs:
            continue
        doc = {**docs[model], "results": [rows[(model, s)] for s in settings.methods if (model, s) in rows]}
        doc["skipped"] = [{"spec": s, "reason": r} for (m, s), r in skipped.items() if m == model]
        out[model] = doc
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    merged = config.stash.get(MERGED, None)
    if not merged:
        return
    from .report import render

    tr = terminalreporter
    for model, doc in merged.items():
        if not doc["results"]:
            continue
        tr.write_sep("=", f"quantbench: {model}")
        tr.write_line(render(doc))
    st = _state(config)
    tr.write_line(f"quantbench cache hits in this process: {st.cache_hits['row']} rows, {st.cache_hits['variant']} variants")
    for p in config.stash.get(WRITTEN, []):
        tr.write_line(f"quantbench results: {p}")


# -- helpers for benchmark files ---------------------------------------------------------------
def mean_seconds(benchmark) -> float | None:
    """A pytest-benchmark's mean time per round; None when pytest-benchmark is disabled (under
    xdist, or with --benchmark-disable), where it makes one untimed call."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.mean


def fail_with(messages: list[str]) -> None:
    """Fail the test with every gate's message, without a traceback."""
    if messages:
        pytest.fail("\n".join(messages), pytrace=False)
