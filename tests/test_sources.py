"""Sources: the embedded text, the split, and each bad input's error."""

import sys
from pathlib import Path

import pytest

from quantbench.sources import SourceError, load_reference, load_text, split_tokens
from quantbench.sources.models import resolve_model


def test_embedded_text_is_deterministic_prose():
    a, b = load_text(), load_text()
    assert a.name == "pydoc" and a.sha256 == b.sha256
    assert len(a.text) > 100_000 and "the" in a.text


def test_text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello world " * 10)
    assert load_text(str(p)).text.startswith("hello world")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda tmp: load_text(str(tmp / "missing.txt")), "does not exist"),
        (lambda tmp: load_text(dataset="ptb"), "known: wikitext2"),
        (lambda tmp: load_text(str(tmp / "x.txt"), dataset="wikitext2"), "not both"),
        (lambda tmp: resolve_model(str(tmp / "nope")), "does not exist"),
        (lambda tmp: resolve_model(str(tmp / "nope.gguf")), "does not exist"),
        (lambda tmp: resolve_model(str(tmp)), "without config.json"),
        (lambda tmp: load_reference("smollm2-135m", dtype="int8"), "choose one of fp32, bf16, fp16"),
    ],
    ids=["missing-text", "unknown-dataset", "file-and-dataset", "missing-dir", "missing-gguf", "dir-no-config", "bad-dtype"],
)
def test_bad_sources_give_clear_errors(tmp_path, call, match):
    with pytest.raises(SourceError, match=match):
        call(tmp_path)


def test_non_utf8_text_file(tmp_path):
    p = tmp_path / "b.txt"
    p.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(SourceError, match="not UTF-8"):
        load_text(str(p))


def test_hub_id_while_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(SourceError, match="offline"):
        load_reference("some-org/some-model-that-is-not-cached")


def test_cuda_asked_without_cuda(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SourceError, match="CUDA is not available"):
        load_reference("smollm2-135m", device="cuda")


def test_split_is_disjoint_and_deterministic():
    s1 = split_tokens(10_000, 100, 20, 10, 150, seed=3)
    s2 = split_tokens(10_000, 100, 20, 10, 150, seed=3)
    assert s1 == s2
    assert split_tokens(10_000, 100, 20, 10, 150, seed=4).eval_starts != s1.eval_starts
    evals = [set(range(s, s + 100)) for s in s1.eval_starts]
    for c in s1.calib_starts:
        span = set(range(c, c + 150))
        assert not any(span & e for e in evals)
        assert c + 150 <= 10_000
    assert len(set(s1.calib_starts)) == 10


def test_text_shorter_than_asked():
    with pytest.raises(SourceError, match="room for 10 windows"):
        split_tokens(1000, 100, 11, 0, 0, seed=0)


def test_overlapping_calibration_and_eval_request():
    with pytest.raises(SourceError, match="overlap"):
        split_tokens(1000, 100, 8, 3, 100, seed=0)  # 2 free blocks, 3 sequences asked


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reference_weights_are_not_pages_of_the_file(tiny_model_dirs, arch):
    """transformers maps safetensors files into memory; the reference copies its weights out, so
    that a weight swapped for a QTensor frees its memory and resident-set figures do not depend on
    which pages were read."""
    ref = load_reference(tiny_model_dirs[arch])
    files = {str(p.resolve()) for p in Path(tiny_model_dirs[arch]).glob("*.safetensors")}
    assert files, "the tiny model is saved as safetensors"
    mapped = {line.split(maxsplit=5)[-1].strip() for line in open("/proc/self/maps") if ".safetensors" in line}
    assert not files & mapped, f"still mapped: {files & mapped}"
