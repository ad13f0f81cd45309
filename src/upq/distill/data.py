"""Training data of Distill-QAT: packed text, the teacher's own chat responses, or a mixture.

Every training example is a :class:`Sample`: token ids plus a loss mask over *predicting*
positions (``loss_mask[t]`` is true when the model's output at ``t``, which predicts token
``t + 1``, counts in the loss).

* **text** -- pre-training-style documents (``load_texts``: ``"wiki"``, a local file or a
  Hugging Face id) packed into fixed-length sequences; every position but the last counts.
* **chat** -- the teacher answers chat prompts (the bundled ``train`` prompts and/or a user file)
  with sampling, in batches, through the chat template; the answers are cached on disk (shared by
  runs) under a key hashing the teacher's weights, the rendered prompts and the generation settings. Response
  positions count; prompt positions count too unless ``mask_prompt``. ``self_instruct`` adds that many
  pairs whose instructions the teacher wrote itself (:mod:`upq.data.self_instruct`).
* **mix** -- a deterministic interleave with a given fraction of chat samples.

:class:`SampleStream` gives a reproducible infinite order (a fresh seeded permutation of each
pool per epoch); its whole state is the number of samples consumed, so a run saves one integer
and resumes at exactly the same sample.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import torch

from ..data.prompts import load_prompts
from ..data.teacher_answers import ChatSettings, default_answer_cache, teacher_responses
from ..data.text import load_texts, token_blocks
from ..logs import get_logger
from ..data.self_instruct import SelfInstructSettings, self_instruct_pairs

log = get_logger("distill.data")
KINDS = ("text", "chat", "mix")


@dataclass
class Sample:
    """One training sequence: ``input_ids`` (L,) and ``loss_mask`` (L,) over predicting positions."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.input_ids.shape != self.loss_mask.shape or self.input_ids.dim() != 1:
            raise ValueError("input_ids and loss_mask must be 1-D tensors of the same length")


@dataclass
class Batch:
    """A right-padded micro-batch: ids, attention mask and loss mask, all (B, L)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor

    @property
    def tokens(self) -> int:
        """Number of positions that count in the loss."""
        return int(self.loss_mask.sum())

    def labels(self, ignore_index: int = -100) -> torch.Tensor:
        """Next-token targets aligned with the positions (``ignore_index`` where the loss mask is off)."""
        labels = torch.full_like(self.input_ids, ignore_index)
        labels[:, :-1] = self.input_ids[:, 1:]
        return labels.masked_fill(~self.loss_mask, ignore_index)

    def to(self, device: torch.device | str) -> "Batch":
        """The same batch on ``device``."""
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device))


def collate(samples: Sequence[Sample], pad_id: int) -> Batch:
    """Right-pad ``samples`` to the longest one."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    width = max(s.input_ids.numel() for s in samples)
    ids = torch.full((len(samples), width), int(pad_id), dtype=torch.long)
    attn = torch.zeros((len(samples), width), dtype=torch.long)
    loss = torch.zeros((len(samples), width), dtype=torch.bool)
    for row, s in enumerate(samples):
        n = s.input_ids.numel()
        ids[row, :n] = s.input_ids
        attn[row, :n] = 1
        loss[row, :n] = s.loss_mask
    return Batch(ids, attn, loss)


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------


