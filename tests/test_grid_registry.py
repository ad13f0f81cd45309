"""A new grid is one registered class in one file: quantize -> pack -> save -> load -> export, nothing else edited."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import toy_grid  # noqa: F401  registers the "ternary" grid
import upq
from upq.checkpoint import save_quantized
from upq.grids import GRIDS, GridSpec
from upq.modules import PackedLinear
from upq.ptq.rtn import rtn_quantize


def test_toy_grid_round_trips_through_every_format(tiny_model, tmp_path: Path) -> None:
    model, tokenizer = tiny_model
    spec = GridSpec("ternary", 2, 32)
    rtn_quantize(model, spec)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, PackedLinear) and set(layer.quantized().codes.unique().tolist()) <= {0, 1, 2}
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        packed_logits = model(ids).logits
    ckpt = save_quantized(model, tmp_path / "ckpt", tokenizer, dense_dtype=None)

    reloaded = upq.load(ckpt)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, packed_logits)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)(ids).logits, packed_logits)

    plain = AutoModelForCausalLM.from_pretrained(upq.export(ckpt, tmp_path / "hf", dtype="float32"))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, packed_logits, atol=1e-4)

    report = upq.export(ckpt, tmp_path / "toy.gguf", format="gguf")
    linears = [t for t in report.tensors if t.grid == spec.describe()]
    assert len(linears) == 14 and {t.gguf_type for t in linears} == {"Q4_1"}  # its affine form, exactly
    assert max(t.max_abs_error for t in linears) < 1e-3


def test_grid_choices_and_errors_come_from_the_registry() -> None:
    assert {"seq", "asym", "r2q", "ternary"} <= set(GRIDS)
    with pytest.raises(ValueError, match="supports bits"):
        GridSpec("ternary", 4)
    with pytest.raises(ValueError, match="unknown grid 'nope'"):
        GridSpec("nope", 2)
    assert GRIDS["ternary"].is_affine and not GRIDS["r2q"].is_affine and GRIDS["ternary"].kernel_id is None
