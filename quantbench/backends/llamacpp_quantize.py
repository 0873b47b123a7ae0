"""The `llamacpp` method: the reference exported to GGUF, quantized by llama.cpp, run by llama.cpp.

    llamacpp:type=Q4_K_M                   export at F32 to a temporary directory, quantize with
                                           llama.cpp's own quantizer (llama_model_quantize, through
                                           llama-cpp-python's binding), evaluate the result
    llamacpp:type=F32                      the F32 export itself
    llamacpp:type=Q4_K_M,imatrix=FILE      with an importance matrix from llama-imatrix (GGUF or .dat)
    llamacpp:type=IQ2_XS,imatrix=calib     with one measured on quantbench's calibration tokens
    llamacpp:type=source                   the GGUF file the reference was loaded from, unchanged
    ...,keep=PATH                          keep the GGUF file at PATH; otherwise every temporary
                                           file is deleted when the variant is closed (and the
                                           next build removes those of runs that were killed)

`type` is any llama.cpp file type (llama.h's `llama_ftype`, the names `llama-quantize` accepts:
Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, Q3_K_M, Q2_K, IQ4_NL, ...). The mixture of tensor types a
file type implies (which tensors get more bits) is llama.cpp's decision, recorded per tensor in
the variant's layer_specs. Quantization is llama.cpp's: the rounding, the search over scales and
the fallbacks for rows that are not a whole number of 256-blocks are libllama's.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..layers import count_weights
from ..methods import register_method
from ..sources import Calibration, Reference
from ..spec import SpecError, format_config
from .gguf_export import export_reference
from .imatrix import Imatrix, as_c_array, from_calibration, load_imatrix
from .llamacpp import LlamaCppVariant, _Log, cores

# llama-quantize refuses these without an importance matrix (tools/quantize/quantize.cpp: "Please
# do not use IQ1_S, IQ1_M, IQ2_S, IQ2_XXS, IQ2_XS or Q2_K_S quantization without an importance matrix").
NEED_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_S", "IQ2_XXS", "IQ2_XS", "Q2_K_S")


def file_types() -> dict[str, int]:
    """llama.cpp's file types by the names llama-quantize uses, from the installed library."""
    import llama_cpp

    out = {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32}
    for attr in dir(llama_cpp):
        if attr.startswith("LLAMA_FTYPE_MOSTLY_"):
            out[attr.removeprefix("LLAMA_FTYPE_MOSTLY_")] = getattr(llama_cpp, attr)
    return out


@dataclass(frozen=True)
class LlamaCppConfig:
    type: str = "Q4_K_M"  # a llama.cpp file type, F32 (export only) or source (the reference's GGUF)
    imatrix: str | None = None  # a llama-imatrix file, or "calib" to measure one on the calibration tokens
    keep: str | None = None  # keep the GGUF file here instead of deleting it on close
    threads: int = 0  # 0: every core this process may use
    ubatch: int = 32  # tokens per llama_decode call (bounds llama.cpp's logits buffers; see llamacpp.py)

    def __post_init__(self) -> None:
        if self.type != "source" and importlib.util.find_spec("llama_cpp") is not None:
            valid = file_types()
            if self.type not in valid:
                raise SpecError(f"llamacpp: type={self.type!r} is not a llama.cpp file type; choose one of "
                                f"{', '.join(sorted(valid))} or source")
        if self.type in NEED_IMATRIX and not self.imatrix:
            raise SpecError(f"llamacpp: type={self.type} needs an importance matrix (imatrix=FILE or imatrix=calib), "
                            "as llama-quantize requires")
        if self.type in ("F32", "source") and self.imatrix:
            raise SpecError(f"llamacpp: imatrix= applies to quantized types, not type={self.type}")
        if self.type == "source" and self.keep:
            raise SpecError("llamacpp: keep= has nothing to keep with type=source (the file is the reference's own)")
        if self.threads < 0 or self.ubatch < 1:
            raise SpecError("llamacpp: threads must be >= 0 and ubatch >= 1")


def quantize_gguf(src: str | Path, dst: str | Path, type: str, imatrix: Imatrix | None = None, threads: int = 0) -> None:
    """llama.cpp's quantizer on a GGUF file: `src` (F32/F16/BF16) -> `dst` of file type `type`."""
    import llama_cpp

    ftypes = file_types()
    if type not in ftypes:
        raise SpecError(f"{type!r} is not a llama.cpp file type; choose one of {', '.join(sorted(ftypes))}")
    _Log.install()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[type]
    params.nthread = threads or cores()
    keep = None
    if imatrix:
        arr, keep = as_c_array(imatrix)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    del keep  # the buffers the imatrix array pointed into, alive until here
    if rc != 0:
        Path(dst).unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not quantize {src} to {type}: {_Log.tail()}")


def _imatrix(cfg: LlamaCppConfig, ref: Reference, calib: Calibration | None, names: dict[str, str]) -> Imatrix | None:
    if not cfg.imatrix:
        return None
    if cfg.imatrix != "calib":
        return load_imatrix(cfg.imatrix)
    if calib is None:
        raise SpecError("llamacpp: imatrix=calib needs calibration data (run with --calib-samples > 0)")
    weights = {module: g for g, module in names.items() if g.endswith(".weight")}
    return from_calibration(ref.model, calib.input_ids, weights)


TMP_PREFIX = "quantbench-llamacpp-"


def sweep_stale_temporaries() -> list[Path]:
    """Remove temporary directories left by runs that were killed before they could clean up
    (their names carry the pid of the process that made them); returns what was removed."""
    removed = []
    for d in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*-*"):
        pid = d.name.removeprefix(TMP_PREFIX).split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def build_llamacpp(ref: Reference, cfg: LlamaCppConfig, calib: Calibration | None) -> LlamaCppVariant:
    name = format_config(cfg, "llamacpp")
    vocab = ref.model.get_input_embeddings().weight.shape[0]
    common = dict(n_weights=count_weights(ref.model), expected_vocab=vocab, threads=cfg.threads, ubatch=cfg.ubatch)
    if cfg.type == "source":
        if not ref.info.gguf_file:
            raise SpecError(f"llamacpp:type=source needs a reference loaded from a .gguf file; {ref.info.source!r} is not")
        return LlamaCppVariant(ref.info.gguf_file, name, **common)
    sweep_stale_temporaries()
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-"))
    try:
        f32 = tmp / "model-F32.gguf"
        names = export_reference(ref, f32)  # GGUF tensor name -> torch module name
        out = f32
        if cfg.type != "F32":
            out = tmp / f"model-{cfg.type}.gguf"
            quantize_gguf(f32, out, cfg.type, _imatrix(cfg, ref, calib, names), cfg.threads)
            f32.unlink()
        if cfg.keep:
            dest = Path(cfg.keep).expanduser()
            dest.parent.mkdir(parents=True, exist_ok=True)
            out = Path(shutil.move(str(out), str(dest)))
        variant = LlamaCppVariant(out, name, cleanup=(tmp,), **common)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    variant.layer_specs = {names.get(k, k): v for k, v in variant.layer_specs.items()}
    return variant


@register_method("llamacpp")
class LlamaCpp:
    config_type = LlamaCppConfig
    description = "llama.cpp (llama-cpp-python): GGUF export, llama.cpp's quantizer and runtime"
    requires = ("llama_cpp",)
    build = staticmethod(build_llamacpp)
