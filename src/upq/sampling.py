"""Next-token choice from logits: greedy, or temperature with optional top-k and nucleus (top-p)."""

from __future__ import annotations

import torch

__all__ = ["pick_tokens"]


def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None, top_k: int | None = None) -> torch.Tensor:
    """Next token per row of ``logits`` ``[rows, vocab]``: greedy, or temperature + top-k + nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p  # never drops the top token
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
