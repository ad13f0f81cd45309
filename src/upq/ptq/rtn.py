"""Round-to-nearest: quantize every selected linear with its grid's initial parameters, no data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from torch import nn

from ..grids import GridSpec
from ..modules import pack_model, quantize_model
from ..stages import StageContext, StageKind, register_stage


@dataclass
class RTNStage:
    """Round to nearest on any grid (the ``rtn`` recipe stage)."""

    grid: str = "seq"
    bits: int = 2
    group_size: int | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None


def rtn_quantize(
    model: nn.Module,
    spec: GridSpec,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    pack: bool = True,
) -> list[str]:
    """Quantize ``model`` in place with RTN on ``spec``; packed storage form unless ``pack=False``."""
    names = quantize_model(model, spec, include, exclude)
    if pack:
        pack_model(model)
    return names


def run_rtn_stage(cfg: RTNStage, context: StageContext) -> dict[str, Any]:
    """The ``rtn`` stage: quantize the float model and save the packed checkpoint."""
    from ..checkpoint import save_quantized
    from ..models import BUNDLED_MODEL, load_model

    model, tokenizer = load_model(context.float_model)
    names = rtn_quantize(model, GridSpec(cfg.grid, cfg.bits, cfg.group_size), cfg.include, cfg.exclude)
    save_quantized(model, context.out, tokenizer, method="rtn", extra={"source_model": context.model or BUNDLED_MODEL})
    return {"layers": len(names)}


register_stage(StageKind("rtn", RTNStage, run_rtn_stage))
