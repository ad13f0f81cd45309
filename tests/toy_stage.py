"""A toy recipe stage, registered from this one file: scale every packed layer's scales by ``factor``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from upq.checkpoint import load, load_tokenizer, save_quantized
from upq.modules import PackedLinear
from upq.stages import PREVIOUS, StageContext, StageKind, register_stage


@dataclass
class ScaleStage:
    """Multiply the scales of the checkpoint ``start`` (default: the previous stage's) by ``factor``."""

    factor: float = 1.0
    start: str | None = None

    def __post_init__(self) -> None:
        if self.factor <= 0:
            raise ValueError(f"factor must be positive, got {self.factor}")


def run_scale_stage(cfg: ScaleStage, context: StageContext) -> dict[str, Any]:
    model = load(context.previous(cfg.start, "checkpoint", "toy-scale"))
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    with torch.no_grad():
        for layer in layers:
            layer.scale.mul_(cfg.factor)
    save_quantized(model, context.out, load_tokenizer(context.checkpoint), method="toy-scale",
                   extra={"source_model": model.upq_config.get("source_model")})
    return {"layers": len(layers)}


register_stage(StageKind("toy-scale", ScaleStage, run_scale_stage, recipe_defaults=lambda v: v.setdefault("start", PREVIOUS)))
