"""Self-generated instructions: the teacher writes user turns, then answers them.

The chat pool of distillation is limited by its prompts (128 bundled ``train`` prompts). Here the
teacher also writes the *user's* side: the chat template is rendered up to where a user message's
content starts (:func:`user_turn_prefix`), the teacher continues from there until its end-of-turn
token, and that text -- once screened -- is answered through the normal chat template, exactly
like a bundled prompt.

Screening of every sampled instruction, in order:

* **unfinished / special** -- it hit ``max_new_tokens`` or holds a special token (a model writing
  past its turn);
* **quality** (:func:`instruction_problem`) -- empty, non-printable junk, fewer than
  ``min_words`` (whitespace-separated) words, or degenerate (one word or short n-gram making up
  most of it, a run of a short character unit, highly compressible text);
* **evaluation overlap** (:class:`EvalOverlap`) -- equal to, or sharing most word n-grams with,
  an IFEval prompt or a bundled ``eval`` prompt, so that public evaluation prompts never become
  training data;
* **duplicates** (:class:`Deduper`) -- same normalised text, or same first 8 words, as an
  instruction kept before.

Generation runs in chunks of ``chunk_size`` candidates; chunk ``k`` is seeded from
``(seed, k)``, so the kept pairs form one fixed sequence for a given teacher, settings and seed.
That sequence is cached on disk (``self-instruct-<key>.json``, written after every chunk): asking
for ``N`` pairs returns its first ``N``, generating only the chunks not cached yet. The count is
therefore not part of the key -- a larger request extends the same file.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from ..atomic import write_json_atomic
from ..digest import json_digest
from .prompts import load_prompts
from .teacher_answers import ChatSettings
from ..logs import get_logger, progress_enabled

if TYPE_CHECKING:
    from ..generation import Generation

__all__ = [
    "SelfInstructSettings",
    "Deduper",
    "EvalOverlap",
    "eval_prompts",
    "instruction_problem",
    "normalize_text",
    "self_instruct_pairs",
    "user_turn_prefix",
]

log = get_logger("data.self_instruct")
_CACHE_FORMAT = 1
_SENTINEL = "UPQ-USER-CONTENT-5e1f9c"
_NEAR_DUP_WORDS = 8


@dataclass
class SelfInstructSettings:
    """How the teacher writes its own instructions (every field is part of the cache key).

    Answers are sampled with the chat settings of the data config (temperature, top_p,
    ``max_new_tokens``, batch size, seed); each instruction is answered once.
    """

    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 96
    system: str | None = None
    min_words: int = 3
    overlap: float = 0.6
    ngram: int = 5
    decontaminate: bool = True
    chunk_size: int = 64
    max_candidates_per_sample: int = 8

    def __post_init__(self) -> None:
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("self-instruct temperature must be > 0 and top_p in (0, 1]")
        if min(self.max_new_tokens, self.min_words, self.ngram, self.chunk_size, self.max_candidates_per_sample) < 1:
            raise ValueError("self-instruct max_new_tokens, min_words, ngram, chunk_size and "
                             "max_candidates_per_sample must be >= 1")
        if not 0 < self.overlap <= 1:
            raise ValueError(f"self-instruct overlap threshold must be in (0, 1], got {self.overlap}")


# ---------------------------------------------------------------------------------------------
# text screening
# ---------------------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """``text`` case-folded (NFKC), with every run of non-alphanumerics turned into one space."""
    return " ".join(re.sub(r"[\W_]+", " ", unicodedata.normalize("NFKC", text).casefold()).split())


def _is_degenerate(text: str, words: list[str]) -> bool:
    """A word or n-gram (n <= 4) covering half the text, a run of a short unit, or highly compressible text."""
    for n in range(1, 5):
        if len(words) < n:
            break
        top = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1)).most_common(1)[0][1]
        if top >= 3 and top * n >= 0.5 * len(words):
            return True
    if re.search(r"(\S{1,4}?)\1{9,}", text):  # a unit of 1-4 characters ten times in a row
        return True
    raw = text.encode()
    return len(raw) >= 48 and len(zlib.compress(raw, 9)) < 0.3 * len(raw)


def instruction_problem(text: str, min_words: int = 3) -> str | None:
    """Why ``text`` is unusable as an instruction (``"empty"``, ``"junk"``, ``"short"``, ``"degenerate"``), or None."""
    text = text.strip()
    if not text:
        return "empty"
    if "\ufffd" in text or any(unicodedata.category(c).startswith("C") and c not in "\n\t" for c in text):
        return "junk"  # broken UTF-8, control or unassigned characters
    visible = [c for c in text if not c.isspace()]
    if sum(c.isalpha() for c in visible) < 0.3 * len(visible):
        return "junk"
    words = normalize_text(text).split()
    if len(words) < min_words:
        return "short"
    return "degenerate" if _is_degenerate(text, words) else None


class Deduper:
    """Remembers kept texts; :meth:`add` refuses exact (normalised) and near (same first 8 words) duplicates."""

    def __init__(self, texts: Iterable[str] = ()) -> None:
        self._seen: set[str] = set()
        self._heads: set[tuple[str, ...]] = set()
        for text in texts:
            self.add(text)

    def add(self, text: str) -> bool:
        """Record ``text``; False (and nothing recorded) when it duplicates a text seen before."""
        norm = normalize_text(text)
        head = tuple(norm.split()[:_NEAR_DUP_WORDS])
        if norm in self._seen or head in self._heads:
            return False
        self._seen.add(norm)
        self._heads.add(head)
        return True


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


class EvalOverlap:
    """Finds texts equal to, or heavily overlapping, one of a list of evaluation prompts.

    A text matches a prompt when their normalised forms are equal, or when the word
    ``ngram``-grams they share make up at least ``threshold`` of the text's grams or of the
    prompt's (containment either way). Texts shorter than ``ngram`` words match only exactly.
    """

    def __init__(self, prompts: Sequence[str], ngram: int = 5, threshold: float = 0.6) -> None:
        self.prompts = list(prompts)
        self.ngram, self.threshold = ngram, threshold
        self._exact = {normalize_text(p): i for i, p in enumerate(self.prompts)}
        self._sizes: list[int] = []
        self._index: dict[tuple[str, ...], list[int]] = {}
        for i, p in enumerate(self.prompts):
            grams = _ngrams(normalize_text(p).split(), ngram)
            self._sizes.append(len(grams))
            for g in grams:
                self._index.setdefault(g, []).append(i)

    def match(self, text: str) -> str | None:
        """The evaluation prompt that ``text`` equals or overlaps, or None."""
        norm = normalize_text(text)
        if norm in self._exact:
            return self.prompts[self._exact[norm]]
        grams = _ngrams(norm.split(), self.ngram)
        shared = Counter(i for g in grams for i in self._index.get(g, ()))
        for i, count in shared.most_common():
            if count >= self.threshold * len(grams) or count >= self.threshold * self._sizes[i]:
                return self.prompts[i]
        return None


def eval_prompts() -> list[str]:
    """Prompts that must stay out of training data: IFEval's 541 and the bundled ``eval`` prompts."""
    from ..evaluation.ifeval import load_ifeval

    try:
        ifeval = [ex.prompt for ex in load_ifeval()]
    except RuntimeError as exc:
        raise RuntimeError(f"self-instruct decontamination needs the IFEval prompts ({exc}); "
                           "set self_instruct_settings.decontaminate=false to skip it") from exc
    return ifeval + load_prompts("eval")


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------


