"""llama.cpp as a variant: quantbench's metrics on llama.cpp's logits, files, errors, cleanup."""

from __future__ import annotations

import math
import shutil
import struct
import tempfile
import time

import numpy as np
import pytest
import torch

from quantbench.eval.speed import measure_speed
from quantbench.methods import parse_method
from quantbench.spec import SpecError

from . import needs_llama_cpp

FAST = dict(tokens=256, context=64, calib_samples=4, calib_len=32, generate=False, decode_tokens=8, batch_size=2)


class _SelfTimedVariant:
    """A variant whose library reports its own speed (as LlamaCppVariant does)."""

    device = torch.device("cpu")

    def logits(self, ids):
        return torch.zeros(*ids.shape, 8)

    def generate(self, ids, n):
        time.sleep(0.002 * n)  # a token costs time, so our own timer has a difference to measure
        return [0] * n

    def own_speed(self, window, prompt, n):
        assert window.shape == (1, 16) and prompt.shape == (1, 16) and n == 4
        return {"prefill_tokens_per_s": 123.0, "decode_tokens_per_s": 45.0, "source": "lib"}


def test_speed_prefers_the_variants_own_measurement_and_keeps_ours():
    s = measure_speed(_SelfTimedVariant(), torch.zeros(2, 16, dtype=torch.long), batch_size=2, decode_tokens=4)
    assert (s.prefill_tokens_per_s, s.decode_tokens_per_s, s.speed_source) == (123.0, 45.0, "lib")
    assert s.timer_prefill_tokens_per_s > 0 and s.timer_decode_tokens_per_s > 0


@pytest.mark.parametrize(
    "spec, match",
    [
        ("llamacpp:type=Q9_K", "not a llama.cpp file type; choose one of .*Q4_K_M"),
        ("llamacpp:type=IQ2_XS", "needs an importance matrix"),
        ("llamacpp:type=F32,imatrix=calib", "applies to quantized types"),
        ("llamacpp:type=Q8_0,ubatch=0", "ubatch >= 1"),
    ],
    ids=["unknown-type", "iq2-without-imatrix", "imatrix-on-f32", "bad-ubatch"],
)
@needs_llama_cpp
def test_spec_errors(spec, match):
    with pytest.raises(SpecError, match=match):
        parse_method(spec)


@needs_llama_cpp
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_run_scores_llama_cpp_variants_with_the_same_metrics(arch, tiny_model_dirs):
    """The F32 export scores like the torch reference; Q8_0 is close; llama.cpp's own speed
    counters are reported next to ours; weights and file sizes come from the GGUF file."""
    from quantbench.run import RunConfig, run

    doc = run(RunConfig(model=tiny_model_dirs[arch], **FAST), ["llamacpp:type=F32", "llamacpp:type=Q8_0"])
    f32, q8 = doc["results"]
    assert abs(f32["ln_ppl_ratio"]) < 1e-5 and f32["kld_mean"] < 1e-6 and f32["top1_agreement"] == 1.0
    assert 0 < q8["kld_mean"] < 1e-3 and q8["weight_bytes"] < f32["weight_bytes"] / 2
    assert f32["weight_bytes"] == 4 * f32["n_weights"]  # F32: 4 bytes per weight, tied head stored once
    assert f32["artifact_bytes"] > f32["weight_bytes"]  # plus the tokenizer and metadata
    for r in (f32, q8):
        assert r["speed_source"] == "llama.cpp" and r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert r["timer_prefill_tokens_per_s"] > 0
    emb = "model.embed_tokens" if arch == "llama" else "transformer.wte"
    assert q8["layer_specs"][emb] == "gguf:Q8_0"  # named by torch module, typed by llama.cpp


