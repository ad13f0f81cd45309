"""Agreement with the original model on its own chat responses.

1. :func:`build_reference` -- the original (teacher) model answers a fixed prompt set greedily;
   prompt and response token ids are kept (and cached as JSON, keyed by a hash of the model's
   weights, the rendered prompts and the settings).
2. :func:`kl_and_agreement` -- student and teacher read the same prompt+response sequences;
   on response positions only we measure the mean ``KL(teacher || student)`` per token and the
   top-1 agreement (same argmax). Teacher logits are computed on the fly (nothing huge stored);
   KL is computed in float32 with ``log_softmax``, in chunks of positions.
"""

from __future__ import annotations


import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from upq.digest import json_digest
from upq.evaluation.report import read_json, write_json_atomic
from upq.generation import generate_ids, render_prompt

__all__ = [
    "Reference",
    "model_fingerprint",
    "build_reference",
    "kl_and_agreement",
    "compare_to_reference",
]

_FORMAT = 1


@dataclass
class Reference:
    """Greedy responses of the reference model: per sample prompt ids + response ids."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    finished: list[bool]
    settings: dict = field(default_factory=dict)
    key: str = ""

    @property
    def tokens(self) -> int:
        """Number of response tokens (the positions that are scored)."""
        return sum(len(r) for r in self.response_ids)

    def to_json(self, path: str | Path) -> Path:
        """Write to ``path`` atomically."""
        return write_json_atomic(path, {"format": _FORMAT, **asdict(self)}, indent=None)

    @classmethod
    def from_json(cls, path: str | Path) -> "Reference":
        """Read a reference written by :meth:`to_json`."""
        data = read_json(path)
        if data.pop("format", None) != _FORMAT:
            raise ValueError(f"{path}: not a upq reference file (format {_FORMAT})")
        return cls(**data)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap sha256 identity of a model's weights (names, shapes, dtypes, sums, samples)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            if t.numel() == 0:
                continue
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64]
            if flat.is_floating_point():
                stats = [flat.double().sum().item(), flat.double().abs().sum().item()]
                h.update(json.dumps(stats).encode())
                sample = sample.double()
            h.update(sample.cpu().numpy().tobytes())
    return h.hexdigest()


def _reference_key(fingerprint: str, prompt_ids: list[list[int]], settings: dict) -> str:
    return json_digest({"model": fingerprint, "prompts": prompt_ids, "settings": settings})


def build_reference(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 128,
    *,
    chat: bool = True,
    batch_size: int = 8,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Reference:
    """Greedy responses of ``model`` to ``prompts`` as a :class:`Reference`.

    With ``cache_dir``, the result is stored as ``reference-<key>.json`` there and reused when
    the same model weights, rendered prompts and settings are asked for again.
    """
    prompts = list(prompts)
    settings = {"max_new_tokens": max_new_tokens, "chat": chat, "decoding": "greedy"}
    rendered = [render_prompt(tokenizer, p, chat=chat) for p in prompts]
    key = _reference_key(model_fingerprint(model), rendered, settings)
    path = Path(cache_dir) / f"reference-{key[:20]}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        ref = Reference.from_json(path)
        if ref.key == key:
            return ref
    gens = generate_ids(model, tokenizer, prompts, chat=chat, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, progress=progress)
    ref = Reference(
        prompts=prompts,
        prompt_ids=[g.prompt_ids for g in gens],
        response_ids=[g.response_ids for g in gens],
        finished=[g.finished for g in gens],
        settings=settings,
        key=key,
    )
    if path is not None:
        ref.to_json(path)
    return ref


def _batches(reference: Reference, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded batches: ids, mask, and (row, position, target) of every response token."""
    samples = [(p, r) for p, r in zip(reference.prompt_ids, reference.response_ids) if r]
    samples.sort(key=lambda s: len(s[0]) + len(s[1]))  # similar lengths -> little padding
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        width = max(len(p) + len(r) for p, r in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        rows, pos, tgt = [], [], []
        for i, (p, r) in enumerate(chunk):
            seq = p + r
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, : len(seq)] = 1
            rows += [i] * len(r)
            pos += list(range(len(p) - 1, len(seq) - 1))  # logits at t predict token t+1
            tgt += r
        yield ids, mask, torch.tensor(rows), torch.tensor(pos), torch.tensor(tgt)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _response_logits(model, ids, mask, rows, pos) -> torch.Tensor:
    dev = _device(model)
    logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
    return logits[rows.to(dev), pos.to(dev)]