def user_turn_prefix(tokenizer: Any, system: str | None = None) -> list[int]:
    """Token ids of the chat template rendered up to where a user message's content begins.

    Renders ``[system?, user: <sentinel>]`` and keeps the text before the sentinel (for ChatML:
    ``...<|im_start|>user\\n``).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("self-generated instructions need a tokenizer with a chat template")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if text.count(_SENTINEL) != 1:
        raise ValueError("the chat template does not render a user message's content verbatim once")
    ids = list(tokenizer(text.split(_SENTINEL)[0], add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError("the chat template renders nothing before a user message's content")
    return ids


def _chunk_seed(seed: int, chunk: int, stage: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{stage}:{chunk}".encode()).digest()[:7], "big")


def _screen(gen: "Generation", tokenizer: Any, special_ids: set[int], min_words: int) -> tuple[str, str | None]:
    """The instruction text of a sampled user turn and why it is rejected (None: kept)."""
    ids = gen.response_ids[:-1] if gen.finished else gen.response_ids
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    if not gen.finished:
        return text, "unfinished"
    if any(t in special_ids for t in ids):
        return text, "special"
    return text, instruction_problem(text, min_words)


def _keep(gens: Sequence["Generation"], tokenizer: Any, min_words: int, overlap: EvalOverlap, dedup: Deduper,
          rejected: Counter[str]) -> list[str]:
    """The texts of the sampled user turns that pass every screen; counts the others' reasons in ``rejected``."""
    special_ids = set(tokenizer.all_special_ids)
    kept = []
    for gen in gens:
        text, reason = _screen(gen, tokenizer, special_ids, min_words)
        if reason is None and overlap.match(text) is not None:
            reason = "eval-overlap"
        if reason is None and not dedup.add(text):
            reason = "duplicate"
        if reason is None:
            kept.append(text)
        else:
            rejected[reason] += 1
    return kept


