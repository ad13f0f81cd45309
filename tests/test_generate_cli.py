"""`upq generate` / `upq chat` and the streaming helpers, on the tiny model (plain and packed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from upq.cli import main
from upq.interactive import SamplingSettings, chat_loop, encode_chat, stream_generate


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UPQ_CACHE", str(tmp_path / "cache"))


def test_generate_plain_model_streams_and_reports(tiny_model_dir: Path, capsys) -> None:
    rc = main(["generate", str(tiny_model_dir), "--prompt", "What is two plus two?", "--max-new-tokens", "6",
               "--dtype", "float32"])
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.out.strip()  # streamed text
    assert "tokens/s" in captured.err


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_packed_checkpoint_native_equals_reference(tiny_model_dir: Path, tmp_path: Path, capsys,
                                                            cache: str) -> None:
    ckpt = tmp_path / "w2"
    assert main(["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--bits", "2", "--grid", "seq",
                 "--group-size", "32", "--out", str(ckpt), "--quiet"]) == 0
    capsys.readouterr()
    texts = {}
    for backend in ("reference", "native"):
        rc = main(["generate", str(ckpt), "--prompt", "Please list three fruits", "--max-new-tokens", "8",
                   "--backend", backend, "--dtype", "float32", "--cache", cache, "--quiet"])
        assert rc == 0
        texts[backend] = capsys.readouterr().out
    assert texts["native"] == texts["reference"]


def test_generate_no_chat_and_sampling(tiny_model, capsys) -> None:
    model, tokenizer = tiny_model
    ids = list(tokenizer("The quick brown")["input_ids"])
    settings = SamplingSettings(max_new_tokens=5, min_new_tokens=5, temperature=0.8, top_p=0.9, seed=3)
    first, stats = stream_generate(model, tokenizer, ids, settings)
    again, _ = stream_generate(model, tokenizer, ids, settings)
    assert first == again and stats.new_tokens == 5 and stats.prompt_tokens == len(ids)
    assert stats.decode_tokens_per_s > 0


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="temperature"):
        SamplingSettings(temperature=-1)
    with pytest.raises(ValueError, match="cache"):
        SamplingSettings(cache="paged")


def test_chat_loop_keeps_history_and_resets(tiny_model) -> None:
    model, tokenizer = tiny_model
    lines = iter(["hello", "what did I say?", "/reset", "again", "/exit"])
    out: list[str] = []
    state = chat_loop(model, tokenizer, SamplingSettings(max_new_tokens=4), system="Be brief.",
                      read=lambda prompt: next(lines), write=out.append, show_stats=False)
    assert [m["role"] for m in state.messages] == ["system", "user", "assistant"]
    assert state.messages[1]["content"] == "again"
    assert "(conversation cleared)\n" in out
    assert encode_chat(tokenizer, state.messages)  # still renders


def test_chat_loop_drops_old_turns_when_context_is_full(tiny_model) -> None:
    model, tokenizer = tiny_model
    model.config.max_position_embeddings = 60
    lines = iter(["a long message about apples and bananas"] * 4 + ["/exit"])
    state = chat_loop(model, tokenizer, SamplingSettings(max_new_tokens=8), read=lambda p: next(lines),
                      write=lambda s: None, show_stats=False)
    assert len(encode_chat(tokenizer, state.messages[:-1])) + 8 <= 60
    assert len(state.messages) < 8
