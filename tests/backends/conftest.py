"""Fixtures for the backend tests: the tiny models as references and as F32 GGUF files."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_refs(tiny_model_dirs):
    """The tiny Llama and GPT-2 loaded as quantbench references (float32, CPU)."""
    from quantbench.sources import load_reference

    return {arch: load_reference(d) for arch, d in tiny_model_dirs.items()}


@pytest.fixture(scope="session")
def tiny_f32_gguf(tiny_refs, tmp_path_factory) -> dict[str, str]:
    """Each tiny reference exported to an F32 GGUF file."""
    from quantbench.backends.gguf_export import export_reference

    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for arch, ref in tiny_refs.items():
        out[arch] = str(d / f"{arch}-f32.gguf")
        export_reference(ref, out[arch])
    return out