def _cache_key(teacher: torch.nn.Module, tokenizer: Any, prefix: list[int], settings: SelfInstructSettings,
               answer: ChatSettings, blocklist: Sequence[str]) -> str:
    from ..evaluation.agreement import model_fingerprint
    from ..generation import render_prompt

    payload = {
        "format": _CACHE_FORMAT, "teacher": model_fingerprint(teacher), "prefix": prefix,
        "answer_template": render_prompt(tokenizer, _SENTINEL), "settings": asdict(settings),
        "answer": {k: getattr(answer, k) for k in ("temperature", "top_p", "max_new_tokens", "batch_size", "seed")},
        "blocklist": hashlib.sha256("\n".join(sorted(normalize_text(p) for p in blocklist)).encode()).hexdigest(),
    }
    return json_digest(payload)


def self_instruct_pairs(teacher: torch.nn.Module, tokenizer: Any, count: int, settings: SelfInstructSettings,
                        answer: ChatSettings, cache_dir: str | Path | None = None,
                        blocklist: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``count`` self-generated instruction/answer pairs as ``{"instruction", "prompt_ids", "response_ids", "finished"}``.

    ``blocklist`` -- texts no instruction may match (:class:`EvalOverlap`); default
    :func:`eval_prompts` when ``settings.decontaminate``, else none. Fewer than ``count`` pairs
    come back (with a warning) when ``count * max_candidates_per_sample`` candidates do not yield
    enough. Cached in ``cache_dir`` as ``self-instruct-<key>.json`` (see the module docstring).
    """
    from ..generation import generate_ids, render_prompt

    if count < 1:
        raise ValueError(f"self-instruct count must be >= 1, got {count}")
    if blocklist is None:
        blocklist = eval_prompts() if settings.decontaminate else []
    prefix = user_turn_prefix(tokenizer, settings.system)
    key = _cache_key(teacher, tokenizer, prefix, settings, answer, blocklist)
    path = Path(cache_dir) / f"self-instruct-{key[:24]}.json" if cache_dir is not None else None
    state: dict[str, Any] = {"format": _CACHE_FORMAT, "key": key, "settings": asdict(settings), "chunks": 0,
                             "candidates": 0, "rejected": {}, "samples": []}
    if path is not None and path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("format") == _CACHE_FORMAT and cached.get("key") == key:
            state = cached
    samples: list[dict[str, Any]] = state["samples"]
    budget = count * settings.max_candidates_per_sample
    if len(samples) >= count or state["candidates"] >= budget:
        log.info("reusing %d cached self-instruct pairs from %s", min(count, len(samples)), path)
    else:
        overlap = EvalOverlap(blocklist, settings.ngram, settings.overlap)
        dedup = Deduper(s["instruction"] for s in samples)
        rejected = Counter(state["rejected"])
        bar = None
        if progress_enabled():
            from tqdm.auto import tqdm

            bar = tqdm(total=count, initial=len(samples), desc="self-instruct", unit="pair")
        try:
            while len(samples) < count and state["candidates"] < budget:
                chunk = state["chunks"]
                gens = generate_ids(teacher, tokenizer, [prefix] * settings.chunk_size,
                                    max_new_tokens=settings.max_new_tokens, batch_size=answer.batch_size,
                                    temperature=settings.temperature, top_p=settings.top_p,
                                    seed=_chunk_seed(answer.seed, chunk, "instruction"), progress=False)
                kept = _keep(gens, tokenizer, settings.min_words, overlap, dedup, rejected)
                answers = generate_ids(teacher, tokenizer, kept, max_new_tokens=answer.max_new_tokens,
                                       batch_size=answer.batch_size, temperature=answer.temperature,
                                       top_p=answer.top_p, seed=_chunk_seed(answer.seed, chunk, "answer"),
                                       progress=False)
                samples += [{"instruction": text, "prompt_ids": render_prompt(tokenizer, text),
                             "response_ids": g.response_ids, "finished": g.finished}
                            for text, g in zip(kept, answers)]
                state.update(chunks=chunk + 1, candidates=state["candidates"] + len(gens), rejected=dict(rejected))
                if path is not None:
                    write_json_atomic(path, state, indent=None)
                log.debug("self-instruct chunk %d: kept %d of %d candidates", chunk, len(kept), len(gens))
                if bar is not None:
                    bar.update(min(len(kept), count - bar.n))
        finally:
            if bar is not None:
                bar.close()
        log.info("self-instruct: %d pairs from %d candidates (rejected: %s)%s", len(samples), state["candidates"],
                 ", ".join(f"{k} {v}" for k, v in sorted(rejected.items())) or "none",
                 f"; cached in {path}" if path is not None else "")
    if len(samples) < count:
        log.warning("only %d of %d self-instruct pairs passed the filters within %d candidates", len(samples),
                    count, state["candidates"])
    return samples[:count]
