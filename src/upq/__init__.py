"""upq: Unified Progressive Quantization for instruction-tuned LLMs (FP16 -> INT4 -> INT2)."""

__version__ = "0.1.0"

from .api import evaluate, export, quantize  # noqa: E402
from .checkpoint import load  # noqa: E402
from .transformers_quantizer import register as _register_with_transformers  # noqa: E402

_register_with_transformers()

__all__ = ["quantize", "evaluate", "export", "load", "__version__"]
