"""Block-wise PTQ on a tiny model: it lowers block MSE, packs, and resumes exactly after a crash."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blockwise_helpers import assert_resume_is_bit_identical
from upq.checkpoint import save_quantized
from upq.ptq.blockwise import BlockResult, BlockwiseConfig, blockwise_ptq, packed_layer_count

pytestmark = pytest.mark.usefixtures("tiny_text_source")


@pytest.fixture
def tiny_text_source(tmp_path: Path, monkeypatch) -> Path:
    """A local text corpus so tests never need the bundled Wikipedia dump."""
    corpus = tmp_path / "corpus.txt"
    words = "the quick brown fox jumps over the lazy dog while two bits give four levels".split()
    gen = torch.Generator().manual_seed(0)
    docs = [" ".join(words[i] for i in torch.randint(0, len(words), (80,), generator=gen).tolist()) for _ in range(40)]
    corpus.write_text("\n\n".join(docs))
    return corpus


def _cfg(corpus: Path, **overrides) -> BlockwiseConfig:
    """fp32 unless overridden: ``auto`` would mean bf16 on CPUs with native bf16 and fp32 elsewhere."""
    base = dict(samples=8, seq_len=32, epochs=2, batch_size=4, lr_weight=1e-3, lr_scale=1e-2, calib_source=str(corpus),
                mixed_precision="no")
    return BlockwiseConfig(**(base | overrides))


def test_blockwise_lowers_mse_and_packs(tiny_model_dir: Path, tiny_text_source: Path, tmp_path: Path) -> None:
    model, tokenizer, results = blockwise_ptq(str(tiny_model_dir), _cfg(tiny_text_source, bits=2), tmp_path / "work")
    assert len(results) == 2 and packed_layer_count(model) == 14
    assert all(r.mse_after < r.mse_before for r in results)
    with torch.no_grad():
        logits = model(torch.randint(3, 100, (1, 12))).logits
    assert torch.isfinite(logits).all()
    save_quantized(model, tmp_path / "out", tokenizer, method="blockwise-ptq")


def test_bf16_autocast_takes_effect_and_still_lowers_mse(tiny_model_dir: Path, tiny_text_source: Path,
                                                         tmp_path: Path) -> None:
    _, _, fp32 = blockwise_ptq(str(tiny_model_dir), _cfg(tiny_text_source, bits=2), tmp_path / "fp32")
    bf16_cfg = _cfg(tiny_text_source, bits=2, mixed_precision="bf16")
    _, _, bf16 = blockwise_ptq(str(tiny_model_dir), bf16_cfg, tmp_path / "bf16")
    assert all(r.mse_after < r.mse_before for r in bf16)
    assert [r.mse_after for r in bf16] != [r.mse_after for r in fp32]
    assert [r.mse_after for r in bf16] == pytest.approx([r.mse_after for r in fp32], rel=0.2)


def test_resume_after_crash_equals_uninterrupted(tiny_model_dir: Path, tiny_text_source: Path, tmp_path: Path) -> None:
    assert_resume_is_bit_identical(tiny_model_dir, _cfg(tiny_text_source, bits=4, group_size=32), tmp_path)


def test_work_dir_of_another_run_is_refused(tiny_model_dir: Path, tiny_text_source: Path, tmp_path: Path) -> None:
    blockwise_ptq(str(tiny_model_dir), _cfg(tiny_text_source, epochs=0), tmp_path / "w")
    with pytest.raises(RuntimeError, match="different run"):
        blockwise_ptq(str(tiny_model_dir), _cfg(tiny_text_source, epochs=1), tmp_path / "w")


def test_disk_activations_match_memory(tiny_model_dir: Path, tiny_text_source: Path, tmp_path: Path) -> None:
    _, _, mem = blockwise_ptq(str(tiny_model_dir), _cfg(tiny_text_source), tmp_path / "m")
    _, _, disk = blockwise_ptq(str(tiny_model_dir), _cfg(tiny_text_source, activations="disk"), tmp_path / "d")
    assert [r.mse_after for r in mem] == [r.mse_after for r in disk]


def test_bad_config_is_clear() -> None:
    with pytest.raises(ValueError, match="train must be"):
        BlockwiseConfig(train=("biases",))
    with pytest.raises(ValueError, match="activations"):
        BlockwiseConfig(activations="gpu")
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        BlockwiseConfig(mixed_precision="fp16")


def test_resume_with_disk_activations(tiny_model_dir: Path, tiny_text_source: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_text_source, activations="disk", epochs=1)
    _, _, full = blockwise_ptq(str(tiny_model_dir), cfg, tmp_path / "a")

    def crash(result: BlockResult) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        blockwise_ptq(str(tiny_model_dir), cfg, tmp_path / "b", on_block_done=crash)
    _, _, resumed = blockwise_ptq(str(tiny_model_dir), cfg, tmp_path / "b")
    assert [r.mse_after for r in resumed] == [r.mse_after for r in full]


def test_chat_calibration_rows_are_the_teachers_cached_answers(tiny_model_dir: Path, tiny_text_source: Path,
                                                               tmp_path: Path, monkeypatch) -> None:
    from transformers import AutoTokenizer

    from upq.data.prompts import load_prompts
    from upq.data.teacher_answers import ChatSettings, answer_rows, teacher_responses
    from upq.models import load_model
    from upq.ptq.blockwise import calibration_ids

    monkeypatch.setenv("UPQ_CACHE", str(tmp_path / "cache"))
    short = ChatSettings(max_new_tokens=8)  # fast answers from the tiny model
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = calibration_ids(tokenizer, _cfg(tiny_text_source, samples=6, seq_len=16, chat_fraction=0.5, chat=short),
                          str(tiny_model_dir))
    text_only = calibration_ids(tokenizer, _cfg(tiny_text_source, samples=3, seq_len=16), str(tiny_model_dir))
    cache = list((tmp_path / "cache" / "distill-data").glob("chat-*.json"))
    assert ids.shape == (6, 16) and len(cache) == 1
    assert torch.equal(ids[:3], text_only)
    # the chat rows are the original model's answers to the training prompts, from the cache distillation shares
    model, _ = load_model(str(tiny_model_dir))
    answers = teacher_responses(model, tokenizer, load_prompts("train"), short, cache[0].parent)
    assert torch.equal(ids[3:], answer_rows(answers, 16, 3))
    assert ids[3, 0] == answers[0]["prompt_ids"][0]
    # answers too short for the rows asked for: text fills in
    available = len(answer_rows(answers, 32, 10_000))
    many = calibration_ids(tokenizer, _cfg(tiny_text_source, samples=available + 5, seq_len=32, chat_fraction=1.0,
                                           chat={"max_new_tokens": 8}), str(tiny_model_dir))
    assert many.shape == (available + 5, 32) and torch.equal(many[5:], answer_rows(answers, 32, available))


def test_calibration_chat_rows_extend_with_self_instruct_pairs(tiny_model_dir: Path, tiny_text_source: Path,
                                                               tmp_path: Path, monkeypatch) -> None:
    from transformers import AutoTokenizer

    from upq.data.prompts import load_prompts
    from upq.data.self_instruct import SelfInstructSettings
    from upq.data.teacher_answers import ChatSettings, answer_rows, teacher_responses
    from upq.models import load_model
    from upq.ptq import blockwise

    monkeypatch.setenv("UPQ_CACHE", str(tmp_path / "cache"))
    short = ChatSettings(max_new_tokens=8)
    pairs = [{"instruction": f"write {i}", "prompt_ids": [5, 6, i], "response_ids": [7] * 40, "finished": True}
             for i in range(30)]
    calls = []

    def fake_pairs(model, tokenizer, count, settings, answer, cache):
        calls.append((count, settings, answer))
        return pairs[:count]

    monkeypatch.setattr(blockwise, "self_instruct_pairs", fake_pairs)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model, _ = load_model(str(tiny_model_dir))
    answers = teacher_responses(model, tokenizer, load_prompts("train"), short, tmp_path / "cache" / "distill-data")
    available = len(answer_rows(answers, 32, 10_000))
    cfg = _cfg(tiny_text_source, samples=available + 5, seq_len=32, chat_fraction=1.0, chat=short, self_instruct=30,
               self_instruct_settings={"max_new_tokens": 16})
    ids = blockwise.calibration_ids(tokenizer, cfg, str(tiny_model_dir))
    # the bundled answers first, then the teacher-written pairs fill the rows text used to fill
    assert calls == [(30, SelfInstructSettings(max_new_tokens=16), short)]
    assert ids.shape == (available + 5, 32) and torch.equal(ids, answer_rows([*answers, *pairs], 32, available + 5))
    assert (ids[available + 1 :] == 7).any(dim=1).all()
    with pytest.raises(ValueError, match="chat_fraction"):
        _cfg(tiny_text_source, self_instruct=4)
    with pytest.raises(ValueError, match=">= 0"):
        _cfg(tiny_text_source, chat_fraction=1.0, self_instruct=-1)