def text_samples(tokenizer: Any, source: str = "wiki", seq_len: int = 512, split: str = "train",
                 max_samples: int | None = None) -> list[Sample]:
    """``source``'s documents of ``split`` packed (eos-separated) into ``seq_len``-token samples."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    texts = load_texts(source, split)
    if not texts:
        raise ValueError(f"text source {source!r} has no documents in split {split!r}")
    blocks = token_blocks(texts, tokenizer, seq_len, max_samples)
    mask = torch.ones(seq_len, dtype=torch.bool)
    mask[-1] = False
    return [Sample(row.clone(), mask.clone()) for row in blocks]


# ---------------------------------------------------------------------------------------------
# chat: the teacher's own responses
# ---------------------------------------------------------------------------------------------


def load_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a ``.jsonl`` file (field ``prompt``, ``instruction`` or ``text``) or a ``.txt`` (one per line)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    if path.suffix == ".txt":
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            text = next((row[k] for k in ("prompt", "instruction", "text") if isinstance(row, dict) and k in row), None)
            if text is None:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'prompt', 'instruction' or 'text' field")
            if str(text).strip():
                prompts.append(str(text).strip())
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def training_prompts(prompts_file: str | Path | None = None, bundled: bool = True) -> list[str]:
    """The bundled ``train`` prompts (unless ``bundled=False``) followed by those of ``prompts_file``."""
    prompts = list(load_prompts("train")) if bundled else []
    if prompts_file is not None:
        prompts += load_prompt_file(prompts_file)
    if not prompts:
        raise ValueError("no chat prompts: give a prompts file or keep the bundled prompts")
    return prompts


def chat_samples(responses: Sequence[dict[str, Any]], seq_len: int, mask_prompt: bool = True) -> list[Sample]:
    """Prompt+response sequences cut to ``seq_len``; loss on response positions (and prompt unless masked)."""
    out = []
    for r in responses:
        prompt, response = list(r["prompt_ids"]), list(r["response_ids"])
        ids = (prompt + response)[:seq_len]
        if len(prompt) >= len(ids) or len(ids) < 2:
            continue  # nothing of the response survives truncation
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[(len(prompt) - 1 if mask_prompt else 0) : len(ids) - 1] = True
        out.append(Sample(torch.tensor(ids, dtype=torch.long), mask))
    if not out:
        raise ValueError(f"no chat sample has a response token within seq_len={seq_len}")
    if len(out) < len(responses):
        log.warning("dropped %d of %d chat samples whose prompt fills seq_len=%d", len(responses) - len(out),
                    len(responses), seq_len)
    return out


# ---------------------------------------------------------------------------------------------
# deterministic order and mixture
# ---------------------------------------------------------------------------------------------


@dataclass
class SampleStream:
    """An infinite, seeded order over one or two pools, with ``chat_ratio`` of chat samples.

    Sample ``i`` is chat when ``floor((i + 1) r) > floor(i r)`` (an exact, evenly spread
    interleave); within each pool, epoch ``e`` visits a permutation seeded by (seed, pool, e).
    The stream is stateless: ``sample(i)`` depends only on ``i``.
    """

    text: list[Sample] = field(default_factory=list)
    chat: list[Sample] = field(default_factory=list)
    chat_ratio: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.chat_ratio <= 1.0:
            raise ValueError(f"chat ratio must be in [0, 1], got {self.chat_ratio}")
        self._ratio = Fraction(self.chat_ratio).limit_denominator(10_000)
        if self._ratio > 0 and not self.chat:
            raise ValueError("chat ratio > 0 but there are no chat samples")
        if self._ratio < 1 and not self.text:
            raise ValueError("chat ratio < 1 but there are no text samples")
        self._perms: dict[tuple[str, int], torch.Tensor] = {}

    def _chat_before(self, i: int) -> int:
        return int(i * self._ratio)  # floor for non-negative Fractions

    def _pick(self, pool_name: str, pool: list[Sample], k: int) -> Sample:
        epoch, offset = divmod(k, len(pool))
        perm = self._perms.get((pool_name, epoch))
        if perm is None:
            tag = int.from_bytes(hashlib.sha256(f"{self.seed}:{pool_name}:{epoch}".encode()).digest()[:7], "big")
            perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(tag))
            self._perms = {key: v for key, v in self._perms.items() if key[1] >= epoch - 1}
            self._perms[(pool_name, epoch)] = perm
        return pool[int(perm[offset])]

    def sample(self, i: int) -> Sample:
        """The ``i``-th sample of the stream."""
        if i < 0:
            raise IndexError(f"negative stream position {i}")
        before, after = self._chat_before(i), self._chat_before(i + 1)
        if after > before:
            return self._pick("chat", self.chat, before)
        return self._pick("text", self.text, i - before)

    def take(self, start: int, count: int) -> list[Sample]:
        """Samples ``start .. start + count - 1``."""
        return [self.sample(i) for i in range(start, start + count)]

    @property
    def epoch_size(self) -> int:
        """Samples in one pass over the pools at the chosen ratio (for logging)."""
        sizes = []
        if self._ratio < 1:
            sizes.append(len(self.text) / float(1 - self._ratio))
        if self._ratio > 0:
            sizes.append(len(self.chat) / float(self._ratio))
        return int(max(sizes))


@dataclass
class DataConfig:
    """What to train on (``kind``: text, chat or mix) and how sequences are built.

    ``self_instruct``: number of self-generated instruction/answer pairs added to the chat pool
    (0: none), made as set by ``self_instruct_settings``. With no bundled prompts and no prompts
    file they are the whole chat pool.
    """

    kind: str = "text"
    text_source: str = "wiki"
    seq_len: int = 512
    mix_ratio: float = 0.5
    prompts_file: str | None = None
    bundled_prompts: bool = True
    mask_prompt: bool = True
    chat: ChatSettings = field(default_factory=ChatSettings)
    heldout_samples: int = 8
    cache_dir: str | None = None
    self_instruct: int = 0
    self_instruct_settings: SelfInstructSettings = field(default_factory=SelfInstructSettings)

    def __post_init__(self) -> None:
        if isinstance(self.chat, dict):
            self.chat = ChatSettings(**self.chat)
        if isinstance(self.self_instruct_settings, dict):
            self.self_instruct_settings = SelfInstructSettings(**self.self_instruct_settings)
        if self.kind not in KINDS:
            raise ValueError(f"data kind must be one of {KINDS}, got {self.kind!r}")
        if not 0.0 <= self.mix_ratio <= 1.0:
            raise ValueError(f"mix ratio (fraction of chat samples) must be in [0, 1], got {self.mix_ratio}")
        if self.self_instruct < 0:
            raise ValueError(f"self_instruct (number of self-generated pairs) must be >= 0, got {self.self_instruct}")
        if self.self_instruct and self.kind == "text":
            raise ValueError("self_instruct adds chat samples: use data kind 'chat' or 'mix'")

    def response_cache(self) -> Path:
        """Where teacher responses are cached (default ``$UPQ_CACHE/distill-data``, shared by runs)."""
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_answer_cache()

    @property
    def chat_ratio(self) -> float:
        """Fraction of chat samples in the stream."""
        return {"text": 0.0, "chat": 1.0, "mix": self.mix_ratio}[self.kind]


def build_stream(cfg: DataConfig, tokenizer: Any, teacher: torch.nn.Module | None, cache_dir: str | Path | None,
                 seed: int = 0) -> SampleStream:
    """The training stream for ``cfg`` (the teacher is needed only for chat data)."""
    text: list[Sample] = []
    chat: list[Sample] = []
    if cfg.chat_ratio < 1:
        text = text_samples(tokenizer, cfg.text_source, cfg.seq_len, "train")
    if cfg.chat_ratio > 0:
        if teacher is None:
            raise ValueError("chat data needs the teacher model to generate responses")
        responses: list[dict[str, Any]] = []
        if cfg.bundled_prompts or cfg.prompts_file is not None or not cfg.self_instruct:
            prompts = training_prompts(cfg.prompts_file, cfg.bundled_prompts)
            responses += teacher_responses(teacher, tokenizer, prompts, cfg.chat, cache_dir)
        if cfg.self_instruct:
            responses += self_instruct_pairs(teacher, tokenizer, cfg.self_instruct, cfg.self_instruct_settings,
                                             cfg.chat, cache_dir)
        chat = chat_samples(responses, cfg.seq_len, cfg.mask_prompt)
    log.info("training data: %d text sequences, %d chat samples, chat ratio %.2f", len(text), len(chat), cfg.chat_ratio)
    return SampleStream(text, chat, cfg.chat_ratio, seed)


def heldout_samples(cfg: DataConfig, tokenizer: Any, teacher: torch.nn.Module | None,
                    cache_dir: str | Path | None) -> list[Sample]:
    """A small fixed held-out set: held-out text blocks and/or teacher answers to the eval prompts."""
    n = cfg.heldout_samples
    if n < 1:
        return []
    out: list[Sample] = []
    if cfg.chat_ratio < 1:
        out += text_samples(tokenizer, cfg.text_source, cfg.seq_len, "heldout", n)[:n]
    if cfg.chat_ratio > 0 and teacher is not None:
        responses = teacher_responses(teacher, tokenizer, load_prompts("eval")[:n], cfg.chat, cache_dir)
        out += chat_samples(responses, cfg.seq_len, cfg.mask_prompt)
    return out
