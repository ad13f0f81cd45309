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
    """RTN of ``lm_head`` on its own grid (the ``lm-head`` stage); ``start``: the checkpoint (default: the previous stage's).

    ``clip_search`` (asymmetric grid only): before rounding, clip each group's range by
    BitDistiller's output-aware search (:mod:`upq.ptq.clip`) on ``tokens`` final hidden states
    of ``samples`` x ``seq_len`` calibration tokens from ``calib_source``.
    """

    grid: str = "asym"
    bits: int = 4
    group_size: int | None = 32
    start: str | None = None
    clip_search: bool = False
    calib_source: str = "wiki"
    samples: int = 16
    seq_len: int = 256
    tokens: int = 64

    def __post_init__(self) -> None:
        GridSpec(self.grid, self.bits, self.group_size)  # validates
        if self.clip_search and self.grid != "asym":
            raise ValueError("clip_search is defined for the asymmetric grid")


@torch.no_grad()
def quantize_head(model: nn.Module, spec: GridSpec, calibration: torch.Tensor | None = None, tokens: int = 256) -> str:
    """Untie ``lm_head`` from the input embedding if needed, then quantize and pack it in place; returns its name.

    With ``calibration`` token ids, the head's weight groups are first clipped by the
    output-aware search on ``tokens`` of its inputs (asymmetric grid).
    """
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
    if calibration is not None:
        from .clip import apply_clip_search

        apply_clip_search(model, calibration, spec, include=[HEAD_PATTERN], exclude=[], skip=[], tokens_per_layer=tokens)
    names = quantize_model(model, spec, include=[HEAD_PATTERN], exclude=[])
    pack_model(model)
    return names[0]


def run_head_stage(cfg: HeadStage, context: StageContext) -> dict[str, Any]:
    """The ``lm-head`` stage: load the checkpoint, pack its head, save it with the same provenance."""
    from ..checkpoint import load, load_tokenizer, provenance, save_quantized

    start = context.previous(cfg.start, "checkpoint", "lm-head")
    model = load(start)
    qc = model.upq_config
    spec = GridSpec(cfg.grid, cfg.bits, cfg.group_size)
    tokenizer = load_tokenizer(start)
    calibration = None
    if cfg.clip_search:
        from ..data.text import load_texts, token_blocks

        calibration = token_blocks(load_texts(cfg.calib_source, "train"), tokenizer, cfg.seq_len, cfg.samples)
    quantize_head(model, spec, calibration, cfg.tokens)
    save_quantized(model, context.out, tokenizer, method=qc.get("method", "upq"), recipe=qc.get("recipe"),
                   extra={**provenance(qc), "lm_head": spec.describe()})
    return {"lm_head": spec.describe()}


register_stage(StageKind("lm-head", HeadStage, run_head_stage, recipe_defaults=lambda v: v.setdefault("start", PREVIOUS)))
