"""Streaming generation for people: ``upq generate`` (one prompt) and ``upq chat`` (a conversation).

Tokens are printed as they are produced (transformers' ``TextStreamer`` underneath) and timed,
so every call also reports prefill time and decode tokens/s. Works on any causal LM; on a upq
checkpoint the ``PackedLinear`` layers use whichever backend was set (see
``upq.modules.set_backend``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from .native_decode import NativeDecoder, native_decode_reason, native_decoder
from .sampling import pick_tokens

ENGINES = ("auto", "native", "upq", "hf")

__all__ = ["ENGINES", "resolve_engine", "SamplingSettings", "GenerationStats", "TimingStreamer", "encode_chat", "stream_generate", "chat_loop"]


@dataclass
class SamplingSettings:
    """Decoding options. ``temperature == 0`` is greedy; ``cache`` is ``dynamic`` or ``static``
    (a pre-allocated KV cache; ``min_new_tokens`` forces a length, e.g. for benchmarks)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = 0
    cache: str = "dynamic"
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.cache not in ("dynamic", "static"):
            raise ValueError(f"cache must be 'dynamic' or 'static', got {self.cache!r}")


@dataclass
class GenerationStats:
    """Token counts and wall times of one generate call."""

    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    finished: bool

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens/s after the first new token (the steady decode rate)."""
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else float("nan")

    def describe(self) -> str:
        """One human line, e.g. ``128 tokens, prefill 0.05 s, decode 61.2 tokens/s``."""
        return (f"{self.new_tokens} tokens ({'eos' if self.finished else 'length'}), prompt {self.prompt_tokens} "
                f"tokens, prefill {self.prefill_s:.3f} s, decode {self.decode_tokens_per_s:.1f} tokens/s")


class TimingStreamer(TextStreamer):
    """A ``TextStreamer`` that records when each new token arrives and writes text via ``write``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, write: Callable[[str], None] | None = None) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.write = write
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:
            self.times.extend([time.perf_counter()] * int(value.numel()))
        if self.write is None:
            self.next_tokens_are_prompt = False
            return
        super().put(value)

    def end(self) -> None:
        if self.write is not None:
            super().end()

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.write is not None:
            self.write(text + ("\n" if stream_end else ""))


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """All ids that end a response (tokenizer eos and the generation config's)."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    if not ids:
        raise ValueError("no eos token id: generation would never stop (check the tokenizer)")
    return ids


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation rendered with the chat template, ready for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; use `upq generate --no-chat` for plain text")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _make_cache(model: PreTrainedModel, kind: str, max_len: int):
    from transformers import DynamicCache, StaticCache

    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    return DynamicCache(config=model.config)


def _select(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None) -> int:
    """Next token id from last-position logits (1-D): greedy, or temperature/top-k/top-p sampling."""
    return int(pick_tokens(logits[None], settings.temperature, settings.top_p, generator, settings.top_k)[0])


@torch.no_grad()
def stream_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: list[int],
    settings: SamplingSettings,
    write: Callable[[str], None] | None = None,
    engine: str = "auto",
) -> tuple[list[int], GenerationStats]:
    """Generate after ``input_ids``, streaming text to ``write`` (None: silent); returns new ids and timings.

    ``engine``: ``"native"`` runs the whole forward in C++ (:mod:`upq.native_decode`); ``"upq"``
    is a lean decode loop over transformers' forward (one forward per token on a KV cache,
    last-position logits only); ``"hf"`` uses ``model.generate``; ``"auto"`` is ``native`` when
    the native decoder can run the model, else ``upq``. All stop at eos and return the ids before it.
    """
    if not input_ids:
        raise ValueError("empty prompt")
    engine = resolve_engine(model, engine)
    eos = eos_token_ids(model, tokenizer)
    streamer = TimingStreamer(tokenizer, write)
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)
    start = time.perf_counter()
    if engine == "hf":
        new = _hf_generate(model, tokenizer, ids, settings, eos, streamer)
    elif engine == "native":
        new = _native_generate(native_decoder(model), ids, settings, eos, streamer)
    else:
        new = _lean_generate(model, ids, settings, eos, streamer)
    end = time.perf_counter()
    stop = next((i for i, t in enumerate(new) if t in eos), None)
    times = streamer.times or [end]
    stats = GenerationStats(
        prompt_tokens=len(input_ids),
        new_tokens=len(new),
        prefill_s=times[0] - start,
        decode_s=times[-1] - times[0],
        finished=stop is not None,
    )
    return (new if stop is None else new[:stop]), stats


def resolve_engine(model: torch.nn.Module, engine: str) -> str:
    """The decode engine that runs: ``auto`` becomes ``native`` when the native decoder can run
    ``model``, else ``upq``; naming ``native`` for a model it cannot run raises ``ValueError``."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine in ("auto", "native"):
        reason = native_decode_reason(model)
        if reason is None:
            return "native"
        if engine == "native":
            raise ValueError(f"the native decoder cannot run this model: {reason}")
        return "upq"
    return engine


