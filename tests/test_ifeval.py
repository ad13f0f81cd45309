"""IFEval: official checkers on crafted responses, strict vs loose, scoring, offline punkt."""

from __future__ import annotations

import doctest
import json
import sys
import types

import pytest

pytest.importorskip("nltk")
pytest.importorskip("langdetect")
pytest.importorskip("immutabledict")

from upq.evaluation import ifeval  # noqa: E402
from upq.evaluation.ifeval import (  # noqa: E402
    IFEvalExample,
    check_instructions,
    load_ifeval,
    loose_variants,
    score_responses,
)


@pytest.fixture(scope="module")
def registry():
    from upq.evaluation.ifeval_checkers import instruction_dict

    try:
        return instruction_dict()
    except RuntimeError as exc:  # no cached wheel and no PyPI
        pytest.skip(f"IFEval checkers unavailable: {exc}")


# instruction id -> (kwargs, a response that follows it, a response that does not)
CASES: dict[str, tuple[dict, str, str]] = {
    "change_case:capital_word_frequency": (
        {"capital_relation": "less than", "capital_frequency": 3},
        "I like NASA and the sun.", "THE BIG RED DOG RAN HOME."),
    "change_case:english_capital": (
        {}, "THIS IS A SIMPLE SENTENCE WRITTEN IN ENGLISH WITH CAPITAL LETTERS ONLY.",
        "This is a simple sentence written in English with normal letters."),
    "change_case:english_lowercase": (
        {}, "this is a simple sentence written in english with lowercase letters only.",
        "This is a simple sentence written in English with normal letters."),
    "combination:repeat_prompt": (
        {"prompt_to_repeat": "Write a haiku about rain."},
        "Write a haiku about rain.\nSoft rain on the roof", "Here is a haiku about rain."),
    "combination:two_responses": (
        {}, "The first answer.\n******\nThe second answer.", "Only one answer here."),
    "detectable_content:number_placeholders": (
        {"num_placeholders": 2}, "Dear [name], I live at [address].", "Dear [name], hello."),
    "detectable_content:postscript": (
        {"postscript_marker": "P.S."}, "Hello there.\n\nP.S. See you soon.", "Hello. See you."),
    "detectable_format:constrained_response": (
        {}, "My answer is yes.", "Yes, definitely."),
    "detectable_format:json_format": (
        {}, '```json\n{"answer": 1}\n```', "answer: 1"),
    "detectable_format:multiple_sections": (
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nfirst part\nSection 2\nsecond part", "Section 1\nonly one part"),
    "detectable_format:number_bullet_lists": (
        {"num_bullets": 2}, "* one\n* two", "* one\n* two\n* three"),
    "detectable_format:number_highlighted_sections": (
        {"num_highlights": 2}, "This is *first* and *second*.", "Only *one* here."),
    "detectable_format:title": (
        {}, "<<A Rainy Day>>\nIt rained.", "A Rainy Day\nIt rained."),
    "keywords:existence": (
        {"keywords": ["apple", "river"]}, "An apple fell into the river.", "An apple fell."),
    "keywords:forbidden_words": (
        {"forbidden_words": ["rock"]}, "The road was rocky.", "I like rock music."),
    "keywords:frequency": (
        {"relation": "at least", "keyword": "story", "frequency": 2},
        "A story within a Story.", "Just one story."),
    "keywords:letter_frequency": (
        {"let_relation": "less than", "letter": "z", "let_frequency": 2},
        "A lazy cat.", "Zany zebras."),
    "language:response_language": (
        {"language": "es"},
        "Hola, ¿cómo estás? Me gusta mucho la comida española y viajar por el mundo.",
        "Hello, how are you? I really like Spanish food and travelling around the world."),
    "length_constraints:nth_paragraph_first_word": (
        {"first_word": "weekend", "num_paragraphs": 2, "nth_paragraph": 2},
        "An intro paragraph.\n\nWeekend plans are great.",
        "An intro paragraph.\n\nSaturday plans are great."),
    "length_constraints:number_paragraphs": (
        {"num_paragraphs": 2}, "First part.\n***\nSecond part.",
        "First part.\n***\nSecond part.\n***\nThird part."),
    "length_constraints:number_sentences": (
        {"relation": "less than", "num_sentences": 3},
        "Dr. Smith went to Washington. He arrived late.", "One. Two. Three."),
    "length_constraints:number_words": (
        {"relation": "at least", "num_words": 5}, "one two three four five", "one two three"),
    "punctuation:no_comma": ({}, "No commas here.", "Well, a comma."),
    "startend:end_checker": (
        {"end_phrase": "Any other questions?"}, "Done. Any other questions?",
        "Any other questions? Done."),
    "startend:quotation": ({}, '"A quoted answer."', "A quoted answer."),
}


def _example(iid: str, kwargs: dict, prompt: str = "Write a haiku about rain.") -> IFEvalExample:
    return IFEvalExample(1, prompt, (iid,), (dict(kwargs),))


def test_cases_cover_every_instruction_in_the_data(registry):
    try:
        data = load_ifeval("asset")
    except RuntimeError as exc:
        pytest.skip(f"IFEval data unavailable: {exc}")
    assert len(data) == 541
    used = {iid for ex in data for iid in ex.instruction_ids}
    assert len(used) == 25
    assert used == set(CASES)
    assert used <= set(registry)


@pytest.mark.parametrize("iid", sorted(CASES))
def test_checker_verdicts(registry, iid):
    kwargs, good, bad = CASES[iid]
    ex = _example(iid, kwargs)
    assert check_instructions(ex, good, registry=registry) == [True]
    assert check_instructions(ex, bad, registry=registry) == [False]
    assert check_instructions(ex, good, loose=True, registry=registry) == [True]
    assert check_instructions(ex, "   \n", loose=True, registry=registry) == [False]  # blank


def test_loose_differs_from_strict(registry):
    quote = _example("startend:quotation", {})
    response = 'Sure! Here it is:\n"A quoted answer."'
    assert check_instructions(quote, response, registry=registry) == [False]
    assert check_instructions(quote, response, loose=True, registry=registry) == [True]
    end = _example("startend:end_checker", {"end_phrase": "Any other questions?"})
    response = "Done.\n**Any other questions?**"  # only the *-stripped variants pass
    assert check_instructions(end, response, registry=registry) == [False]
    assert check_instructions(end, response, loose=True, registry=registry) == [True]


def test_loose_variants():
    v = loose_variants("first *a*\nmiddle\nlast")
    assert v == ["first *a*\nmiddle\nlast", "first a\nmiddle\nlast", "middle\nlast",
                 "first *a*\nmiddle", "middle", "middle\nlast", "first a\nmiddle", "middle"]


def test_score_responses(registry):
    exs = [
        IFEvalExample(1, "p1", ("punctuation:no_comma", "startend:quotation"), ({}, {})),
        IFEvalExample(2, "p2", ("punctuation:no_comma",), ({},)),
    ]
    res = score_responses(exs, ['Intro:\n"no commas"', "a, b"])
    assert res["n_prompts"] == 2 and res["n_instructions"] == 3
    assert res["prompt_level_strict"] == 0.0 and res["inst_level_strict"] == pytest.approx(1 / 3)
    assert res["prompt_level_loose"] == 0.5 and res["inst_level_loose"] == pytest.approx(2 / 3)
    assert res["per_instruction_loose"]["punctuation:no_comma"] == 0.5
    assert res["follow_strict"] == [[True, False], [False]]
    with pytest.raises(ValueError):
        score_responses(exs, ["only one"])


def test_verdicts_repeat_when_the_checker_draws_a_random_argument(registry):
    """letter_frequency with a non-letter (as in the data: "#", "!") makes the official checker
    pick a random letter; verdicts must still repeat, loose must include strict, and the global
    random state must be left alone."""
    import random

    ex = IFEvalExample(7, "p", ("keywords:letter_frequency",),
                       ({"let_relation": "at least", "letter": "#", "let_frequency": 4},))
    text = "".join(chr(c) * 5 for c in range(ord("a"), ord("n")))  # half the alphabet, 5 times each
    random.seed(123)
    expected_next = random.random()
    random.seed(123)
    strict = {tuple(check_instructions(ex, text, registry=registry)) for _ in range(20)}
    assert random.random() == expected_next
    loose = {tuple(check_instructions(ex, text, loose=True, registry=registry)) for _ in range(20)}
    assert len(strict) == 1 and len(loose) == 1
    assert not strict.pop()[0] or loose.pop()[0]


def test_hf_style_none_kwargs_are_dropped():
    ex = ifeval._example({"key": 3, "prompt": "p", "instruction_id_list": ["keywords:existence"],
                          "kwargs": [{"keywords": ["x"], "num_words": None, "relation": None}]})
    assert ex.kwargs == ({"keywords": ["x"]},)


def test_run_ifeval_with_fake_generation(registry, monkeypatch, tmp_path):
    data = [IFEvalExample(10, "Say hi without commas.", ("punctuation:no_comma",), ({},)),
            IFEvalExample(11, "Quote it.", ("startend:quotation",), ({},))]
    monkeypatch.setattr(ifeval, "load_ifeval", lambda source="auto", limit=None: data[:limit])
    seen = {}

    def fake_generate(model, tokenizer, prompts, chat=True, max_new_tokens=0, batch_size=1,
                      temperature=1.0, **_):
        seen.update(chat=chat, max_new_tokens=max_new_tokens, temperature=temperature)
        return ["hi there" if "commas" in p else "not quoted" for p in prompts]

    monkeypatch.setitem(sys.modules, "upq.generation",
                        types.SimpleNamespace(generate=fake_generate))
    tok = lambda text, add_special_tokens=False: {"input_ids": text.split()}  # noqa: E731
    out = tmp_path / "responses.jsonl"
    res = ifeval.run_ifeval(object(), tok, limit=2, max_new_tokens=7, batch_size=2,
                            responses_out=out)
    assert seen == {"chat": True, "max_new_tokens": 7, "temperature": 0.0}
    assert res["prompt_level_strict"] == 0.5 and res["inst_level_loose"] == 0.5
    assert res["settings"]["max_new_tokens"] == 7 and res["wall_time_s"] >= 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["key"] for r in lines] == [10, 11] and lines[0]["follow_strict"] == [True]


