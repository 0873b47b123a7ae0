"""End to end on tiny random Llama and GPT-2 models: the CLI, the results file, the report."""

import json

import pytest

from quantbench import results as R
from quantbench.cli import main, split_methods

FAST = ["--tokens", "256", "--context", "64", "--calib-samples", "0", "--no-plots", "--quiet"]


def test_split_methods_keeps_parameters_with_their_method():
    assert split_methods(["fp32,absmax:bits=8,granularity=channel"]) == ["fp32", "absmax:bits=8,granularity=channel"]
    assert split_methods(["int:bits=4,group=32;gguf:Q8_0", "bf16"]) == ["int:bits=4,group=32", "gguf:Q8_0", "bf16"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_run_writes_every_key(tiny_model_dirs, tmp_path, arch, capsys):
    out = tmp_path / "out.json"
    dump = tmp_path / "tokens.json"
    rc = main(
        ["run", "--model", tiny_model_dirs[arch], "--methods", "fp32,absmax:bits=8,granularity=channel,zeropoint",
         "--json", str(out), "--dump-tokens", str(dump), "--out", str(tmp_path)] + FAST
    )
    assert rc == 0
    doc = R.load(out)
    assert [r["spec"] for r in doc["results"]] == ["fp32", "absmax:granularity=channel", "zeropoint"]
    for r in doc["results"]:
        for k in R.ROW_KEYS:
            assert k in r, k
        assert r["ppl"] > 1 and r["peak_rss_bytes"] > 0 and r["prefill_tokens_per_s"] > 0
        assert len(r["generations"]) == 6
    fp32, ch, zp = doc["results"]
    assert fp32["kld_mean"] == 0.0 and fp32["top1_agreement"] == 1.0  # same model, same tokens
    assert fp32["bits_per_weight"] == pytest.approx(32.0, rel=1e-3)
    assert 0 < ch["kld_mean"] < 0.01 and ch["weight_bytes"] < fp32["weight_bytes"]
    assert ch["layer_specs"] and all(s.split(":")[0] == "int" for s in ch["layer_specs"].values())
    for key in ("model", "text", "split", "protocol", "versions", "device"):
        assert key in doc
    assert len(doc["model"]["weights_sha256"]) == 64
    tokens = json.loads(dump.read_text())
    assert len(tokens["windows"]) == 4 and len(tokens["windows"][0]) == 64
    assert "absmax:granularity=channel" in capsys.readouterr().out


def test_report_reads_saved_results_without_recomputing(tiny_model_dirs, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["run", "--model", tiny_model_dirs["llama"], "--methods", "fp32", "--json", str(out), "--no-speed",
                 "--no-generate"] + FAST) == 0
    capsys.readouterr()
    assert main(["report", str(out), "--markdown", "--plots", str(tmp_path / "plots")]) == 0
    text = capsys.readouterr().out
    assert "| method" in text and "fp32" in text
    assert (tmp_path / "plots" / "ppl_vs_bpw.png").stat().st_size > 1000


def test_llamacpp_protocol_and_reference_cache(tiny_model_dirs, tmp_path):
    args = ["run", "--model", tiny_model_dirs["llama"], "--methods", "fp32", "--protocol", "llama.cpp",
            "--no-speed", "--no-generate"] + FAST
    assert main(args + ["--json", str(tmp_path / "a.json")]) == 0
    assert main(args + ["--json", str(tmp_path / "b.json")]) == 0  # second run reads the cached reference
    a, b = R.load(tmp_path / "a.json"), R.load(tmp_path / "b.json")
    assert a["results"][0]["ppl"] == b["results"][0]["ppl"]
    assert a["results"][0]["n_tokens"] == 4 * 31  # 4 windows of 64, tokens 33..63 scored


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--methods", "nosuch"], "unknown method 'nosuch'; known methods: fp32"),
        (["--methods", "absmax:bits=9"], "bits=9 is not supported"),
        (["--methods", "absmax:bitz=4"], "valid parameters: bits, granularity, group"),
        (["--context", "100000"], "longer than the model allows"),
        (["--tokens", "10000000"], "lower --tokens"),
        (["--text-file", "/nonexistent.txt"], "does not exist"),
    ],
    ids=["unknown-method", "bad-bits", "bad-param", "context-too-long", "too-many-tokens", "missing-text"],
)
def test_bad_run_arguments(tiny_model_dirs, tmp_path, capsys, argv, match):
    base = ["run", "--model", tiny_model_dirs["llama"], "--json", str(tmp_path / "x.json"), "--quiet", "--no-plots"]
    rc = main(base + ["--methods", "fp32", "--tokens", "256", "--context", "64", "--calib-samples", "0"] + argv)
    assert rc == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_report_rejects_a_file_that_is_not_results(tmp_path, capsys):
    p = tmp_path / "x.json"
    p.write_text('{"a": 1}')
    assert main(["report", str(p)]) == 2
    assert "not a quantbench results file" in capsys.readouterr().err
