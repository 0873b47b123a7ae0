"""The pytest plugin end to end, through pytester, on a tiny random Llama: options and ids, gates
and their messages, skips and failures, the results file, regression against a saved run, and
two xdist workers against one process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import torch

from quantbench import report
from quantbench import results as R
from quantbench.methods import parse_method
from quantbench.pytest_plugin import variant_id

pytest_plugins = ["pytester"]

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SPECS = ["fp32", "absmax:bits=8,granularity=channel", "int:bits=4,group=32,sym=false"]
IDS = ["fp32", "absmax-b8-channel", "int-b4-g32-asym"]
CANONICAL = [str(parse_method(s)) for s in SPECS]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Tiny models run fastest on one thread; with two on a busy machine, OpenMP's spinning makes
    a 64-token forward take a second instead of 20 ms."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for pytester's subprocess runs
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("fp32", "fp32"),
        ("int:bits=4,group=64,sym=false", "int-b4-g64-asym"),
        ("int:bits=8", "int-b8"),
        ("int:bits=3,group=-1", "int-b3-tensor"),
        ("absmax:bits=8,granularity=channel", "absmax-b8-channel"),
        ("zeropoint:bits=4,granularity=group,group=32", "zeropoint-b4-g32-group"),
    ],
)
def test_variant_ids_are_readable(spec, expected):
    assert variant_id(spec) == expected


def project(pytester, model_dir: str, *, specs=SPECS, files=("test_quality.py", "test_memory.py"), extra: str = ""):
    """A project with the shipped benchmark files and a [tool.quantbench] table for the tiny model."""
    methods = ", ".join(f'"{s}"' for s in specs)
    pytester.makepyprojecttoml(
        f"""
        [tool.quantbench]
        models = ["{model_dir}"]
        methods = [{methods}]
        tokens = 128
        context = 32
        calib_samples = 0
        generate_tokens = 2
        decode_tokens = 2
        latency_rounds = 1
        [tool.quantbench.thresholds."4-bit grouped"]
        ppl_ratio = 100.0
        kld_mean = 10.0
        top1 = 0.0
        peak_rss_mb = 100000
        [tool.quantbench.thresholds."8-bit"]
        peak_rss_mb = 100000
        [tool.quantbench.thresholds.reference]
        peak_rss_mb = 100000
        {extra}
        """
    )
    for f in files:
        shutil.copy(BENCH / f, pytester.path / f)


def run(pytester, *args, subprocess=False):
    out = str(pytester.path / "out.json")
    fn = pytester.runpytest_subprocess if subprocess else pytester.runpytest
    return fn("-p", "no:cacheprovider", "-v", "-rs", "--qb-results", out, *args), out


def test_matrix_ids_gates_results_and_warm_cache(pytester, tiny_model_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE_DIR", str(tmp_path / "cache"))  # cold
    project(pytester, tiny_model_dirs["llama"], files=("test_quality.py", "test_memory.py", "test_latency.py"))
    result, out = run(pytester)
    result.assert_outcomes(passed=len(SPECS) * 4)
    for i in IDS:
        result.stdout.fnmatch_lines([f"*test_quality[[]{i}[]] PASSED*"])
    result.stdout.fnmatch_lines(["*quantbench: *tiny-llama*", "*int:bits=4,sym=false,group=32*", "*0 rows, 0 variants*"])
    doc = R.load(out)
    assert [r["spec"] for r in doc["results"]] == CANONICAL
    for r in doc["results"]:
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0  # from pytest-benchmark
        assert r["weight_histogram"]["layer"] == "model.layers.0.self_attn.q_proj"
    first = {r["spec"]: r for r in doc["results"]}
    paths = report.plots(doc, tmp_path / "plots")  # every plot and the generations side by side
    assert {p.name for p in paths} == {"ppl_vs_bpw.png", "kld_vs_bpw.png", "weight_memory.png", "speed.png",
                                       "weight_histograms.png", "generations.md"}
    assert all(p.stat().st_size > 1000 for p in paths if p.suffix == ".png")
    md = (tmp_path / "plots" / "generations.md").read_text()
    assert md.count("| method") == 6 and "### factual: 'The capital of France is'" in md
    # Second run: every row and every variant comes from the cache, with the same figures.
    result, out = run(pytester)
    result.assert_outcomes(passed=len(SPECS) * 4)
    result.stdout.fnmatch_lines(["*cache hits in this process: 3 rows, 3 variants*"])
    for r in R.load(out)["results"]:
        for k in ("ppl", "kld_mean", "top1_agreement", "weight_bytes", "peak_rss_bytes"):
            assert r[k] == first[r["spec"]][k], k


def test_degraded_threshold_fails_naming_the_figure(pytester, tiny_model_dirs):
    extra = """
        [tool.quantbench.thresholds."absmax:bits=8,granularity=channel"]
        kld_mean = 1e-12
        peak_rss_mb = 100000
    """
    project(pytester, tiny_model_dirs["llama"], specs=SPECS[:2], files=("test_quality.py",), extra=extra)
    result, _ = run(pytester, "-k", "test_quality")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*absmax-b8-channel (8-bit): mean KL divergence * > threshold 1e-12 (reference: 0 by definition; PPL * vs reference PPL *)*"]
    )


def test_command_line_options_override_the_table(pytester, tiny_model_dirs):
    project(pytester, tiny_model_dirs["llama"], files=("test_quality.py",))
    result, out = run(pytester, "-k", "test_quality", "--qb-methods", "fp32,int:bits=4,group=32,sym=false",
                      "--qb-tokens", "96", "--qb-context", "16")
    result.assert_outcomes(passed=2)
    doc = R.load(out)
    assert doc["protocol"]["context"] == 16 and len(doc["split"]["eval_starts"]) == 6
    bad, _ = run(pytester, "--qb-methods", "nosuch")
    assert bad.ret != 0
    bad.stderr.fnmatch_lines(["*quantbench: unknown method 'nosuch'; known methods: fp32*"])


def test_missing_backend_skips_and_failing_quantizer_fails(pytester, tiny_model_dirs):
    pytester.makeconftest(
        """
        from dataclasses import dataclass
        from quantbench.methods import methods, register_method

        @dataclass(frozen=True)
        class NoConfig:
            pass

        if "needs-lib" not in methods():
            @register_method("needs-lib")
            class NeedsLib:
                config_type = NoConfig
                description = "a method whose library is missing"
                requires = ("quantbench_no_such_library",)
                build = staticmethod(lambda ref, cfg, calib: None)

            @register_method("broken")
            class Broken:
                config_type = NoConfig
                description = "a method that fails to quantize"
                @staticmethod
                def build(ref, cfg, calib):
                    raise ValueError("the weights are not finite")
        """
    )
    project(pytester, tiny_model_dirs["llama"], specs=["needs-lib", "broken"], files=("test_memory.py",))
    result, _ = run(pytester, "-rs")
    result.assert_outcomes(skipped=1, errors=1)
    result.stdout.fnmatch_lines(["*needs-lib needs quantbench_no_such_library, which is not installed here*"])
    result.stdout.fnmatch_lines(["*ValueError: the weights are not finite*"])


def test_regression_gate_against_results_and_benchmark_json(pytester, tiny_model_dirs, tmp_path):
    extra = """
        [tool.quantbench.regression]
        kld_abs = 1e-9
    """
    project(pytester, tiny_model_dirs["llama"], specs=SPECS[1:], files=("test_latency.py", "test_regression.py"), extra=extra)
    bench_json = tmp_path / "bench.json"
    result, out = run(pytester, f"--benchmark-json={bench_json}")
    result.assert_outcomes(passed=4, skipped=2)  # no baseline yet: the regression tests say so
    result.stdout.fnmatch_lines(["*no baseline: pass --qb-compare*"])
    saved = json.loads(bench_json.read_text())
    info = saved["benchmarks"][0]["extra_info"]
    assert {"ppl", "kld_mean", "top1_agreement", "weight_bytes", "bits_per_weight", "peak_rss_bytes"} <= set(info)
    # The same run as the baseline passes, from a quantbench results file or a pytest-benchmark file.
    for base in (out, str(bench_json)):
        result, _ = run(pytester, "-k", "regression", "--qb-compare", base)
        result.assert_outcomes(passed=2)
    # A baseline 10% better in PPL and 5x better in KL makes both figures a regression.
    doc = json.loads(Path(out).read_text())
    for r in doc["results"]:
        r["ppl"] *= 0.9
        r["kld_mean"] /= 5
    better = tmp_path / "better.json"
    better.write_text(json.dumps(doc))
    result, _ = run(pytester, "-k", "regression", "--qb-compare", str(better))
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*int-b4-g32-asym (4-bit grouped): PPL * regressed from the baseline's * (+11.11%, tolerance +1.0%)*"])
    result.stdout.fnmatch_lines(["*mean KL divergence * regressed from the baseline's * (threshold *: +10% + 1e-09)*"])


def test_two_xdist_workers_match_one_process(pytester, tiny_model_dirs, tmp_path, monkeypatch):
    pytest.importorskip("xdist")
    project(pytester, tiny_model_dirs["gpt2"], specs=SPECS[1:], files=("test_quality.py",))
    monkeypatch.setenv("QUANTBENCH_CACHE_DIR", str(tmp_path / "cache-one"))
    one, out_one = run(pytester, "-k", "test_quality")
    one.assert_outcomes(passed=2)
    shutil.move(out_one, tmp_path / "one.json")
    monkeypatch.setenv("QUANTBENCH_CACHE_DIR", str(tmp_path / "cache-two"))  # both workers compute afresh
    monkeypatch.setenv("PYTHONPATH", str(BENCH.parent))  # the subprocess imports this checkout's quantbench
    two, out_two = run(pytester, "-k", "test_quality", "-n", "2", "--dist", "loadgroup", "--qb-xdist-group", "variant",
                       subprocess=True)
    two.assert_outcomes(passed=2)
    a, b = R.load(tmp_path / "one.json"), R.load(out_two)
    assert [r["spec"] for r in b["results"]] == CANONICAL[1:]
    keys = ("ppl", "ppl_stderr", "kld_mean", "kld_p99", "top1_agreement", "logits_mse", "weight_bytes", "bits_per_weight")
    for ra, rb in zip(a["results"], b["results"]):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}
    workers = {line for line in two.stdout.lines if "[gw0]" in line or "[gw1]" in line}
    assert any("[gw0]" in w for w in workers) and any("[gw1]" in w for w in workers)  # both did work


@pytest.mark.parametrize(
    "spec, family",
    [
        ("fp32", "reference"),
        ("bf16", "16-bit"),
        ("absmax:bits=8", "8-bit per-tensor"),
        ("absmax:bits=8,granularity=channel", "8-bit"),
        ("llm-int8", "8-bit activations"),
        ("int:bits=6,group=64", "6-bit"),
        ("int:bits=4,group=64,sym=false", "4-bit grouped"),
        ("int:bits=4", "4-bit per-channel"),
        ("int:bits=3,group=32", "3-bit grouped"),
        ("int:bits=2,group=32", "2-bit"),
    ],
)
def test_method_families_pick_the_default_thresholds(spec, family):
    from quantbench import gates

    fam, th = gates.thresholds_for(parse_method(spec), {})
    assert fam == family and th == gates.DEFAULTS[family]
    over = gates.thresholds_for(parse_method(spec), {family: {"kld_mean": 9.0}, str(parse_method(spec)): {"top1": 0.5}})[1]
    assert (over.kld_mean, over.top1, over.ppl_ratio) == (9.0, 0.5, gates.DEFAULTS[family].ppl_ratio)


def test_the_gpu_marker_skips_without_cuda_whatever_the_fixtures(pytester, monkeypatch):
    """Any test marked gpu (not only a cuda device parameter) skips cleanly on a CPU machine."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gpu
        def test_needs_cuda():
            raise AssertionError("ran without CUDA")

        def test_cpu():
            pass
        """
    )
    result = pytester.runpytest_inprocess("-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*marked gpu: needs CUDA*"])