# ----------------------------------------------------------------------------- offline punkt


def test_punkt_tab_files_round_trip(tmp_path, monkeypatch):
    import nltk

    from upq.evaluation.punkt_offline import PUNKT_ENGLISH, read_bundled_model, write_punkt_tab
    from upq.assets import get_asset

    try:
        tables = read_bundled_model(get_asset(PUNKT_ENGLISH))
    except RuntimeError as exc:
        pytest.skip(f"punkt asset unavailable: {exc}")
    assert {"dr", "mr", "u.s", "e", "inc"} <= tables.abbrev_types
    lang_dir = write_punkt_tab(tables, tmp_path / "tokenizers" / "punkt_tab" / "english")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # nltk reads only from its path
    from nltk.tokenize.punkt import load_punkt_params

    assert str(nltk.data.find("tokenizers/punkt_tab/english/")).startswith(str(tmp_path))
    params = load_punkt_params(nltk.data.find("tokenizers/punkt_tab/english/"))
    assert params.abbrev_types == set(tables.abbrev_types)
    assert params.collocations == set(tables.collocations)
    assert params.sent_starters == set(tables.sent_starters)
    assert dict(params.ortho_context) == tables.ortho_context


@pytest.fixture(scope="module")
def offline_nltk():
    from upq.evaluation.punkt_offline import ensure_punkt

    try:
        root = ensure_punkt()
    except RuntimeError as exc:
        pytest.skip(f"punkt asset unavailable: {exc}")
    import nltk

    found = nltk.data.find("tokenizers/punkt_tab/english/")
    assert str(found).startswith(str(root))
    return nltk


