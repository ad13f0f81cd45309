"""Recipe schema validation, and every shipped recipe end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import upq
from upq.pipeline import run_recipe
from upq.recipes.schema import RecipeError, builtin_recipes, load_recipe

SHIPPED = ["upq", "upq-paper", "bitdistiller", "r2q", "direct-qat", "ntp-qat", "rtn-int2", "rtn-int4", "ptq-int4"]


def test_all_recipes_ship_and_validate() -> None:
    assert set(SHIPPED) <= set(builtin_recipes())
    for name in SHIPPED:
        for budget in ("cpu", "cpu-long", "gpu"):
            recipe = load_recipe(name, budget)
            assert recipe.stages and recipe.as_dict()["stages"][0]["stage"] == recipe.stages[0].kind


def _stage(recipe, kind: str):
    return next(s.config for s in recipe.stages if s.kind == kind)


def test_budget_and_overrides_apply() -> None:
    cpu = load_recipe("upq", "cpu")
    gpu = load_recipe("upq", "gpu")
    long = load_recipe("upq", "cpu-long")
    assert _stage(cpu, "ptq").samples < _stage(gpu, "ptq").samples
    assert _stage(cpu, "distill").tokens < _stage(long, "distill").tokens < _stage(gpu, "distill").tokens
    # cpu-long starts from the cpu settings and changes only what it names
    assert _stage(long, "ptq").samples == _stage(cpu, "ptq").samples
    assert _stage(long, "distill").data.seq_len == _stage(cpu, "distill").data.seq_len == 256
    tuned = load_recipe("upq", "cpu", ["distill.beta=0.25", "ptq.samples=7", "distill.data.kind=text",
                                       "int2-blocks.objective=mse", "distill.lr_scale=1e-4"])
    assert _stage(tuned, "distill").lr_scale == 1e-4  # YAML 1.1 reads 1e-4 as a string; accepted as a number
    assert _stage(tuned, "distill").beta == 0.25 and _stage(tuned, "ptq").samples == 7
    assert _stage(tuned, "distill").data.kind == "text" and _stage(tuned, "distill").data.seq_len == 256
    assert _stage(tuned, "int2-blocks").objective == "mse" and _stage(tuned, "int2-blocks").init_from == "@previous"


def test_yaml_1_1_words_stay_strings(tmp_path: Path) -> None:
    """``no`` / ``off`` are choices of string fields, not YAML 1.1 booleans; ``true`` / ``false`` are booleans."""
    assert _stage(load_recipe("upq", "cpu", ["distill.mixed_precision=no"]), "distill").mixed_precision == "no"
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ndescription: d\nstages:\n"
                    "  - {stage: distill, steps: 1, mixed_precision: no, cpu: false}\n")
    distill = _stage(load_recipe(str(path), "cpu"), "distill")
    assert distill.mixed_precision == "no" and distill.cpu is False
    with pytest.raises(RecipeError, match="expected a string"):
        load_recipe("upq", "cpu", ["distill.mixed_precision=false"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("ptq.smaples=3", r"stages\[0\]\(ptq\)\.smaples: unknown key"),
        ("ptq.samples=many", r"ptq\)\.samples: expected an integer"),
        ("distill.beta=[1]", r"distill\)\.beta: expected a number"),
        ("distill.beta=high", r"distill\)\.beta: expected a number"),
        ("distill.data.knd=text", r"data\.knd: unknown key"),
        ("distill.loss=mse", "unknown loss"),
        ("clip.bits=2", "clip: override/budget for a stage this recipe does not have"),
        ("beta=0.3", "name the stage kind first"),
        ("distill.beta=[0.3", "not valid YAML"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe("upq", "cpu", [override])


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="unknown recipe"):
        load_recipe("nope")
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nstagez: []\n")
    with pytest.raises(RecipeError, match="stagez: unknown top-level key"):
        load_recipe(str(path))
    path.write_text("name: x\nstages:\n  - stage: rtn\n    bits: two\n")
    with pytest.raises(RecipeError, match=r"stages\[0\]\(rtn\)\.bits: expected an integer"):
        load_recipe(str(path))
    path.write_text("name: x\nstages:\n  - stage: magic\n")
    with pytest.raises(RecipeError, match="must be one of"):
        load_recipe(str(path))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    gen = torch.Generator().manual_seed(0)
    words = "the quick brown fox jumps over the lazy dog and two bits give four levels".split()
    docs = [" ".join(words[i] for i in torch.randint(0, len(words), (120,), generator=gen).tolist()) for _ in range(40)]
    path.write_text("\n\n".join(docs))
    return path


TINY = [
    "ptq.samples=4", "ptq.seq_len=32", "ptq.epochs=1",
    "int2-blocks.samples=4", "int2-blocks.seq_len=32", "int2-blocks.epochs=1", "int2-blocks.chat.max_new_tokens=8",
    "distill.steps=3", "distill.tokens=null", "distill.batch_size=2", "distill.data.seq_len=128",
    "distill.data.chat.max_new_tokens=8", "distill.data.heldout_samples=2", "distill.save_every=2",
    "clip.samples=2", "clip.seq_len=32", "clip.tokens_per_layer=32",
]


@pytest.mark.parametrize("name", SHIPPED)
def test_recipe_end_to_end_on_tiny_model(name: str, tiny_model_dir: Path, corpus: Path, tmp_path: Path,
                                         monkeypatch) -> None:
    monkeypatch.setenv("UPQ_CACHE", str(tmp_path / "cache"))
    kinds = {s.kind for s in load_recipe(name).stages}
    overrides = [o for o in TINY if o.split(".")[0] in kinds]
    for kind in {"ptq", "int2-blocks"} & kinds:
        overrides.append(f"{kind}.calib_source={corpus}")
    if "clip" in kinds:
        overrides.append(f"clip.calib_source={corpus}")
    if "distill" in kinds:
        overrides.append(f"distill.data.text_source={corpus}")
    recipe = load_recipe(name, "cpu", overrides)
    out = run_recipe(recipe, str(tiny_model_dir), tmp_path / "out")
    model = upq.load(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 100, (1, 8))).logits).all()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["method"] == name and len(qc["stages"]) == len(recipe.stages)
    assert qc["recipe"]["name"] == name and qc["source_model"] == str(tiny_model_dir)
    assert not (tmp_path / "out.work").exists()


def _distill_config_given(recipe, model_dir: Path, tmp_path: Path, monkeypatch):
    """Run ``recipe`` up to its distill stage and return the config that stage is given (it is not run)."""
    monkeypatch.setenv("UPQ_CACHE", str(tmp_path / "cache"))
    seen = {}

    def fake_distill(cfg, out, work):
        seen["cfg"] = cfg
        raise KeyboardInterrupt

    monkeypatch.setattr("upq.distill.trainer.distill", fake_distill)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, str(model_dir), tmp_path / "out")
    return seen["cfg"]


def test_bitdistiller_teacher_is_the_original_not_the_clipped_model(tiny_model_dir: Path, corpus: Path,
                                                                     tmp_path: Path, monkeypatch) -> None:
    overrides = [o for o in TINY if o.startswith("clip.")] + [f"clip.calib_source={corpus}"]
    cfg = _distill_config_given(load_recipe("bitdistiller", "cpu", overrides), tiny_model_dir, tmp_path, monkeypatch)
    assert cfg.teacher == str(tiny_model_dir)
    assert cfg.model.endswith("0-clip/out")
    assert (tmp_path / "out.work" / "0-clip" / "DONE.json").is_file()  # finished stage kept for resume


def test_distill_takes_latent_weights_from_the_previous_block_stage(tiny_model_dir: Path, corpus: Path,
                                                                    tmp_path: Path, monkeypatch) -> None:
    overrides = [o for o in TINY if o.split(".")[0] in ("ptq", "int2-blocks")]
    overrides += [f"ptq.calib_source={corpus}", f"int2-blocks.calib_source={corpus}", "distill.latent_from=@previous"]
    cfg = _distill_config_given(load_recipe("upq", "cpu", overrides), tiny_model_dir, tmp_path, monkeypatch)
    assert cfg.int4_dir.endswith("1-int2-blocks/out")
    assert cfg.latent_from.endswith("1-int2-blocks/blocks")
    assert (Path(cfg.latent_from) / "latent-0000.safetensors").is_file()
    # a previous stage that keeps no latent weights is refused with the reason
    rtn_then_distill = tmp_path / "r.yaml"
    rtn_then_distill.write_text("name: r\nstages:\n  - {stage: rtn, bits: 4}\n"
                                "  - {stage: distill, latent_from: '@previous', steps: 1}\n")
    with pytest.raises(ValueError, match="not a block-wise"):
        run_recipe(load_recipe(str(rtn_then_distill)), str(tiny_model_dir), tmp_path / "out2")
