"""Perplexity over non-overlapping windows of packed text.

All texts are tokenized and joined (eos between documents) into one stream, cut into
non-overlapping windows of ``seq_len`` tokens (the last one may be shorter); every token but
the first of each window is predicted from the tokens before it in its window. The result is
token-weighted: ``nll`` = total negative log-likelihood / predicted tokens, ``ppl = exp(nll)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from upq.data.text import pack_token_ids

__all__ = ["perplexity", "window_nll"]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def window_nll(model: torch.nn.Module, windows: torch.LongTensor) -> tuple[float, int]:
    """Summed next-token NLL (float64) and number of predicted tokens for ``[b, t]`` windows."""
    if windows.shape[1] < 2:
        return 0.0, 0
    logits = model(input_ids=windows.to(_device(model)), use_cache=False).logits
    total = 0.0
    for row in range(windows.shape[0]):  # one row at a time keeps float32 copies small
        lg = logits[row, :-1].float()
        target = windows[row, 1:].to(lg.device)
        total += F.cross_entropy(lg, target, reduction="sum").double().item()
    return total, windows.shape[0] * (windows.shape[1] - 1)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    seq_len: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 4,
) -> dict:
    """Token-weighted perplexity of ``model`` on ``texts``.

    Returns ``{"ppl", "nll", "tokens", "windows", "seq_len"}`` where ``tokens`` counts predicted
    tokens. ``max_tokens`` caps the packed stream length (evaluation cost).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    ids = pack_token_ids(texts, tokenizer, max_tokens=max_tokens)
    if ids.numel() < 2:
        raise ValueError("not enough text to measure perplexity (need at least 2 tokens)")
    was_training = model.training
    model.eval()
    try:
        n_full = ids.numel() // seq_len
        full = ids[: n_full * seq_len].view(n_full, seq_len)
        total, count = 0.0, 0
        for start in range(0, n_full, batch_size):
            s, c = window_nll(model, full[start : start + batch_size])
            total, count = total + s, count + c
        tail = ids[n_full * seq_len :]
        windows = n_full
        if tail.numel() >= 2:
            s, c = window_nll(model, tail.unsqueeze(0))
            total, count, windows = total + s, count + c, windows + 1
    finally:
        model.train(was_training)
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": windows, "seq_len": seq_len}
