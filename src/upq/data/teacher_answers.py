"""The original model's own answers to chat prompts, generated once and cached on disk.

Both block-wise PTQ (chat rows of its calibration data) and Distill-QAT (chat training samples)
use them; the cache key hashes the model's weights, the rendered prompts and the sampling
settings, so the two stages share one generation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..atomic import write_json_atomic
from ..digest import json_digest
from ..logs import get_logger, progress_enabled

log = get_logger("data.teacher_answers")
_CACHE_FORMAT = 1


def default_answer_cache() -> Path:
    """Where answers are cached by default: ``$UPQ_CACHE/distill-data`` (shared by every run)."""
    from ..assets import cache_dir

    return cache_dir() / "distill-data"


@dataclass
class ChatSettings:
    """How the teacher answers prompts (sampling settings are part of the cache key)."""

    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 256
    responses_per_prompt: int = 1
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if self.max_new_tokens < 1 or self.responses_per_prompt < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens, responses_per_prompt and batch_size must be >= 1")


def _cache_key(fingerprint: str, rendered: list[list[int]], settings: ChatSettings) -> str:
    return json_digest({"teacher": fingerprint, "prompts": rendered, "settings": asdict(settings)})


def teacher_responses(teacher: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], settings: ChatSettings,
                      cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The teacher's responses as ``{"prompt_ids", "response_ids", "finished"}`` dicts, cached on disk.

    Each prompt is answered ``responses_per_prompt`` times (repetition ``j`` sampled with seed
    ``seed + 1000 * j``). The cache file is ``chat-<key>.json`` in ``cache_dir``.
    """
    from ..evaluation.agreement import model_fingerprint
    from ..generation import generate_ids, render_prompt

    prompts = list(prompts)
    rendered = [render_prompt(tokenizer, p) for p in prompts]
    key = _cache_key(model_fingerprint(teacher), rendered, settings)
    path = Path(cache_dir) / f"chat-{key[:24]}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        data = json.loads(path.read_text())
        if data.get("format") == _CACHE_FORMAT and data.get("key") == key:
            log.info("reusing %d cached teacher responses from %s", len(data["samples"]), path)
            return data["samples"]
    samples: list[dict[str, Any]] = []
    for rep in range(settings.responses_per_prompt):
        gens = generate_ids(
            teacher, tokenizer, prompts, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
            temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed + 1000 * rep,
            progress=progress_enabled(),
        )
        samples += [{"prompt_ids": g.prompt_ids, "response_ids": g.response_ids, "finished": g.finished} for g in gens]
    if path is not None:
        write_json_atomic(path, {"format": _CACHE_FORMAT, "key": key, "settings": asdict(settings),
                                 "prompts": prompts, "samples": samples})
        log.info("cached %d teacher responses in %s", len(samples), path)
    return samples


def answer_rows(responses: Sequence[dict[str, Any]], seq_len: int, rows: int) -> torch.Tensor:
    """Up to ``rows`` rows of ``seq_len`` tokens: each prompt + answer in turn, packed end to end."""
    flat: list[int] = []
    for r in responses:
        flat += list(r["prompt_ids"]) + list(r["response_ids"])
        if len(flat) >= rows * seq_len:
            break
    n = min(rows, len(flat) // seq_len)
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)
