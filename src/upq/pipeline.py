"""Run a recipe: load -> stages -> packed checkpoint, resuming whichever stage was interrupted.

Each stage writes into ``WORK/<index>-<kind>/``: its own resumable work directory and its output
(``out/``: a upq checkpoint, or for the clip stage a plain transformers model), then a
``DONE.json`` summary. A re-run skips finished stages and resumes the interrupted one. The final
checkpoint is the last quantizing stage's output, copied to ``--out`` with the recipe and every
stage summary added to its ``quantization_config`` (provenance).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from .atomic import atomic_dir, write_json_atomic
from .logs import get_logger
from .model_card import write_model_card
from .models import BUNDLED_MODEL
from .recipes.schema import Recipe
from .stages import StageContext, stage_kinds

log = get_logger("pipeline")


def run_recipe(recipe: Recipe, model_name: str | None, out: str | Path, work_dir: str | Path | None = None,
               device: str = "cpu", keep_work: bool = False) -> Path:
    """Run every stage of ``recipe`` on ``model_name`` (None = bundled) and write the packed model to ``out``."""
    out = Path(out)
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    _check_same_run(work, recipe, model_name)
    kinds = stage_kinds()
    context = StageContext(model=model_name, float_model=model_name, checkpoint=None, latent=None, stage_dir=work,
                           device=device)
    summaries = []
    for index, stage in enumerate(recipe.stages):
        kind = kinds[stage.kind]
        context.stage_dir = work / f"{index}-{stage.kind}"
        done_file = context.stage_dir / "DONE.json"
        if done_file.is_file():
            summary = json.loads(done_file.read_text())
            log.info("stage %d (%s) already done, skipping", index, stage.kind)
        else:
            context.stage_dir.mkdir(parents=True, exist_ok=True)
            log.info("stage %d/%d: %s", index + 1, len(recipe.stages), stage.kind)
            started = time.perf_counter()
            details = kind.run(stage.config, context)
            summary = {"index": index, "stage": stage.kind, "seconds": round(time.perf_counter() - started, 1), **details}
            write_json_atomic(done_file, summary)
        summaries.append(summary)
        if kind.produces == "float_model":
            context.float_model = str(context.out)
        else:
            context.checkpoint = context.out
            context.latent = context.stage_dir / kind.latent_dir if kind.latent_dir else None
    if context.checkpoint is None:
        raise ValueError(f"recipe {recipe.name!r} has no stage that produces a quantized checkpoint")
    _publish(context.checkpoint, out, recipe, summaries, model_name)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _check_same_run(work: Path, recipe: Recipe, model_name: str | None) -> None:
    marker = work / "recipe.json"
    identity = {"model": model_name or BUNDLED_MODEL, "recipe": recipe.as_dict()}
    if marker.is_file():
        if json.loads(marker.read_text()) != json.loads(json.dumps(identity, default=str)):
            raise RuntimeError(f"{work} holds a run of another recipe or model; delete it or pass another --work-dir")
    else:
        write_json_atomic(marker, identity)


def _publish(checkpoint: Path, out: Path, recipe: Recipe, summaries: list[dict[str, Any]], source: str | None) -> None:
    """Copy the final checkpoint to ``out`` with the recipe and stage summaries in its config."""
    with atomic_dir(out) as tmp:
        for item in checkpoint.iterdir():
            shutil.copy2(item, tmp / item.name)
        config = json.loads((tmp / "config.json").read_text())
        qc = config["quantization_config"]
        qc["method"] = recipe.name
        qc["recipe"] = recipe.as_dict()
        qc["stages"] = summaries
        qc["source_model"] = source or BUNDLED_MODEL
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        write_model_card(tmp)
