"""After ``import upq``, plain ``AutoModelForCausalLM.from_pretrained`` opens a packed upq checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import upq
from upq.checkpoint import save_quantized
from upq.grids import GridSpec
from upq.models import load_model
from upq.modules import PackedLinear
from upq.ptq.rtn import rtn_quantize

from conftest import build_tiny_model, build_tiny_tokenizer


def _checkpoint(tmp_path: Path, spec: GridSpec, tied: bool) -> Path:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer), seed=3)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    rtn_quantize(model, spec)
    return save_quantized(model, tmp_path / "ckpt", tokenizer)


@pytest.mark.parametrize(("spec", "tied"), [(GridSpec("seq", 2, 32), False), (GridSpec("asym", 4, 32), True),
                                            (GridSpec("r2q", 2, 32), False)], ids=["seq2", "asym4-tied", "r2q"])
def test_from_pretrained_equals_upq_load(tmp_path: Path, spec: GridSpec, tied: bool) -> None:
    ckpt = _checkpoint(tmp_path, spec, tied)
    ours = upq.load(ckpt)
    theirs = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    packed = [m for m in theirs.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == len(ours.upq_config["modules"]) == 14
    assert theirs.upq_config["grid"] == spec.grid and theirs.upq_config["files"] == ours.upq_config["files"]
    if tied:
        assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ours(ids).logits)


def test_default_dtype_runs_and_saving_is_refused(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, GridSpec("seq", 2, 32), tied=False)
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    ids = torch.randint(3, 200, (1, 8))
    with torch.no_grad():
        reference = upq.load(ckpt)(ids).logits
        logits = model(ids).logits.float()
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "again")


def test_plain_transformers_models_are_untouched(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    reference, _ = load_model(str(tiny_model_dir))
    assert torch.equal(model.lm_head.weight.float(), reference.lm_head.weight)
