"""The on-disk cache: keys, atomic entries, corruption detection, locking between processes,
and variants saved as their difference from the reference and restored bit for bit."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from quantbench import cache, cached
from quantbench.cli import main
from quantbench.layers import QEmbedding, TiedQLinear
from quantbench.methods import parse_method
from quantbench.persist import load_variant, save_variant, saveable
from quantbench.run import RunConfig, Session
from quantbench.sources import ModelInfo, Reference


def test_json_entries_are_keyed_by_everything(tmp_path):
    key = {"model": "abc", "spec": "int:bits=4"}
    assert cache.get_json("row", key) is None
    cache.put_json("row", key, {"ppl": 12.5})
    assert cache.get_json("row", key) == {"ppl": 12.5}
    assert cache.get_json("row", {**key, "spec": "int:bits=3"}) is None
    assert cache.get_json("row", {**key, "windows": "other"}) is None


def test_a_failed_build_leaves_nothing(tmp_path):
    def build(d: Path):
        (d / "half.bin").write_bytes(b"x" * 100)
        raise RuntimeError("killed mid-way")

    with pytest.raises(RuntimeError):
        cache.get_or_build("test", {"k": 1}, build)
    kind_dir = cache.cache_dir() / "test"
    assert [p.name for p in kind_dir.iterdir() if not p.name.endswith(".lock")] == []
    assert cache.lookup("test", {"k": 1}) is None


def _write(payload: bytes, calls: list):
    def build(d: Path) -> dict:
        calls.append(1)
        (d / "data.bin").write_bytes(payload)
        return {"n": len(payload)}

    return build


@pytest.mark.parametrize("damage", ["truncate", "flip-a-byte", "drop-manifest"])
def test_a_corrupted_entry_is_detected_and_rebuilt(damage):
    calls: list = []
    key = {"damage": damage}
    entry = cache.get_or_build("test", key, _write(b"0123456789" * 1000, calls))
    assert entry.info == {"n": 10_000} and calls == [1]
    assert cache.get_or_build("test", key, _write(b"", calls)).file("data.bin").read_bytes()[:10] == b"0123456789"
    assert calls == [1]  # the second call was a hit
    data = entry.file("data.bin")
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:5000])
    elif damage == "flip-a-byte":
        raw = bytearray(data.read_bytes())
        raw[1234] ^= 0xFF
        data.write_bytes(bytes(raw))
        cache._VERIFIED.clear()  # as a new process would: it has not hashed this entry yet
    else:
        entry.file(cache.MANIFEST).unlink()
    assert cache.lookup("test", key) is None
    rebuilt = cache.get_or_build("test", key, _write(b"0123456789" * 1000, calls))
    assert calls == [1, 1] and rebuilt.file("data.bin").read_bytes() == b"0123456789" * 1000
    assert [e.ok for e in cache.entries() if e.kind == "test" and e.digest == cache.digest(key)] == [True]


def _slow_builder(args):
    cache_root, marker = args
    os.environ["QUANTBENCH_CACHE_DIR"] = cache_root

    def build(d: Path) -> dict:
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough for the other process to find the entry missing and wait
        (d / "data.bin").write_bytes(b"shared")
        return {}

    return cache.get_or_build("test", {"shared": True}, build).file("data.bin").read_bytes()


def test_two_processes_build_an_entry_once(tmp_path):
    marker = tmp_path / "builds.txt"
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        out = pool.map(_slow_builder, [(str(cache.cache_dir()), str(marker))] * 2)
    assert out == [b"shared", b"shared"]
    assert len(marker.read_text().split()) == 1  # the second waited on the lock, then found it built


def _reference(model) -> Reference:
    info = ModelInfo("tiny", "directory", "/nowhere", "0" * 64, model.config.model_type, 256, model.config.vocab_size)
    return Reference(model=model, tokenizer=None, info=info, dtype="fp32", device=torch.device("cpu"))


@pytest.mark.parametrize("spec", ["int:bits=4,group=16,sym=false", "absmax:bits=8,granularity=channel", "bf16",
                                  "gguf-mix:Q4_K_M"])
def test_saved_variant_restores_bit_for_bit(tmp_path, tiny_model, spec):
    ref = _reference(tiny_model)  # Llama (nn.Linear) and GPT-2 (Conv1D, weights transposed)
    variant = parse_method(spec).build(ref)
    assert saveable(variant, ref.model)
    info = save_variant(variant, ref.model, tmp_path)
    restored = load_variant(tmp_path, info, ref.model)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(variant.logits(ids), restored.logits(ids))
    assert restored.weight_bytes() == variant.weight_bytes()
    assert restored.layer_specs == variant.layer_specs and restored.n_weights == variant.n_weights
    full = sum(t.numel() * t.element_size() for t in variant.model.state_dict().values())
    if spec.startswith("gguf-mix"):  # a quantized embedding (and a head tied to it) come back as such
        kinds = [sorted(type(m).__name__ for m in v.model.modules() if isinstance(m, (QEmbedding, TiedQLinear)))
                 for v in (variant, restored)]
        assert kinds[0] == kinds[1] and "QEmbedding" in kinds[0]
    elif spec != "bf16":  # only what differs from the reference is written
        assert (tmp_path / "variant.safetensors").stat().st_size < 0.75 * full


def test_reference_logits_are_cached_and_rebuilt_when_truncated(tiny_model_dirs):
    cfg = RunConfig(model=tiny_model_dirs["llama"], tokens=128, context=32, calib_samples=0)
    first = Session(cfg)
    path = first.ref_logits.path
    want = first.ref_logits.window(3).clone()
    assert path.parent.parent.name == "reference" and (path.parent / cache.MANIFEST).is_file()
    stamp = path.stat().st_mtime_ns
    assert Session(cfg).ref_logits.path == path and path.stat().st_mtime_ns == stamp  # a hit
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    again = Session(cfg)  # detected by size against the manifest and rebuilt
    assert torch.equal(again.ref_logits.window(3), want)


def test_cache_cli_lists_and_clears(capsys):
    cache.put_json("row", {"cli": 1}, {"x": 1}, label="int:bits=4 of tiny")
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "int:bits=4 of tiny" in out and "ok" in out
    assert main(["cache", "clear", "--kind", "row"]) == 0
    assert cache.get_json("row", {"cli": 1}) is None
    assert "MB freed" in capsys.readouterr().out


def test_variant_keys_hash_what_makes_variants_not_what_measures_them(tmp_path):
    """An edit to the evaluation changes the rows' code version and keeps the variants' (GPTQ,
    AWQ and mixed are not rebuilt for a change in scoring); an edit to a format changes both."""
    src = Path(cache.__file__).parent
    closure = cache.source_closure(src, cache.VARIANT_ROOTS)
    assert {"methods/gptq.py", "formats/integer.py", "formats/kquants.py", "backends/bnb.py", "sources/text.py",
            "layers.py", "persist.py", "spec.py", "__init__.py"} <= closure
    assert not closure & {"eval/metrics.py", "eval/quality.py", "run.py", "cli.py", "report.py", "cached.py"}

    tree = tmp_path / "quantbench"
    shutil.copytree(src, tree, ignore=shutil.ignore_patterns("__pycache__"))
    before = cache.tree_hash(tree), cache.tree_hash(tree, cache.VARIANT_ROOTS)
    with open(tree / "eval" / "metrics.py", "a") as f:
        f.write("# an edit to the scoring\n")
    after_eval = cache.tree_hash(tree), cache.tree_hash(tree, cache.VARIANT_ROOTS)
    assert after_eval[0] != before[0] and after_eval[1] == before[1]
    with open(tree / "formats" / "integer.py", "a") as f:
        f.write("# an edit to a format\n")
    after_format = cache.tree_hash(tree), cache.tree_hash(tree, cache.VARIANT_ROOTS)
    assert after_format[0] != after_eval[0] and after_format[1] != after_eval[1]


def test_source_closure_follows_relative_imports_inside_functions(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import a\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from ..b import g\n    import pkg.c\n")
    (pkg / "b.py").write_text("")
    (pkg / "c.py").write_text("from .sub import a\n")
    (pkg / "d.py").write_text("import os\n")  # imported by no one
    assert cache.source_closure(pkg, ("pkg.sub",)) == {"__init__.py", "sub/__init__.py", "sub/a.py", "b.py", "c.py"}


def test_an_evaluation_edit_keeps_the_cached_variant_and_remeasures_the_row(tiny_model_dirs, monkeypatch):
    session = Session(RunConfig(model=tiny_model_dirs["llama"], tokens=128, context=32, calib_samples=0))
    spec = parse_method("int:bits=4,group=16,sym=false")
    versions = {(): "full-1", cache.VARIANT_ROOTS: "variant-1"}
    monkeypatch.setattr(cache, "code_version", lambda *roots: versions[roots])
    first_row = cached.row_key(session, spec)
    assert cached.variant(session, spec)[2] is False  # built and stored
    versions[()] = "full-2"  # the scoring changed
    assert cached.variant(session, spec)[2] is True
    assert cached.row_key(session, spec) != first_row
    versions[cache.VARIANT_ROOTS] = "variant-2"  # a format changed
    assert cached.variant(session, spec)[2] is False


def test_row_measures_once_then_reads_the_cache_and_closes_what_it_built(tiny_model_dirs, monkeypatch):
    session = Session(RunConfig(model=tiny_model_dirs["gpt2"], tokens=128, context=32, calib_samples=0))
    spec = parse_method("int:bits=4,group=16,sym=false")
    closed = []
    build = session.build

    def build_and_watch(s):
        v, seconds = build(s)
        close = v.close
        monkeypatch.setattr(v, "close", lambda: (closed.append(s), close()))
        return v, seconds

    monkeypatch.setattr(session, "build", build_and_watch)
    first, hit = cached.row(session, spec)
    assert not hit and closed == [spec] and cache.lookup("variant", cached.variant_key(session, spec)) is not None
    monkeypatch.setattr(session, "build", lambda s: pytest.fail("a warm row must not build its variant"))
    again, hit = cached.row(session, spec)
    assert hit and again["kld_mean"] == first["kld_mean"] and again["weight_bytes"] == first["weight_bytes"]
    assert [r["kld_mean"] for r in session.doc["results"]] == [first["kld_mean"]] * 2  # both in the session's doc