@needs_llama_cpp
def test_temporary_files_are_removed_on_close_unless_kept(tiny_refs, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    spec = parse_method("llamacpp:type=Q8_0")
    v = spec.build(tiny_refs["llama"])
    assert len(list((tmp_path / "tmp").iterdir())) == 1  # the variant's directory, while it lives
    v.close()
    assert list((tmp_path / "tmp").iterdir()) == []
    keep = tmp_path / "kept" / "model.gguf"
    v = parse_method(f"llamacpp:type=Q8_0,keep={keep}").build(tiny_refs["llama"])
    v.close()
    assert keep.is_file() and list((tmp_path / "tmp").iterdir()) == []
    import quantbench.backends.llamacpp_quantize as lq

    def fail(*a, **k):
        raise RuntimeError("quantizer failed")

    monkeypatch.setattr(lq, "quantize_gguf", fail)
    with pytest.raises(RuntimeError, match="quantizer failed"):
        spec.build(tiny_refs["llama"])
    assert list((tmp_path / "tmp").iterdir()) == []  # a failed build leaves nothing behind either


@needs_llama_cpp
def test_temporaries_of_killed_runs_are_swept(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from quantbench.backends.llamacpp_quantize import TMP_PREFIX, sweep_stale_temporaries

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    (tmp_path / f"{TMP_PREFIX}{int(dead)}-abc").mkdir()  # its process has exited: stale
    (tmp_path / f"{TMP_PREFIX}{os.getpid()}-def").mkdir()  # ours, alive: kept
    assert [p.name for p in sweep_stale_temporaries()] == [f"{TMP_PREFIX}{int(dead)}-abc"]
    assert [p.name for p in tmp_path.iterdir()] == [f"{TMP_PREFIX}{os.getpid()}-def"]


@needs_llama_cpp
def test_corrupt_truncated_and_unknown_gguf_files_give_clear_errors(tiny_f32_gguf, tmp_path):
    from gguf import GGUFWriter

    from quantbench.backends.llamacpp import GGUFFileError, LlamaCppVariant

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFFileError, match="is not a GGUF file"):
        LlamaCppVariant(junk, "x")
    cut = tmp_path / "cut.gguf"
    data = open(tiny_f32_gguf["llama"], "rb").read()
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GGUFFileError, match="is a corrupt or truncated GGUF file"):
        LlamaCppVariant(cut, "x")
    w = GGUFWriter(tmp_path / "alien.gguf", "nosucharch")
    w.add_tensor("w", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFFileError, match="could not load .*architecture 'nosucharch'.*unknown model architecture"):
        LlamaCppVariant(tmp_path / "alien.gguf", "x")
    with pytest.raises(GGUFFileError, match="does not exist"):
        LlamaCppVariant(tmp_path / "missing.gguf", "x")


@needs_llama_cpp
def test_vocabulary_that_does_not_match_the_model(tiny_f32_gguf):
    from quantbench.backends.llamacpp import GGUFFileError, LlamaCppVariant

    with pytest.raises(GGUFFileError, match="vocabulary has 512 tokens but the model expects 600"):
        LlamaCppVariant(tiny_f32_gguf["llama"], "x", expected_vocab=600)



@needs_llama_cpp
def test_counters_out_buffer_and_own_speed(tiny_f32_gguf):
    """llama.cpp's counters see what ran inside the block (prefill batches, single-token steps)
    and nothing else; logits written into `out` are the logits returned fresh."""
    from quantbench.backends.llamacpp import LlamaCppVariant

    v = LlamaCppVariant(tiny_f32_gguf["llama"], "x")
    try:
        ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
        with v.counters() as idle:  # before any context exists: nothing to count, and no crash
            pass
        assert math.isnan(idle["prefill_tokens_per_s"]) and math.isnan(idle["decode_tokens_per_s"])
        with v.counters() as c:
            fresh = v.logits(ids)
        assert c["prefill_tokens_per_s"] > 0 and math.isnan(c["decode_tokens_per_s"])
        with v.counters() as idle:  # a context that exists, and nothing run in the block
            pass
        assert math.isnan(idle["prefill_tokens_per_s"]) and math.isnan(idle["decode_tokens_per_s"])
        out = torch.full((2, 40, 512), float("nan"))
        assert v.logits(ids, out=out) is out and torch.equal(out, fresh)
        with pytest.raises(ValueError, match=r"need \(2, 40, 512\) torch.float32"):
            v.logits(ids, out=torch.empty(2, 40, 511))
        own = v.own_speed(ids[:1], ids[:1, :8], 4)
        assert own["prefill_tokens_per_s"] > 0 and own["decode_tokens_per_s"] > 0 and own["source"] == "llama.cpp"
    finally:
        v.close()

