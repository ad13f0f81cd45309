"""The lm-head stage packs the output head (untied from the embedding) and every loader runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import upq
from upq.modules import PackedLinear

from conftest import build_tiny_model, build_tiny_tokenizer


@pytest.fixture
def tied_model_dir(tmp_path: Path) -> Path:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer), seed=5)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "tied")
    tokenizer.save_pretrained(tmp_path / "tied")
    return tmp_path / "tied"


def test_lm_head_stage_unties_packs_and_loads_everywhere(tied_model_dir: Path, tmp_path: Path) -> None:
    body = upq.quantize(str(tied_model_dir), recipe="rtn-int4", out=tmp_path / "body", overrides={"rtn.group_size": 32})
    both = upq.quantize(str(tied_model_dir), recipe="rtn-int4", out=tmp_path / "both", add_stages=["lm-head"],
                        overrides={"rtn.group_size": 32, "lm-head.group_size": 32})
    model = upq.load(both)
    assert isinstance(model.lm_head, PackedLinear) and model.lm_head.spec.describe() == "asym-w4-g32"
    assert not isinstance(model.model.embed_tokens.weight, PackedLinear) and not model.config.tie_word_embeddings
    qc = model.upq_config
    assert (qc["bits"], qc["group_size"], qc["lm_head"]) == (4, 32, "asym-w4-g32") and "lm_head" in qc["modules"]
    assert [s["stage"] for s in qc["stages"]] == ["rtn", "lm-head"]
    # a tied head was not stored before; its packed copy adds about a quarter of the bf16 embedding
    added = (both / "model.safetensors").stat().st_size - (body / "model.safetensors").stat().st_size
    embedding_bytes = model.model.embed_tokens.weight.numel() * 2
    assert 0.25 * embedding_bytes < added < 0.4 * embedding_bytes

    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        packed = model(ids).logits
        reference = upq.load(body)(ids).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(both, dtype=torch.float32)(ids).logits, packed)
    error = (packed - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.2  # the head is really quantized, and close to its float self


def test_lm_head_stage_refuses_a_packed_head(tiny_model_dir: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nstages:\n  - {stage: rtn, bits: 4, exclude: []}\n  - {stage: lm-head}\n")
    with pytest.raises(ValueError, match="already quantized"):
        upq.quantize(str(tiny_model_dir), recipe=str(recipe), out=tmp_path / "x")


def test_packed_head_exports_to_gguf_as_its_own_tensor(tied_model_dir: Path, tmp_path: Path) -> None:
    both = upq.quantize(str(tied_model_dir), recipe="rtn-int4", out=tmp_path / "both", add_stages=["lm-head"],
                        overrides={"rtn.group_size": 32, "lm-head.group_size": 32})
    report = upq.export(both, tmp_path / "m.gguf", format="gguf")
    output = next(t for t in report.tensors if t.name == "output.weight")
    assert output.gguf_type == "Q4_1" and output.max_abs_error < 1e-3


def test_clip_search_head_differs_from_rtn_and_needs_asym(tied_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"paragraph {i}: the quick brown fox jumps over the lazy dog {i}." for i in range(64)))
    common = {"rtn.group_size": 32, "lm-head.group_size": 32}
    plain = upq.quantize(str(tied_model_dir), recipe="rtn-int4", out=tmp_path / "plain", add_stages=["lm-head"],
                         overrides=common)
    clipped = upq.quantize(str(tied_model_dir), recipe="rtn-int4", out=tmp_path / "clipped", add_stages=["lm-head"],
                           overrides={**common, "lm-head.clip_search": True, "lm-head.calib_source": str(corpus),
                                      "lm-head.samples": 4, "lm-head.seq_len": 32})
    a, b = upq.load(plain).lm_head, upq.load(clipped).lm_head
    assert not torch.equal(a.scale, b.scale)  # some group ranges were clipped
    assert torch.equal(upq.load(plain).model.layers[0].mlp.up_proj.qweight, upq.load(clipped).model.layers[0].mlp.up_proj.qweight)
    with pytest.raises(Exception, match="asymmetric"):
        upq.quantize(str(tied_model_dir), recipe="rtn-int4", out=tmp_path / "x", add_stages=["lm-head"],
                     overrides={"lm-head.grid": "seq", "lm-head.clip_search": True})
