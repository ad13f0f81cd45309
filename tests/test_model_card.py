"""Every upq checkpoint directory carries a model card built from what it records."""

from __future__ import annotations

import json
from pathlib import Path

from upq.checkpoint import save_quantized
from upq.grids import GridSpec
from upq.model_card import CARD_NAME, EVAL_NAME, record_evaluation
from upq.ptq.rtn import rtn_quantize


def _result(metrics: dict) -> dict:
    return {"model": "x", "reference": "org/base-model", "settings": {"tasks": list(metrics)},
            "machine": {"cpu": "Test CPU", "gpu": None}, "metrics": metrics, "timings_s": {"total": 1.0}}


def test_card_describes_the_checkpoint_and_its_evaluations(tiny_model, tmp_path: Path) -> None:
    model, tokenizer = tiny_model
    rtn_quantize(model, GridSpec("seq", 2, 32))
    ckpt = save_quantized(model, tmp_path / "ckpt", tokenizer, method="rtn", extra={"source_model": "org/base-model"})
    card = (ckpt / CARD_NAME).read_text()
    assert card.startswith("---\nbase_model: org/base-model\n")
    assert "| bits | 2 |" in card and "| group size | 32 |" in card and "| quantized linears | 14 (not quantized: lm_head) |" in card
    mib = (ckpt / "model.safetensors").stat().st_size / 2**20
    assert f"| weight files | {mib:.1f} MiB |" in card
    assert "Not evaluated yet" in card

    record_evaluation(ckpt, _result({"ppl": {"ppl": 31.25, "tokens": 4096}}))
    record_evaluation(ckpt, _result({"kl": {"kl": 1.4421, "top1_agreement": 0.512}}))
    card = (ckpt / CARD_NAME).read_text()
    assert "| perplexity (4096 held-out tokens) | 31.250 |" in card  # the earlier task is kept
    assert "| KL(org/base-model ‖ this model) per response token | 1.4421 |" in card and "| 0.512 |" in card
    assert "Test CPU" in card
    recorded = json.loads((ckpt / EVAL_NAME).read_text())
    assert set(recorded["metrics"]) == {"ppl", "kl"} and recorded["measured_with"]["ppl"]["settings"] == {"tasks": ["ppl"]}
