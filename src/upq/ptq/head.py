"""Quantize the output head (``lm_head``) of a packed checkpoint, untied from the input embedding.

At batch-1 decode the float ``lm_head`` of a small model is the largest weight read per token
(SmolLM2-135M: 49152 x 576, 113 MB in float32). Packing it on a 4-bit grid that the native
kernel runs cuts that read eightfold; the embedding keeps its float weights (a lookup reads one
row). Its quality cost is measured separately from the body's (``bench/results/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..grids import GridSpec
from ..modules import pack_model, quantize_model
from ..stages import PREVIOUS, StageContext, StageKind, register_stage

HEAD_PATTERN = r"(^|\.)lm_head$"


@dataclass
class HeadStage:
    """RTN of ``lm_head`` on its own grid (the ``lm-head`` stage); ``start``: the checkpoint (default: the previous stage's)."""

    grid: str = "asym"
    bits: int = 4
    group_size: int | None = 64
    start: str | None = None

    def __post_init__(self) -> None:
        GridSpec(self.grid, self.bits, self.group_size)  # validates


@torch.no_grad()
def quantize_head(model: nn.Module, spec: GridSpec) -> str:
    """Untie ``lm_head`` from the input embedding if needed, then quantize and pack it in place; returns its name."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the output head is {type(head).__name__}, not a float nn.Linear (already quantized?)")
    if head.weight is model.get_input_embeddings().weight:
        untied = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, dtype=head.weight.dtype)
        untied.weight.copy_(head.weight)
        if head.bias is not None:
            untied.bias.copy_(head.bias)
        model.set_output_embeddings(untied)
        model.config.tie_word_embeddings = False
    names = quantize_model(model, spec, include=[HEAD_PATTERN], exclude=[])
    pack_model(model)
    return names[0]


def run_head_stage(cfg: HeadStage, context: StageContext) -> dict[str, Any]:
    """The ``lm-head`` stage: load the checkpoint, pack its head, save it with the same provenance."""
    from ..checkpoint import load, load_tokenizer, save_quantized

    start = context.previous(cfg.start, "checkpoint", "lm-head")
    model = load(start)
    qc = dict(model.upq_config)
    spec = GridSpec(cfg.grid, cfg.bits, cfg.group_size)
    quantize_head(model, spec)
    keep = {k: v for k, v in qc.items() if k not in {"quant_method", "method", "grid", "bits", "group_size", "modules",
                                                        "modules_not_quantized", "upq_version", "recipe", "files"}}
    save_quantized(model, context.out, load_tokenizer(start), method=qc.get("method", "upq"), recipe=qc.get("recipe"),
                   extra={**keep, "lm_head": spec.describe()})
    return {"lm_head": spec.describe()}


register_stage(StageKind("lm-head", HeadStage, run_head_stage, recipe_defaults=lambda v: v.setdefault("start", PREVIOUS)))