@torch.no_grad()
def _score(student, teacher, reference: Reference, batch_size: int, chunk_tokens: int) -> dict:
    """Sums over response tokens of KL, top-1 matches, reference-token matches and NLL."""
    kl_sum, top1, ref_hits, nll_sum, uniform_sum, n = 0.0, 0, 0, 0.0, 0.0, 0
    models = [m for m in (student, teacher) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        for ids, mask, rows, pos, tgt in _batches(reference, batch_size):
            s_all = _response_logits(student, ids, mask, rows, pos)
            t_all = _response_logits(teacher, ids, mask, rows, pos) if teacher is not None else None
            tgt = tgt.to(s_all.device)
            for c in range(0, s_all.shape[0], chunk_tokens):
                ls = F.log_softmax(s_all[c : c + chunk_tokens].float(), dim=-1)
                y = tgt[c : c + chunk_tokens]
                nll_sum += -ls.gather(1, y[:, None]).double().sum().item()
                s_arg = ls.argmax(-1)
                ref_hits += int((s_arg == y).sum())
                if t_all is not None:
                    lt = F.log_softmax(t_all[c : c + chunk_tokens].to(ls.device).float(), dim=-1)
                    kl = (lt.exp() * (lt - ls)).sum(-1)
                    kl_sum += kl.double().sum().item()
                    entropy = -(lt.exp() * lt).sum(-1)
                    uniform_sum += (math.log(lt.shape[-1]) - entropy).double().sum().item()
                    top1 += int((lt.argmax(-1) == s_arg).sum())
            n += s_all.shape[0]
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return {"kl_sum": kl_sum, "top1": top1, "ref_hits": ref_hits, "nll_sum": nll_sum, "uniform_sum": uniform_sum,
            "n": n}


def _result(sums: dict, with_teacher: bool) -> dict:
    n = sums["n"]
    if n == 0:
        raise ValueError("the reference has no response tokens to score")
    return {
        "kl": sums["kl_sum"] / n if with_teacher else None,
        "top1_agreement": sums["top1"] / n if with_teacher else None,
        "uniform_kl": sums["uniform_sum"] / n if with_teacher else None,
        "ref_agreement": sums["ref_hits"] / n,
        "ref_nll": sums["nll_sum"] / n,
        "tokens": n,
    }


def kl_and_agreement(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    reference: Reference,
    batch_size: int = 4,
    *,
    chunk_tokens: int = 256,
) -> dict:
    """Mean ``KL(teacher || student)`` per response token and top-1 agreement (same argmax).

    Returns ``{"kl", "top1_agreement", "uniform_kl", "ref_agreement", "ref_nll", "tokens"}``:
    ``uniform_kl`` is the KL a uniform guess would score (log V minus the teacher's mean entropy:
    a model above it is confidently wrong), ``ref_agreement`` is how often the student's argmax
    equals the reference token and ``ref_nll`` the student's mean NLL of the reference tokens.
    """
    return _result(_score(student, teacher, reference, batch_size, chunk_tokens), True)


def compare_to_reference(
    model: torch.nn.Module,
    reference: Reference,
    teacher: torch.nn.Module | None = None,
    batch_size: int = 4,
) -> dict:
    """:func:`kl_and_agreement` when a teacher is given; otherwise only the reference-token
    metrics (``ref_agreement``, ``ref_nll``), with ``kl`` and ``top1_agreement`` None."""
    return _result(_score(model, teacher, reference, batch_size, 256), teacher is not None)
