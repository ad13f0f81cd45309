"""A new stage kind is one registered class in one file: recipes validate it and the pipeline runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import toy_stage  # noqa: F401  registers the "toy-scale" stage
import upq
from upq.modules import PackedLinear
from upq.recipes.schema import RecipeError, load_recipe
from upq.stages import stage_kinds

RECIPE = "name: toy\nstages:\n  - {stage: rtn, bits: 4, group_size: 32}\n  - {stage: toy-scale, factor: 0.5}\n"


def _scales(model) -> list[torch.Tensor]:
    return [m.scale.float() for m in model.modules() if isinstance(m, PackedLinear)]


def test_toy_stage_runs_in_a_recipe(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert {"rtn", "clip", "ptq", "int2-blocks", "distill", "toy-scale"} <= set(stage_kinds())
    (tmp_path / "toy.yaml").write_text(RECIPE)
    out = upq.quantize(str(tiny_model_dir), recipe=str(tmp_path / "toy.yaml"), out=tmp_path / "toy", keep_work=True)
    before = _scales(upq.load(tmp_path / "toy.work" / "0-rtn" / "out"))
    after = _scales(upq.load(out))
    assert len(after) == 14 and all(torch.equal(a, b * 0.5) for a, b in zip(after, before))
    summary = upq.load(out).upq_config["stages"][1]
    assert (summary["stage"], summary["layers"]) == ("toy-scale", 14)


def test_toy_stage_is_validated_like_the_built_ins(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(RECIPE.replace("factor: 0.5", "factr: 0.5"))
    with pytest.raises(RecipeError, match="factr"):
        load_recipe(str(tmp_path / "bad.yaml"))
    (tmp_path / "neg.yaml").write_text(RECIPE)
    with pytest.raises(RecipeError, match="factor must be positive"):
        load_recipe(str(tmp_path / "neg.yaml"), overrides={"toy-scale.factor": -1})
