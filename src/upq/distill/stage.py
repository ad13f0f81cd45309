"""The ``distill`` recipe stage: Distill-QAT from the previous stage's checkpoint (progressive) or the float model."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..models import BUNDLED_MODEL
from ..stages import PREVIOUS, StageContext, StageKind, register_stage
from .config import DistillConfig


def run_distill_stage(cfg: DistillConfig, context: StageContext) -> dict[str, Any]:
    """Fill in what the recipe leaves to the pipeline (start checkpoint, latent weights, models), then train."""
    from .trainer import distill

    if cfg.student_init == "progressive":
        cfg = replace(cfg, int4_dir=context.previous(cfg.int4_dir, "checkpoint", "distill"),
                      latent_from=context.previous(cfg.latent_from, "latent", "distill"))
    elif cfg.model is None:
        cfg = replace(cfg, model=context.float_model)
    if cfg.teacher is None:
        cfg = replace(cfg, teacher=context.model or BUNDLED_MODEL)
    result = distill(cfg, context.out, context.stage_dir / "train")
    return {"steps": len(result.losses), "final_loss": result.losses[-1] if result.losses else None,
            **{k: v for k, v in result.summary.items() if isinstance(v, (int, float, str, type(None)))}}


def _progressive_starts_from_previous(values: dict[str, Any]) -> None:
    if values.get("student_init", "progressive") == "progressive":
        values.setdefault("int4_dir", PREVIOUS)


register_stage(StageKind("distill", DistillConfig, run_distill_stage, recipe_defaults=_progressive_starts_from_previous))
