"""upq.quantize / upq.export take what the CLI takes and produce the same checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import upq
from upq.recipes.schema import RecipeError


def _qc(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


def test_quantize_with_dict_or_cli_overrides_gives_the_same_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    a = upq.quantize(str(tiny_model_dir), recipe="rtn-int2", out=tmp_path / "a", overrides={"rtn.group_size": 32})
    b = upq.quantize(str(tiny_model_dir), recipe="rtn-int2", out=tmp_path / "b", overrides=["rtn.group_size=32"])
    assert (_qc(a)["group_size"], _qc(a)["bits"], _qc(a)["method"]) == (32, 2, "rtn-int2")
    tensors_a, tensors_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert tensors_a.keys() == tensors_b.keys() and all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
    assert not (tmp_path / "a.work").exists()


def test_quantize_rejects_bad_override_keys(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="name the stage kind first"):
        upq.quantize(str(tiny_model_dir), recipe="rtn-int2", out=tmp_path / "x", overrides={"bits": 4})
    with pytest.raises(RecipeError, match="does not have"):
        upq.quantize(str(tiny_model_dir), recipe="rtn-int2", out=tmp_path / "x", overrides={"distill.beta": 0.3})
    assert not (tmp_path / "x").exists()


def test_export_hf_and_bad_format(tiny_model_dir: Path, tmp_path: Path) -> None:
    ckpt = upq.quantize(str(tiny_model_dir), recipe="rtn-int4", out=tmp_path / "q")
    out = upq.export(ckpt, tmp_path / "hf", format="hf", dtype="float32")
    plain = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(3, 200, (1, 10))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, upq.load(ckpt)(ids).logits, atol=1e-4)
    with pytest.raises(ValueError, match="unknown export format"):
        upq.export(ckpt, tmp_path / "x", format="onnx")