def _write_imatrix_files(tmp_path, values: dict[str, np.ndarray], counts: int):
    """The same importance matrix as llama-imatrix's GGUF file and as its legacy .dat file."""
    from gguf import GGUFWriter

    w = GGUFWriter(tmp_path / "imatrix.gguf", "imatrix")
    for name, v in values.items():
        w.add_tensor(f"{name}.in_sum2", (v * counts).astype(np.float32))
        w.add_tensor(f"{name}.counts", np.array([counts], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    blob = struct.pack("<i", len(values))
    for name, v in values.items():
        blob += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", counts, v.size)
        blob += (v * counts).astype("<f4").tobytes()
    (tmp_path / "imatrix.dat").write_bytes(blob)


@needs_llama_cpp
def test_importance_matrix_files_and_calibration(tiny_refs, tiny_f32_gguf, tmp_path):
    from gguf import GGUFReader

    from quantbench.backends.imatrix import from_calibration, load_imatrix
    from quantbench.backends.llamacpp_quantize import quantize_gguf

    ref = tiny_refs["llama"]
    names = {"model.layers.0.mlp.down_proj": "blk.0.ffn_down.weight", "model.layers.1.self_attn.q_proj": "blk.1.attn_q.weight"}
    calib = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(0))
    imx = from_calibration(ref.model, calib, names)
    x = []  # by hand: the input of one layer, captured, squared, averaged over every token
    h = ref.model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: x.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.inference_mode():
        for row in calib:
            ref.model(row[None])
    h.remove()
    want = torch.cat(x).pow(2).mean(0).numpy()
    np.testing.assert_allclose(imx["blk.0.ffn_down.weight"], want, rtol=1e-5)
    assert imx["blk.1.attn_q.weight"].shape == (64,)

    _write_imatrix_files(tmp_path, imx, counts=48)
    for f in ("imatrix.gguf", "imatrix.dat"):
        back = load_imatrix(tmp_path / f)
        for k in imx:
            np.testing.assert_allclose(back[k], imx[k], rtol=1e-6)
    # the matrix reaches llama.cpp's quantizer: the weighted tensors change, the others do not
    quantize_gguf(tiny_f32_gguf["llama"], tmp_path / "plain.gguf", "Q4_0")
    quantize_gguf(tiny_f32_gguf["llama"], tmp_path / "weighted.gguf", "Q4_0", load_imatrix(tmp_path / "imatrix.gguf"))
    plain = {t.name: np.asarray(t.data) for t in GGUFReader(tmp_path / "plain.gguf").tensors}
    weighted = {t.name: np.asarray(t.data) for t in GGUFReader(tmp_path / "weighted.gguf").tensors}
    assert not np.array_equal(plain["blk.0.ffn_down.weight"], weighted["blk.0.ffn_down.weight"])
    assert np.array_equal(plain["blk.0.ffn_up.weight"], weighted["blk.0.ffn_up.weight"])


@needs_llama_cpp
def test_imatrix_calib_method_needs_calibration(tiny_refs):
    with pytest.raises(SpecError, match="needs calibration data"):
        parse_method("llamacpp:type=Q4_K_M,imatrix=calib").build(tiny_refs["llama"])


@needs_llama_cpp
def test_source_type_needs_a_gguf_reference(tiny_refs, tiny_f32_gguf, tmp_path):
    from quantbench.sources import load_reference

    with pytest.raises(SpecError, match="needs a reference loaded from a .gguf file"):
        parse_method("llamacpp:type=source").build(tiny_refs["llama"])
    shutil.copy(tiny_f32_gguf["llama"], tmp_path / "m.gguf")
    ref = load_reference(str(tmp_path / "m.gguf"))
    v = parse_method("llamacpp:type=source").build(ref)
    v.close()
    assert (tmp_path / "m.gguf").is_file()  # the reference's own file is never deleted


@needs_llama_cpp
@pytest.mark.slow
def test_embedded_model_f32_perplexity_agrees_with_torch_within_half_a_percent():
    """llama.cpp's perplexity of the F32 export of the embedded model, under the llama.cpp
    protocol, against the torch reference's on the same tokens, through the same metrics code."""
    from quantbench.run import RunConfig, run

    cfg = RunConfig(tokens=1024, context=512, protocol="llama.cpp", calib_samples=0, measure_speed=False, generate=False)
    doc = run(cfg, ["fp32", "llamacpp:type=F32"])
    ref, f32 = doc["results"]
    assert abs(f32["ppl"] / ref["ppl"] - 1) < 0.005
    assert f32["kld_mean"] < 1e-3 and f32["top1_agreement"] > 0.99


def test_llama_cpp_extra_cpu_buffers_are_off_where_the_cpu_has_amx(monkeypatch):
    """llama.cpp's AMX kernels crash on the embedded model (see `default_repack`): a variant loads
    its weights without the extra CPU buffers on an AMX CPU, and with them elsewhere."""
    from quantbench.backends import llamacpp

    for amx in (True, False):
        monkeypatch.setattr(llamacpp, "cpu_has_amx", lambda amx=amx: amx)
        assert llamacpp.default_repack() is not amx
