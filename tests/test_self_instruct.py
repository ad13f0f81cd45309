"""Self-generated instructions: screening filters, eval decontamination, seeded generation, caching, wiring."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from distill_helpers import one_thread  # noqa: F401 (fixture)
from upq.cli import main
from upq.data.prompts import load_prompts
from upq.data import self_instruct
from upq.distill.data import ChatSettings, DataConfig, build_stream
from upq.data.self_instruct import (
    Deduper,
    EvalOverlap,
    SelfInstructSettings,
    eval_prompts,
    instruction_problem,
    self_instruct_pairs,
    user_turn_prefix,
)
from upq.generation import Generation

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = [
    "Name three fruits, three vegetables and three colours.",
    "Solve 3x + 5 = 20 for x.",
    "Write a Python function that returns the sum of a list.",
    "Explain why the sky is blue in two sentences.",
    'Translate "good morning" into French, Spanish and German.',
    "What is 1000000 divided by 4?",
]
EVAL = [
    "Write a 300+ word summary of the wikipedia page about the history of Raymond III, Count of Tripoli. "
    "Do not use any commas and highlight at least 3 sections that has titles in markdown format.",
    "Write a limerick about a dog who loves to chase squirrels in the park, using all lowercase letters.",
    "Hello world",
]
FAST = SelfInstructSettings(max_new_tokens=6, chunk_size=8)


def _answer(seed: int = 0) -> ChatSettings:
    return ChatSettings(max_new_tokens=4, batch_size=4, seed=seed)


@pytest.fixture
def accept_all(monkeypatch) -> None:
    """Screen nothing out: a tiny random model writes gibberish that never ends its turn."""
    monkeypatch.setattr(self_instruct, "_screen",
                        lambda gen, tokenizer, special_ids, min_words: (tokenizer.decode(gen.response_ids), None))


# ---------------------------------------------------------------------------------------------
# filters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("   \n", "empty"),
    ("hi there", "short"),
    ("the the the the the the", "degenerate"),
    ("go home go home go home go home", "degenerate"),
    ("lolololololololololololololololololololololol is funny", "degenerate"),
    ("Tell me more " + "about the weather " * 4, "degenerate"),
    ("!!!! ???? #### @@ %%", "junk"),
    ("abc\x00def ghi jkl", "junk"),
    ("Caf\ufffd is good today", "junk"),
])
def test_bad_instructions_are_rejected(text: str, reason: str) -> None:
    assert instruction_problem(text) == reason


def test_normal_instructions_are_kept() -> None:
    assert [instruction_problem(t) for t in GOOD] == [None] * len(GOOD)
    assert instruction_problem("Say hello", min_words=3) == "short"
    assert instruction_problem("Say hello", min_words=2) is None


def test_deduper_drops_exact_and_near_duplicates() -> None:
    dedup = Deduper(["Write a poem about the sea."])
    assert not dedup.add("write a POEM about the sea!")  # same normalised text
    assert dedup.add("Write a poem about the sky.")
    long = "Give me three reasons why people should learn to cook at home"
    assert dedup.add(long)
    assert not dedup.add("Give me three reasons why people should learn to swim")  # same first 8 words
    assert dedup.add("Give me four reasons why people should learn to cook at home")


def test_eval_overlap_rejects_eval_prompts_and_close_paraphrases() -> None:
    overlap = EvalOverlap(EVAL)
    assert overlap.match(EVAL[0]) == EVAL[0]
    assert overlap.match(EVAL[1].upper().replace(",", " ;")) == EVAL[1]  # normalised equality
    assert overlap.match("hello, WORLD!") == EVAL[2]  # shorter than an n-gram: exact match only
    # one word changed and a sentence added: most word 8-grams (and 5-grams) survive
    paraphrase = EVAL[0].replace("history", "life") + " Thank you very much."
    assert overlap.match(paraphrase) == EVAL[0]
    wrapped = "Here is a task for you, please read it carefully and do it well. " + EVAL[1]
    assert overlap.match(wrapped) == EVAL[1]  # the eval prompt is contained in the text
    assert overlap.match("Write a limerick about a cat who sleeps all day on the warm windowsill.") is None
    assert overlap.match("Hello world, how are you doing today?") is None
    for text in GOOD:
        assert overlap.match(text) is None
    assert EvalOverlap(EVAL, threshold=1.0).match(paraphrase) is None  # the threshold is honoured


def test_eval_prompts_are_ifeval_plus_bundled_eval(monkeypatch) -> None:
    class Example:
        def __init__(self, prompt: str) -> None:
            self.prompt = prompt

    monkeypatch.setattr("upq.evaluation.ifeval.load_ifeval", lambda source="auto": [Example(p) for p in EVAL])
    assert eval_prompts() == EVAL + load_prompts("eval")

    def offline(source="auto"):
        raise RuntimeError("no network")

    monkeypatch.setattr("upq.evaluation.ifeval.load_ifeval", offline)
    with pytest.raises(RuntimeError, match="decontaminate"):
        eval_prompts()


def test_bundled_train_prompts_do_not_overlap_ifeval(monkeypatch) -> None:
    from upq.evaluation.ifeval import load_ifeval

    def offline(*args, **kwargs):
        raise RuntimeError("not downloading in tests")

    monkeypatch.setattr("upq.assets._pip_download", offline)  # use a local copy only
    try:
        ifeval = [ex.prompt for ex in load_ifeval("asset")]
    except RuntimeError as exc:
        pytest.skip(f"IFEval data not present locally: {exc}")
    assert len(ifeval) == 541
    overlap = EvalOverlap(ifeval)
    train = load_prompts("train")
    assert {p: overlap.match(p) for p in train if overlap.match(p) is not None} == {}
    # the filter does catch the real prompts, verbatim or lightly edited
    assert all(overlap.match(p) == p for p in ifeval[:50])
    assert sum(overlap.match("Please answer this. " + p.rstrip(".") + ", thanks.") is not None for p in ifeval) > 500


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------


def test_user_turn_prefix(tiny_model) -> None:
    _, tokenizer = tiny_model
    assert tokenizer.decode(user_turn_prefix(tokenizer)) == "<|im_start|>user\n"
    assert tokenizer.decode(user_turn_prefix(tokenizer, "Be brief.")) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: ...\n{% endfor %}"
    with pytest.raises(ValueError, match="verbatim"):
        user_turn_prefix(tokenizer)


def test_generation_is_reproducible_from_the_seed(tiny_model, accept_all) -> None:
    model, tokenizer = tiny_model
    a = self_instruct_pairs(model, tokenizer, 5, FAST, _answer(0), blocklist=[])
    b = self_instruct_pairs(model, tokenizer, 5, FAST, _answer(0), blocklist=[])
    c = self_instruct_pairs(model, tokenizer, 5, FAST, _answer(1), blocklist=[])
    assert len(a) == 5 and a == b
    assert [p["instruction"] for p in c] != [p["instruction"] for p in a]
    assert len({p["instruction"] for p in a}) == 5
    for p in a:  # each instruction is answered through the chat template
        rendered = tokenizer.decode(p["prompt_ids"])
        assert rendered == f"<|im_start|>user\n{p['instruction']}<|im_end|>\n<|im_start|>assistant\n"
        assert 1 <= len(p["response_ids"]) <= 4


def test_cache_is_reused_and_extended(tiny_model, accept_all, tmp_path: Path, monkeypatch) -> None:
    model, tokenizer = tiny_model
    first = self_instruct_pairs(model, tokenizer, 4, FAST, _answer(), tmp_path, blocklist=[])
    (path,) = tmp_path.glob("self-instruct-*.json")
    assert json.loads(path.read_text())["chunks"] == 1

    def boom(*args, **kwargs):
        raise AssertionError("generation must not run again")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("upq.generation.generate_ids", boom)
        assert self_instruct_pairs(model, tokenizer, 4, FAST, _answer(), tmp_path, blocklist=[]) == first
        assert self_instruct_pairs(model, tokenizer, 2, FAST, _answer(), tmp_path, blocklist=[]) == first[:2]
        with pytest.raises(AssertionError, match="must not run"):  # more than cached: generates
            self_instruct_pairs(model, tokenizer, 12, FAST, _answer(), tmp_path, blocklist=[])
    more = self_instruct_pairs(model, tokenizer, 12, FAST, _answer(), tmp_path, blocklist=[])
    assert len(more) == 12 and more[:4] == first  # extended in place, the first pairs unchanged
    assert list(tmp_path.glob("self-instruct-*.json")) == [path]
    fresh = self_instruct_pairs(model, tokenizer, 12, FAST, _answer(), None, blocklist=[])
    assert fresh == more  # the same sequence as generating 12 at once
    self_instruct_pairs(model, tokenizer, 2, FAST, _answer(), tmp_path, blocklist=["something else"])
    assert len(list(tmp_path.glob("self-instruct-*.json"))) == 2  # the blocklist is part of the key


def test_pipeline_screens_dedups_and_decontaminates(tiny_model, tmp_path: Path, monkeypatch) -> None:
    model, tokenizer = tiny_model
    eos = tokenizer.eos_token_id
    written = [
        "Name three fruits, three vegetables and three colours.",
        "name three FRUITS, three vegetables and three colours!",  # duplicate
        EVAL[1],  # an eval prompt
        "the the the the the the",  # degenerate
        "hi",  # short
        "Explain why the sky is blue in two sentences.",
    ]
    calls = []

    def fake_generate(model, tokenizer, prompts, **kwargs):
        calls.append(kwargs["seed"])
        if prompts and not isinstance(prompts[0], str):  # instruction sampling from the user-turn prefix
            assert all(list(p) == user_turn_prefix(tokenizer) for p in prompts)
            texts = (written + ["Unfinished instruction that goes on"])[:len(prompts)]
            return [Generation(list(p), tokenizer(t, add_special_tokens=False)["input_ids"]
                               + ([eos] if i < len(written) else []), i < len(written))
                    for i, (p, t) in enumerate(zip(prompts, texts))]
        return [Generation([1], [7, eos], True) for _ in prompts]

    monkeypatch.setattr("upq.generation.generate_ids", fake_generate)
    settings = SelfInstructSettings(chunk_size=7, max_candidates_per_sample=2)
    pairs = self_instruct_pairs(model, tokenizer, 2, settings, _answer(), tmp_path, blocklist=EVAL)
    assert [p["instruction"] for p in pairs] == [written[0], written[-1]]
    assert len(calls) == 2 and calls[0] != calls[1]  # one chunk: instructions, then answers
    (path,) = tmp_path.glob("self-instruct-*.json")
    assert json.loads(path.read_text())["rejected"] == {"duplicate": 1, "eval-overlap": 1, "degenerate": 1,
                                                         "short": 1, "unfinished": 1}
    # too few pass: stops after count * max_candidates_per_sample candidates, with what it has
    few = self_instruct_pairs(model, tokenizer, 4, settings, _answer(), tmp_path, blocklist=EVAL)
    assert [p["instruction"] for p in few] == [written[0], written[-1]]
    cached = json.loads(path.read_text())
    assert cached["candidates"] == 14 and cached["rejected"]["duplicate"] == 1 + 3  # one more chunk: budget 4 * 2 spent
    assert len(calls) == 4


def test_data_config_adds_self_instruct_to_the_chat_pool(tiny_model, accept_all, tmp_path: Path, monkeypatch) -> None:
    model, tokenizer = tiny_model
    monkeypatch.setattr(self_instruct, "eval_prompts", lambda: [])
    cfg = DataConfig(kind="chat", seq_len=64, bundled_prompts=False, self_instruct=3, chat=_answer(),
                     self_instruct_settings=asdict(FAST))
    assert cfg.self_instruct_settings == FAST
    assert DataConfig(**asdict(cfg)) == cfg
    stream = build_stream(cfg, tokenizer, model, tmp_path, seed=0)
    assert len(stream.chat) == 3 and len(list(tmp_path.glob("self-instruct-*.json"))) == 1
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\nname a colour\n")
    both = DataConfig(kind="chat", seq_len=64, prompts_file=str(prompts), bundled_prompts=False, self_instruct=3,
                      chat=_answer(), self_instruct_settings=FAST)
    assert len(build_stream(both, tokenizer, model, tmp_path, seed=0).chat) == 5
    with pytest.raises(ValueError, match="'chat' or 'mix'"):
        DataConfig(kind="text", self_instruct=2)
    with pytest.raises(ValueError, match=">= 0"):
        DataConfig(kind="chat", self_instruct=-1)
    assert DataConfig().self_instruct == 0


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def test_cli_self_instruct(tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    seen = {}

    def fake_pairs(teacher, tokenizer, count, settings, answer, cache_dir, blocklist=None):
        seen.update(count=count, seed=answer.seed, cache=cache_dir)
        ids = tokenizer("Paris.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return [{"instruction": f"Question {i}?", "prompt_ids": [1], "response_ids": ids, "finished": True}
                for i in range(count)]

    monkeypatch.setattr(self_instruct, "self_instruct_pairs", fake_pairs)
    out = tmp_path / "sub" / "pairs.jsonl"
    assert main(["self-instruct", "--count", "2", "--model", str(tiny_model_dir), "--seed", "5", "--out", str(out),
                 "--data-cache", str(tmp_path / "cache"), "--device", "cpu", "--quiet"]) == 0
    assert seen == {"count": 2, "seed": 5, "cache": tmp_path / "cache"}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"instruction": f"Question {i}?", "response": "Paris.", "finished": True} for i in range(2)]
    assert json.loads(capsys.readouterr().out)["pairs"] == 2

    assert main(["self-instruct", "--count", "2", "--model", str(tmp_path / "missing"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: model not found: {tmp_path / 'missing'}"]
    assert main(["self-instruct", "--count", "2", "--model", str(tiny_model_dir), "--out", str(tmp_path),
                 "--quiet"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: --out {tmp_path} is a directory; give a .jsonl file path"]
