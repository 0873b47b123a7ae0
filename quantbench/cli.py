"""quantbench run | list | report | quantize | cache

    quantbench run                                   # embedded model and text, default methods
    quantbench run --methods fp32,absmax:bits=8,granularity=channel --json out.json
    quantbench list
    quantbench report results/latest.json --markdown
    quantbench cache list                            # what is cached, and whether each entry is whole
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from datetime import datetime
from pathlib import Path

from .spec import SpecError


def split_methods(values: list[str]) -> list[str]:
    """Method specs from one or more --methods values.

    Specs are separated by commas or semicolons; since a spec's own parameters are also
    separated by commas, a piece of the form key=value (with no ':') continues the spec
    before it: "fp32,absmax:bits=8,granularity=channel" -> ["fp32", "absmax:bits=8,granularity=channel"].
    """
    out: list[str] = []
    for value in values:
        for piece in (p.strip() for p in value.replace(";", ",").split(",")):
            if not piece:
                continue
            if "=" in piece and ":" not in piece and out:
                out[-1] += "," + piece
            else:
                out.append(piece)
    return out


def _progress_factory(enabled: bool):
    from tqdm import tqdm

    bars = []

    def make(desc: str, total: int):
        if not enabled:
            return None
        bar = tqdm(total=total, desc=desc, unit="win", leave=False, file=sys.stderr)
        bars.append(bar)

        def update(n: int) -> None:
            bar.update(n)
            if bar.n >= bar.total:
                bar.close()

        return update

    return make


def cmd_run(a: argparse.Namespace) -> int:
    from . import report
    from .run import DEFAULT_METHODS, RunConfig, default_methods, run, save_results

    cfg = RunConfig(
        model=a.model,
        text_file=a.text_file,
        dataset=a.dataset,
        tokens=a.tokens,
        context=a.context,
        protocol=a.protocol,
        device=a.device,
        dtype=a.dtype,
        seed=a.seed,
        batch_size=a.batch_size,
        decode_tokens=a.decode_tokens,
        generate_tokens=a.generate_tokens,
        calib_samples=a.calib_samples,
        calib_len=a.calib_len,
        measure_speed=not a.no_speed,
        generate=not a.no_generate,
    )
    specs = split_methods(a.methods) if a.methods else default_methods()
    if specs == ["all"]:
        specs = default_methods(DEFAULT_METHODS)

    def on_row(row: dict) -> None:
        print(
            f"  {row['spec']}: PPL {row['ppl']:.3f} ± {row['ppl_stderr']:.3f}, KLD {row['kld_mean']:.5f}, "
            f"{row['bits_per_weight']:.2f} bpw",
            file=sys.stderr,
        )

    doc = run(cfg, specs, progress=_progress_factory(not a.quiet), on_row=on_row, dump_tokens=a.dump_tokens)
    out_dir = Path(a.out)
    json_path = Path(a.json) if a.json else out_dir / f"run-{datetime.now():%Y%m%d-%H%M%S}.json"
    save_results(doc, json_path)
    if not a.json:
        save_results(doc, out_dir / "latest.json")
    print(report.render(doc))
    if not a.no_plots:
        for p in report.plots(doc, out_dir / "plots"):
            print(f"plot: {p}")
    print(f"results: {json_path}")
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    import importlib.util

    from tabulate import tabulate

    from .formats import formats
    from .methods import methods, missing_requirements
    from .spec import describe_params

    rows = []
    for name, m in methods().items():
        missing = missing_requirements(m)
        params = ", ".join(f"{n}={d}" for n, _t, d in describe_params(m.config_type)) or "-"
        rows.append([name, params, "yes" if not missing else f"no: needs {', '.join(missing)}", m.description])
    print(tabulate(rows, headers=["method", "parameters (defaults)", "available", "what it does"]))
    print()
    frows = []
    for name, f in formats().items():
        params = ", ".join(f"{n}: {t}" for n, t, _ in describe_params(f.config_type))
        for cfg in _format_examples(f.config_type):
            try:
                bpw = f"{cfg.bits_per_weight((4096, 4096)):.3f}"
            except (NotImplementedError, ValueError):
                bpw = "-"
            frows.append([name, cfg.spec(), params, bpw])
            params = ""
    print(tabulate(frows, headers=["format", "spec", "parameters", "bits per weight (4096x4096)"]))
    print()
    backends = {"bitsandbytes": "bitsandbytes", "llama.cpp": "llama_cpp", "datasets (wikitext2)": "datasets"}
    print("optional backends: " + ", ".join(
        f"{k} {'installed' if importlib.util.find_spec(v) else 'missing'}" for k, v in backends.items()
    ))
    return 0


def _format_examples(config_type: type) -> list:
    """The default config of a format, or one per value of a required choice (gguf's type)."""
    import typing

    try:
        return [config_type()]
    except TypeError:
        first = fields(config_type)[0]
        choices = typing.get_args(typing.get_type_hints(config_type)[first.name])
        return [config_type(**{first.name: c}) for c in choices]


def cmd_report(a: argparse.Namespace) -> int:
    from . import report
    from .results import load

    doc = load(a.results)
    print(report.render(doc, markdown=a.markdown))
    if a.generations:
        print()
        print(report.generations_table(doc, "github" if a.markdown else "simple"))
    if a.plots:
        for p in report.plots(doc, a.plots):
            print(f"plot: {p}")
    return 0


def cmd_quantize(a: argparse.Namespace) -> int:
    from .artifacts import save_quantized
    from .methods import parse_method
    from .run import RunConfig, Session

    spec = parse_method(a.method)
    cfg = RunConfig(model=a.model, text_file=a.text_file, dtype=a.dtype, device=a.device, tokens=a.context,
                    context=a.context, seed=a.seed, calib_samples=a.calib_samples if spec.method.needs_calibration else 0,
                    calib_len=a.calib_len, measure_speed=False, generate=False)
    session = Session(cfg, reference_logits=False)
    variant, seconds = session.build(spec)
    out = save_quantized(variant, session.ref.tokenizer, a.out, session.ref.info.to_dict(), str(spec))
    print(f"{spec}: quantized in {seconds:.1f} s, {variant.weight_bytes() / 1e6:.1f} MB of weights -> {out}")
    return 0


def cmd_cache(a: argparse.Namespace) -> int:
    from tabulate import tabulate

    from . import cache

    if a.action == "clear":
        freed = cache.clear(a.kind)
        print(f"cleared {cache.cache_dir()}{'/' + a.kind if a.kind else ''}: {freed / 1e6:.1f} MB freed")
        return 0
    rows = [[e.kind, e.digest[:12], e.label, f"{e.bytes / 1e6:.1f}", e.created, "ok" if e.ok else "CORRUPT (rebuilt on next use)"]
            for e in cache.entries() if not a.kind or e.kind == a.kind]
    print(
        f"cache: {cache.cache_dir()} (QUANTBENCH_CACHE_DIR); code version {cache.code_version()}, "
        f"of variants {cache.code_version(*cache.VARIANT_ROOTS)}"
    )
    print(tabulate(rows, headers=["kind", "key", "what", "MB", "created", "status"]) if rows else "empty")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .run import RunConfig

    d = {f.name: f.default for f in fields(RunConfig)}
    p = argparse.ArgumentParser(prog="quantbench", description="Benchmark LLM quantization methods on the same tokens.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="quantize with each method and measure every variant against the reference")
    r.add_argument("--model", default=d["model"], help="smollm2-135m (embedded), a model directory, a .gguf file or a hub id")
    r.add_argument("--text-file", help="a UTF-8 text file to evaluate on (default: the embedded pydoc text)")
    r.add_argument("--dataset", choices=["wikitext2"], help="a dataset from the local `datasets` cache")
    r.add_argument("--methods", action="append", help="method specs, e.g. fp32,absmax:bits=8,granularity=channel; "
                   "'all' for the whole benchmark matrix (default: a quick set)")
    r.add_argument("--tokens", type=int, default=d["tokens"], help="evaluation tokens (a whole number of windows)")
    r.add_argument("--context", type=int, default=d["context"], help="tokens per window")
    r.add_argument("--protocol", choices=["disjoint", "llama.cpp"], default=d["protocol"])
    r.add_argument("--device", default=d["device"], help="cpu or cuda")
    r.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=d["dtype"], help="reference precision")
    r.add_argument("--seed", type=int, default=d["seed"])
    r.add_argument("--batch-size", type=int, default=d["batch_size"], help="batch size of the batched prefill speed")
    r.add_argument("--decode-tokens", type=int, default=d["decode_tokens"], help="tokens timed for the decode speed")
    r.add_argument("--generate-tokens", type=int, default=d["generate_tokens"], help="tokens generated per prompt")
    r.add_argument("--calib-samples", type=int, default=d["calib_samples"])
    r.add_argument("--calib-len", type=int, default=d["calib_len"])
    r.add_argument("--json", help="write the results here (default: results/run-TIME.json and results/latest.json)")
    r.add_argument("--out", default="results", help="directory for results and plots")
    r.add_argument("--dump-tokens", metavar="PATH", help="write the evaluation windows' token ids as JSON")
    r.add_argument("--no-speed", action="store_true", help="skip the prefill/decode speed measurements")
    r.add_argument("--no-generate", action="store_true", help="skip the generated texts")
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_run)

    qz = sub.add_parser("quantize", help="quantize a model with one method and save it to a directory")
    qz.add_argument("--model", default=d["model"])
    qz.add_argument("--method", required=True, help="a method spec, e.g. int:bits=4,group=64")
    qz.add_argument("--out", required=True, help="output directory (load it with quantbench.load_quantized)")
    qz.add_argument("--text-file", help="calibration text for calibrated methods (default: the embedded text)")
    qz.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=d["dtype"])
    qz.add_argument("--device", default=d["device"])
    qz.add_argument("--seed", type=int, default=d["seed"])
    qz.add_argument("--context", type=int, default=d["context"])
    qz.add_argument("--calib-samples", type=int, default=d["calib_samples"])
    qz.add_argument("--calib-len", type=int, default=d["calib_len"])
    qz.set_defaults(func=cmd_quantize)

    ls = sub.add_parser("list", help="methods and formats with their parameters, and which backends are installed")
    ls.set_defaults(func=cmd_list)

    rep = sub.add_parser("report", help="the table and plots of a saved results file, without recomputing")
    rep.add_argument("results")
    rep.add_argument("--markdown", action="store_true")
    rep.add_argument("--generations", action="store_true", help="also show the generated texts")
    rep.add_argument("--plots", metavar="DIR", help="write plots to DIR")
    rep.set_defaults(func=cmd_report)

    c = sub.add_parser("cache", help="list or clear the on-disk cache of reference logits, variants and rows")
    c.add_argument("action", choices=["list", "clear"])
    c.add_argument("--kind", choices=["reference", "variant", "row"], help="only entries of this kind")
    c.set_defaults(func=cmd_cache)
    return p


def main(argv: list[str] | None = None) -> int:
    from .artifacts import ArtifactError
    from .results import ResultsError
    from .sources.models import SourceError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SpecError, SourceError, ResultsError, ArtifactError) as e:
        print(f"quantbench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