def _generator(settings: SamplingSettings, device: torch.device) -> torch.Generator | None:
    if settings.temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(settings.seed if settings.seed is not None else torch.seed())
    return generator


def _decode_loop(logits: torch.Tensor, n_prompt: int, step: Callable[[int, int], torch.Tensor],
                 settings: SamplingSettings, eos: list[int], streamer: TimingStreamer,
                 generator: torch.Generator | None) -> list[int]:
    """Pick tokens from the prompt's last logits on: ``step(token, position)`` runs one new token
    and returns its logits; stops at eos (after ``min_new_tokens``) or ``max_new_tokens``."""
    new: list[int] = []
    eos_set = set(eos)
    while True:
        if len(new) < settings.min_new_tokens:
            logits = logits.clone()
            logits[eos] = float("-inf")
        token = _select(logits, settings, generator)
        new.append(token)
        streamer.put(torch.tensor([token]))
        if token in eos_set or len(new) >= settings.max_new_tokens:
            break
        logits = step(token, n_prompt + len(new) - 1)
    streamer.end()
    return new


def _native_generate(decoder: NativeDecoder, ids: torch.Tensor, settings: SamplingSettings, eos: list[int],
                     streamer: TimingStreamer) -> list[int]:
    """The decode loop on the native decoder: one slot, prefill, then one token per forward."""
    generator = _generator(settings, ids.device)
    prompt = ids[0].tolist()
    decoder.reset(1, len(prompt) + settings.max_new_tokens)
    streamer.put(ids.cpu())
    logits = decoder.prefill(0, prompt)
    return _decode_loop(logits, len(prompt), lambda token, at: decoder.forward([token], [0], [at], [0])[0],
                        settings, eos, streamer, generator)


def _lean_generate(model: PreTrainedModel, ids: torch.Tensor, settings: SamplingSettings, eos: list[int],
                   streamer: TimingStreamer) -> list[int]:
    """The decode loop over transformers' forward: prefill, then one single-token forward per new token."""
    generator = _generator(settings, ids.device)
    n_prompt = ids.shape[1]
    cache = _make_cache(model, settings.cache, n_prompt + settings.max_new_tokens)
    streamer.put(ids.cpu())
    positions = torch.arange(n_prompt, device=ids.device).unsqueeze(0)
    logits = model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True,
                   logits_to_keep=1).logits[0, -1]

    def step(token: int, at: int) -> torch.Tensor:
        return model(input_ids=torch.tensor([[token]], dtype=torch.long, device=ids.device),
                     position_ids=torch.tensor([[at]], device=ids.device), past_key_values=cache,
                     use_cache=True).logits[0, -1]

    return _decode_loop(logits, n_prompt, step, settings, eos, streamer, generator)


def _hf_generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor,
                 settings: SamplingSettings, eos: list[int], streamer: TimingStreamer) -> list[int]:
    """``model.generate`` with the same settings (reference engine)."""
    sample = settings.temperature > 0
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens or None,
        do_sample=sample,
        temperature=settings.temperature if sample else None,
        top_p=settings.top_p if sample else None,
        top_k=settings.top_k if sample else None,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0],
        use_cache=True,
        cache_implementation="static" if settings.cache == "static" else None,
    )
    if sample and settings.seed is not None:
        torch.manual_seed(settings.seed)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=streamer)
    return out[0, ids.shape[1]:].tolist()


@dataclass
class ChatState:
    """The running conversation of ``chat_loop``."""

    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []


def chat_loop(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    settings: SamplingSettings,
    system: str | None = None,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] | None = None,
    show_stats: bool = True,
    engine: str = "auto",
) -> ChatState:
    """A terminal chat: ``/reset`` starts over, ``/exit`` (or end of input) quits.

    Old turns are dropped when the conversation would not fit the model's context.
    """
    out = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    state = ChatState(system=system)
    state.reset()
    limit = getattr(model.config, "max_position_embeddings", None)
    out("Chat started. /reset clears the conversation, /exit quits.\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            out("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            state.reset()
            out("(conversation cleared)\n")
            continue
        state.messages.append({"role": "user", "content": text})
        ids = encode_chat(tokenizer, state.messages)
        first = 1 if state.system else 0
        while limit and len(ids) + settings.max_new_tokens > limit and len(state.messages) - first > 1:
            del state.messages[first : first + 2]  # oldest user/assistant pair
            ids = encode_chat(tokenizer, state.messages)
        out("assistant> ")
        new, stats = stream_generate(model, tokenizer, ids, settings, write=out, engine=engine)
        state.messages.append({"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True).strip()})
        if show_stats:
            sys.stderr.write(f"[{stats.describe()}]\n")
    return state
