"""quantbench: quantize causal language models every common way and measure each variant against
its reference on the same tokens."""

__version__ = "0.1.0"

from .formats import QTensor, dequantize, quantize_tensor  # noqa: E402


def load_quantized(path, device="cpu"):
    """Load a model saved by `quantbench quantize` (see quantbench.artifacts)."""
    from .artifacts import load_quantized as _load

    return _load(path, device)


__all__ = ["QTensor", "__version__", "dequantize", "load_quantized", "quantize_tensor"]
