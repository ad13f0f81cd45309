"""Batched text generation for chat prompts (greedy or sampled), order-preserving.

Prompts are rendered (with the chat template when ``chat=True``), sorted longest first and
decoded by continuous batching: a fixed number of rows share one forward per step, each row
stops at its first eos (or ``max_new_tokens``) and its slot is refilled with the next prompts.
Results come back in the caller's order.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from .interactive import eos_token_ids, resolve_engine
from .native_decode import NativeDecoder, native_decoder
from .kv_slots import SlotKVCache
from .sampling import pick_tokens

__all__ = ["Generation", "render_prompt", "pick_tokens", "generate_ids", "generate"]


@dataclass
class Generation:
    """One generated sample as token ids.

    ``response_ids`` include the terminating eos when ``finished`` (the model stopped by itself
    rather than hitting ``max_new_tokens``).
    """

    prompt_ids: list[int]
    response_ids: list[int]
    finished: bool


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, *, chat: bool = True) -> list[int]:
    """Token ids of ``prompt``: a one-turn chat with the generation prompt, or plain text."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("tokenizer has no chat template; use chat=False for plain prompts")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class _Row:
    """A prompt being generated in one slot of the continuous batch."""

    index: int
    response: list[int] = field(default_factory=list)


class _ContinuousBatch:
    """Greedy/sampled decoding of many prompts over ``slots`` rows that are refilled as rows end.

    One batched forward per step serves every live row; a row that stops (eos or
    ``max_new_tokens``) frees its slot, and once ``refill_at`` slots are free the next prompts
    are prefilled together and written into them (:class:`upq.kv_slots.SlotKVCache`). With no
    prompts left, finished slots are dropped so the tail of a run shrinks its batch.
    """

    def __init__(self, model: PreTrainedModel, encoded: list[list[int]], *, slots: int,
                 max_new_tokens: int, eos: list[int], pad: int, temperature: float, top_p: float,
                 generator: torch.Generator | None, on_tokens: Callable[[int, int], None]) -> None:
        self.model, self.encoded = model, encoded
        self.max_new, self.eos, self.pad = max_new_tokens, set(eos), pad
        self.temperature, self.top_p, self.generator = temperature, top_p, generator
        self.on_tokens = on_tokens  # (new tokens, rows finished) after every step
        self.device = _model_device(model)
        self.refill_at = max(1, slots // 8)
        longest = max(len(e) for e in encoded)
        self.cache = SlotKVCache(slots, capacity=longest + max_new_tokens + 1)
        self.rows: list[_Row | None] = [None] * slots
        self.mask = torch.zeros((slots, 0), dtype=torch.long, device=self.device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.last = torch.full((slots,), pad, dtype=torch.long, device=self.device)
        self.results: dict[int, Generation] = {}

    def run(self, order: Sequence[int]) -> dict[int, Generation]:
        """Generate for the prompts in ``order``; returns ``{prompt index: Generation}``."""
        pending = deque(order)
        while pending or any(self.rows):
            free = [s for s, r in enumerate(self.rows) if r is None]
            if pending and (len(free) >= self.refill_at or len(free) == len(self.rows)):
                group = [pending.popleft() for _ in range(min(len(free), len(pending)))]
                for at in range(0, len(group), self.refill_at):  # similar lengths: little padding
                    chunk = group[at:at + self.refill_at]
                    self._refill(free[at:at + len(chunk)], chunk)
                continue
            if not pending and len(free) >= max(1, len(self.rows) // 8):
                self._drop(free)
            self._step()
        return self.results

    def _accept(self, slots: list[int], tokens: torch.Tensor) -> None:
        """Record one new token per slot in ``slots``; end rows that stop."""
        finished = 0
        self.last[slots] = tokens
        for s, token in zip(slots, tokens.tolist()):
            row = self.rows[s]
            row.response.append(token)
            if token in self.eos or len(row.response) >= self.max_new:
                ids = self.encoded[row.index]
                self.results[row.index] = Generation(list(ids), row.response, token in self.eos)
                self.rows[s] = None
                finished += 1
        self.on_tokens(len(slots), finished)

    def _refill(self, slots: list[int], group: list[int]) -> None:
        """Prefill the prompts ``group`` together and move them into the free ``slots``."""
        width = max(len(self.encoded[i]) for i in group)
        ids = torch.full((len(group), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, i in enumerate(group):
            n = len(self.encoded[i])
            ids[r, width - n:] = torch.tensor(self.encoded[i], dtype=torch.long)
            mask[r, width - n:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        prefilled = DynamicCache()
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                            past_key_values=prefilled, use_cache=True, logits_to_keep=1).logits[:, -1]
        before = self.cache.width
        rows = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.cache.write_prefill(rows, prefilled, width)
        if self.cache.width > before:  # the window grew on the left
            pad = self.mask.new_zeros((self.mask.shape[0], self.cache.width - before))
            self.mask = torch.cat([pad, self.mask], dim=1)
        self.mask[rows] = 0
        self.mask[rows, self.mask.shape[1] - width:] = mask
        self.positions[rows] = mask.sum(-1)
        for s, i in zip(slots, group):
            self.rows[s] = _Row(i)
        self._accept(slots, pick_tokens(logits, self.temperature, self.top_p, self.generator))
        self._trim()

    def _drop(self, slots: list[int]) -> None:
        """Remove the (finished) ``slots`` from the batch."""
        dropped = set(slots)
        keep = [s for s in range(len(self.rows)) if s not in dropped]
        rows = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.cache.keep_rows(rows)
        self.rows = [self.rows[s] for s in keep]
        self.mask, self.positions, self.last = self.mask[rows], self.positions[rows], self.last[rows]
        self._trim()

    def _trim(self) -> None:
        """Stop attending to leading columns that no live row uses."""
        live = [s for s, r in enumerate(self.rows) if r is not None]
        if not live:
            return
        used = self.mask[live].any(dim=0)
        first = int(used.to(torch.int8).argmax()) if bool(used.any()) else 0
        if first:
            self.cache.trim(first)
            self.mask = self.mask[:, first:]

    def _step(self) -> None:
        """One decode step for every slot (finished slots compute and are ignored)."""
        self.cache.reserve(1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        logits = self.model(input_ids=self.last[:, None], attention_mask=self.mask,
                            position_ids=self.positions[:, None], past_key_values=self.cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        self.cache.end += 1
        self.positions += 1
        live = [s for s, r in enumerate(self.rows) if r is not None]
        self._accept(live, pick_tokens(logits[live], self.temperature, self.top_p, self.generator))


class _NativeBatch:
    """Continuous batching on the native decoder (:mod:`upq.native_decode`): every prompt gets a
    cache slot of its own, one forward per step serves the live slots (no padding, no mask), and
    freed slots take the next prompts, prefilled together in one forward.
    """

    def __init__(self, decoder: NativeDecoder, encoded: list[list[int]], *, slots: int, max_new_tokens: int,
                 eos: list[int], temperature: float, top_p: float, generator: torch.Generator | None,
                 on_tokens: Callable[[int, int], None]) -> None:
        self.decoder, self.encoded = decoder, encoded
        self.max_new, self.eos = max_new_tokens, set(eos)
        self.temperature, self.top_p, self.generator = temperature, top_p, generator
        self.on_tokens = on_tokens
        decoder.reset(slots, max(len(e) for e in encoded) + max_new_tokens)
        self.rows: list[_Row | None] = [None] * slots
        self.lengths = [0] * slots
        self.results: dict[int, Generation] = {}

    def run(self, order: Sequence[int]) -> dict[int, Generation]:
        """Generate for the prompts in ``order``; returns ``{prompt index: Generation}``."""
        pending = deque(order)
        while pending or any(self.rows):
            free = [s for s, r in enumerate(self.rows) if r is None]
            if pending and free:
                self._prefill([(s, pending.popleft()) for s in free[:len(pending)]])
            else:
                self._step()
        return self.results

    def _forward(self, tokens: list[int], slots: list[int], positions: list[int], logit_rows: list[int],
                 owners: list[int]) -> None:
        logits = self.decoder.forward(tokens, slots, positions, logit_rows)
        picked = pick_tokens(logits, self.temperature, self.top_p, self.generator).tolist()
        finished = 0
        for s, token in zip(owners, picked):
            row = self.rows[s]
            row.response.append(token)
            self.lengths[s] += 1
            if token in self.eos or len(row.response) >= self.max_new:
                self.results[row.index] = Generation(list(self.encoded[row.index]), row.response, token in self.eos)
                self.rows[s] = None
                finished += 1
        self.on_tokens(len(owners), finished)

    def _prefill(self, assignments: list[tuple[int, int]]) -> None:
        """Prompts into free slots: ``(slot, prompt index)`` pairs, one forward for all of them."""
        tokens, slots, positions, logit_rows = [], [], [], []
        for s, i in assignments:
            ids = self.encoded[i]
            tokens += ids
            slots += [s] * len(ids)
            positions += range(len(ids))
            logit_rows.append(len(tokens) - 1)
            self.rows[s], self.lengths[s] = _Row(i), len(ids) - 1
        self._forward(tokens, slots, positions, logit_rows, [s for s, _ in assignments])

    def _step(self) -> None:
        """One new token for every live slot."""
        live = [s for s, r in enumerate(self.rows) if r is not None]
        tokens = [self.rows[s].response[-1] for s in live]
        self._forward(tokens, live, [self.lengths[s] for s in live], list(range(len(live))), live)


@torch.no_grad()
def generate_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | Sequence[int]],
    *,
    chat: bool = True,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    engine: str = "auto",
) -> list[Generation]:
    """Generate a response to each prompt; returns token ids in the order of ``prompts``.

    A prompt is a text (rendered by :func:`render_prompt`) or a list of token ids used as is.
    Continuous batching over ``batch_size`` rows: prompts go longest first, and a row that stops
    is refilled with the next prompts (see :class:`_ContinuousBatch`). ``temperature == 0`` is
    greedy decoding; sampling is seeded with ``seed`` (results then also depend on ``batch_size``).
    ``engine``: ``native`` (the C++ forward of :mod:`upq.native_decode`, one cache slot per
    prompt), ``upq`` (transformers' forward on a slotted cache), or ``auto`` (native when it can
    run the model).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        return []
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    encoded = [render_prompt(tokenizer, p, chat=chat) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    if any(not e for e in encoded):
        raise ValueError("an empty prompt encodes to no tokens")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=_model_device(model))
        generator.manual_seed(seed)
    bar = None
    if progress and len(prompts) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="generate", unit="prompt")
    started, tokens = time.perf_counter(), 0

    shown = started

    def on_tokens(n_new: int, finished: int) -> None:
        nonlocal tokens, shown
        tokens += n_new
        now = time.perf_counter()
        if bar is not None and (finished or now - shown > 2.0):  # alive even while no row ends
            bar.update(finished)
            bar.set_postfix(tokens=tokens, tok_s=f"{tokens / max(now - started, 1e-9):.0f}")
            shown = now

    was_training = model.training
    model.eval()
    try:
        slots = min(batch_size, len(prompts))
        if resolve_engine(model, engine) == "native":
            batch = _NativeBatch(native_decoder(model), encoded, slots=slots, max_new_tokens=max_new_tokens,
                                 eos=eos, temperature=temperature, top_p=top_p, generator=generator,
                                 on_tokens=on_tokens)
        else:
            batch = _ContinuousBatch(model, encoded, slots=slots, max_new_tokens=max_new_tokens, eos=eos,
                                     pad=pad, temperature=temperature, top_p=top_p, generator=generator,
                                     on_tokens=on_tokens)
        results = batch.run(order)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return [results[i] for i in range(len(encoded))]


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    chat: bool = True,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    engine: str = "auto",
) -> list[str]:
    """Generate a response text for each prompt (special tokens stripped), in input order.

    See :func:`generate_ids` for the arguments.
    """
    gens = generate_ids(
        model, tokenizer, prompts, chat=chat, max_new_tokens=max_new_tokens,
        batch_size=batch_size, temperature=temperature, top_p=top_p, seed=seed, progress=progress, engine=engine,
    )
    return [tokenizer.decode(g.response_ids, skip_special_tokens=True).strip() for g in gens]
