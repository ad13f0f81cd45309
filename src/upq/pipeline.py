"""Run a recipe: load -> stages -> packed checkpoint, resuming whichever stage was interrupted.

Each stage writes into ``WORK/<index>-<kind>/``: its own resumable work directory and its output
(``out/``: a upq checkpoint, or for the clip stage a plain transformers model), then a
``DONE.json`` summary. A re-run skips finished stages and resumes the interrupted one. The final
checkpoint is the last quantizing stage's output, copied to ``--out`` with the recipe and every
stage summary added to its ``quantization_config`` (provenance).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

from .atomic import atomic_dir, write_json_atomic
from .checkpoint import save_quantized
from .grids import GridSpec
from .logs import get_logger
from .model_card import write_model_card
from .models import BUNDLED_MODEL, load_model
from .recipes.schema import PREVIOUS, ClipStage, Recipe, RTNStage

log = get_logger("pipeline")


def _run_rtn(cfg: RTNStage, model_name: str | None, out: Path) -> dict[str, Any]:
    from .ptq.rtn import rtn_quantize

    model, tokenizer = load_model(model_name)
    names = rtn_quantize(model, GridSpec(cfg.grid, cfg.bits, cfg.group_size), cfg.include, cfg.exclude)
    save_quantized(model, out, tokenizer, method="rtn", extra={"source_model": model_name or BUNDLED_MODEL})
    return {"layers": len(names)}


def _run_clip(cfg: ClipStage, model_name: str | None, out: Path) -> dict[str, Any]:
    from .data.text import load_texts, token_blocks
    from .ptq.clip import apply_clip_search

    model, tokenizer = load_model(model_name)
    ids = token_blocks(load_texts(cfg.calib_source, "train"), tokenizer, cfg.seq_len, cfg.samples)
    changed = apply_clip_search(model, ids, GridSpec(cfg.grid, cfg.bits, cfg.group_size), cfg.include, cfg.exclude,
                                cfg.skip, cfg.tokens_per_layer)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {"layers": len(changed), "mean_fraction_clamped": sum(changed.values()) / max(len(changed), 1)}


def _run_ptq(cfg: Any, model_name: str | None, out: Path, work: Path, device: str) -> dict[str, Any]:
    from .ptq.blockwise import blockwise_ptq

    model, tokenizer, blocks = blockwise_ptq(model_name, cfg, work / "blocks", device=device)
    save_quantized(model, out, tokenizer, method="blockwise-ptq", recipe=dataclasses.asdict(cfg),
                   extra={"source_model": model_name or BUNDLED_MODEL, "blocks": [dataclasses.asdict(b) for b in blocks]})
    return {"blocks": len(blocks), "mse_before_mean": sum(b.mse_before for b in blocks) / len(blocks),
            "mse_after_mean": sum(b.mse_after for b in blocks) / len(blocks)}


def _run_distill(cfg: Any, work: Path, out: Path) -> dict[str, Any]:
    from .distill.trainer import distill

    result = distill(cfg, out, work / "train")
    return {"steps": len(result.losses), "final_loss": result.losses[-1] if result.losses else None,
            **{k: v for k, v in result.summary.items() if isinstance(v, (int, float, str, type(None)))}}


def run_recipe(recipe: Recipe, model_name: str | None, out: str | Path, work_dir: str | Path | None = None,
               device: str = "cpu", keep_work: bool = False) -> Path:
    """Run every stage of ``recipe`` on ``model_name`` (None = bundled) and write the packed model to ``out``."""
    out = Path(out)
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    _check_same_run(work, recipe, model_name)
    source = model_name
    float_model = model_name
    last_checkpoint: Path | None = None
    last_latent: Path | None = None  # the work directory of the last block stage, while its checkpoint is the last
    summaries = []
    for index, stage in enumerate(recipe.stages):
        stage_dir = work / f"{index}-{stage.kind}"
        stage_out = stage_dir / "out"
        done_file = stage_dir / "DONE.json"
        if done_file.is_file():
            summary = json.loads(done_file.read_text())
            log.info("stage %d (%s) already done, skipping", index, stage.kind)
        else:
            stage_dir.mkdir(parents=True, exist_ok=True)
            log.info("stage %d/%d: %s", index + 1, len(recipe.stages), stage.kind)
            started = time.perf_counter()
            if stage.kind == "rtn":
                details = _run_rtn(stage.config, float_model, stage_out)
            elif stage.kind == "clip":
                details = _run_clip(stage.config, float_model, stage_out)
            elif stage.kind in ("ptq", "int2-blocks"):
                cfg = stage.config
                if cfg.init_from == PREVIOUS:
                    if last_checkpoint is None:
                        raise ValueError(f"stage {index} ({stage.kind}) starts from the previous stage but no earlier stage made a checkpoint")
                    cfg = dataclasses.replace(cfg, init_from=str(last_checkpoint))
                details = _run_ptq(cfg, float_model, stage_out, stage_dir, device)
            else:
                cfg = dataclasses.replace(stage.config)
                if cfg.student_init == "progressive":
                    if cfg.int4_dir == PREVIOUS:
                        if last_checkpoint is None:
                            raise ValueError(f"stage {index} (distill) is progressive but no earlier stage made a checkpoint")
                        cfg.int4_dir = str(last_checkpoint)
                    if cfg.latent_from == PREVIOUS:
                        if last_latent is None:
                            raise ValueError(f"stage {index} (distill) takes latent weights from the previous stage, "
                                             "which is not a block-wise (ptq / int2-blocks) stage")
                        cfg.latent_from = str(last_latent)
                elif cfg.model is None:
                    cfg.model = float_model
                if cfg.teacher is None:
                    cfg.teacher = source or BUNDLED_MODEL
                details = _run_distill(cfg, stage_dir, stage_out)
            summary = {"index": index, "stage": stage.kind, "seconds": round(time.perf_counter() - started, 1), **details}
            write_json_atomic(done_file, summary)
        summaries.append(summary)
        if stage.kind == "clip":
            float_model = str(stage_out)
        else:
            last_checkpoint = stage_out
            last_latent = stage_dir / "blocks" if stage.kind in ("ptq", "int2-blocks") else None
    if last_checkpoint is None:
        raise ValueError(f"recipe {recipe.name!r} has no stage that produces a quantized checkpoint")
    _publish(last_checkpoint, out, recipe, summaries, source)
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
