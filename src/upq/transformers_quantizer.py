"""Let plain transformers open upq checkpoints: ``AutoModelForCausalLM.from_pretrained(upq_dir)``.

``import upq`` registers a quantization config and an ``HfQuantizer`` for ``quant_method: "upq"``
with transformers. Before the weights load, the quantizer swaps the recorded linears for empty
:class:`~upq.modules.PackedLinear` layers, so transformers fills their packed codes and scales
straight from ``model.safetensors``: the model runs the packed kernels, exactly as
:func:`upq.load` does. Saving such a model with ``save_pretrained`` is refused (write upq
checkpoints with :func:`upq.checkpoint.save_quantized`), and it cannot be trained.

Tools that call ``from_pretrained`` themselves (lm-evaluation-harness's ``hf`` model, vLLM-style
loaders) work once ``upq`` is imported in the same process; ``upq lm-eval`` does that for
lm-eval.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import QUANT_METHOD, install_packed_skeletons


class UpqQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a upq checkpoint, as transformers holds it (every key kept)."""

    def __init__(self, modules: dict[str, dict[str, Any]] | None = None, **fields: Any) -> None:
        fields.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.modules = modules or {}
        for key, value in fields.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        """Every recorded field, as in ``config.json``."""
        return dict(self.__dict__)


class UpqHfQuantizer(HfQuantizer):
    """Loads pre-quantized upq checkpoints into ``PackedLinear`` layers (no on-the-fly quantization)."""

    requires_calibration = True
    quantization_config: UpqQuantizationConfig

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
        if not self.quantization_config.modules:
            raise ValueError("this upq quantization_config lists no quantized modules; the checkpoint is incomplete")
        install_packed_skeletons(model, self.quantization_config.modules)

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        model.upq_config = self.quantization_config.to_dict()
        return model

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the upq config and quantizer with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(UpqQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(UpqHfQuantizer)
