"""quantbench: quantize causal language models every common way and measure each variant against
its reference on the same tokens."""

__version__ = "0.1.0"

from .formats import QTensor, dequantize, quantize_tensor  # noqa: E402

__all__ = ["QTensor", "__version__", "dequantize", "quantize_tensor"]