def test_nltk_runs_offline_with_reference_outputs(offline_nltk):
    nltk = offline_nltk
    # expected values from NLTK's own documentation/doctests (computed with NLTK's punkt_tab)
    text = "Good muffins cost $3.88\nin New York.  Please buy me\ntwo of them.\n\nThanks."
    assert nltk.sent_tokenize(text) == ["Good muffins cost $3.88\nin New York.",
                                        "Please buy me\ntwo of them.", "Thanks."]
    assert nltk.word_tokenize("I called Dr. Jones. I called Dr. Jones.") == [
        "I", "called", "Dr.", "Jones", ".", "I", "called", "Dr.", "Jones", "."]
    assert nltk.word_tokenize("There were 300,000, but that wasn't enough.") == [
        "There", "were", "300,000", ",", "but", "that", "was", "n't", "enough", "."]
    assert nltk.sent_tokenize("Hello.  This is a test.  It works!") == [
        "Hello.", "This is a test.", "It works!"]
    # abbreviations from the model keep sentences whole
    assert len(nltk.sent_tokenize("Mr. Smith met Dr. Brown in the U.S. capital. It rained.")) == 2


def test_nltk_punkt_doctests_pass(offline_nltk):
    import nltk.tokenize
    import nltk.tokenize.punkt

    for module in (nltk.tokenize, nltk.tokenize.punkt):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__


def test_reference_sentence_counts(registry, offline_nltk):
    """The reference suite's count_sentences expectations (instructions_util_test)."""
    util = sys.modules["_upq_ifeval_reference.instructions_util"]
    cases = [("xx,x. xx,x! xx/x. x{x}x? x.", 5), ("xx,x! xxxx. x(x)x?", 3),
             ("xxxx. xx,x! xx|x. x&x x?", 4), ("xx-x]xx,x! x{x}xx,x.", 2)]
    assert [util.count_sentences(t) for t, _ in cases] == [n for _, n in cases]
    assert util.count_words("word1, word2, word3, word4.") == 4
    assert util.count_words("\n  Hyphenated-word has two word counts.\n  ") == 6
