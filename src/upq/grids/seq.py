"""SEQ, stretched elastic quantization (ParetoQ), the grid UPQ uses.

Symmetric, no zero level, one learnable scale Delta per row or group, n = 2**(bits-1):
``Q(W) = Delta * (round(n * clip(W / Delta, -1 + eps, 1 - eps) - 0.5) + 0.5) / n``.
Code k in [0, 2n) stands for the level ``(k - n + 0.5) / n * Delta``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import GridSpec, QuantizedWeight, to_groups

EPS = 0.01


def _half_levels(bits: int) -> int:
    return 1 << (bits - 1)


def seq_codes(w: torch.Tensor, delta: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2**bits) of grouped weights ``w`` (..., g) with scales ``delta`` (..., 1)."""
    n = _half_levels(bits)
    x = torch.clamp(w / delta, -1 + EPS, 1 - EPS)
    return (torch.round(n * x - 0.5) + n).to(torch.uint8)


def seq_levels(codes: torch.Tensor, delta: torch.Tensor, bits: int) -> torch.Tensor:
    """Dequantized values of grouped codes (..., g) with scales (..., 1)."""
    n = _half_levels(bits)
    return delta * ((codes.to(delta.dtype) - n + 0.5) / n)


class _SEQFakeQuant(torch.autograd.Function):
    """Forward: SEQ quantize-dequantize. Backward: STE for W, LSQ-style gradient for Delta."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, delta: torch.Tensor, bits: int, grad_scale: float) -> torch.Tensor:
        n = _half_levels(bits)
        x = w / delta
        inside = (x > -1 + EPS) & (x < 1 - EPS)
        q = (torch.round(n * torch.clamp(x, -1 + EPS, 1 - EPS) - 0.5) + 0.5) / n
        ctx.save_for_backward(x, q, inside)
        ctx.grad_scale = grad_scale
        return delta * q

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, q, inside = ctx.saved_tensors
        grad_w = grad_out * inside
        # inside the clip range d(out)/dDelta = q - x (STE through round); at the clipped ends q.
        ddelta = torch.where(inside, q - x, q)
        grad_delta = (grad_out * ddelta).sum(dim=-1, keepdim=True) * ctx.grad_scale
        return grad_w, grad_delta, None, None


def seq_grad_scale(numel: int, bits: int) -> float:
    """LSQ gradient scale for Delta: 1 / sqrt(numel(W) * (2**(bits-1) - 1)), with a floor of 1 level."""
    return 1.0 / math.sqrt(numel * max(_half_levels(bits) - 1, 1))


def seq_fake_quant(w: torch.Tensor, delta: torch.Tensor, bits: int, grad_scale: float | None = None) -> torch.Tensor:
    """Differentiable SEQ quantize-dequantize of grouped ``w`` (..., g) with ``delta`` (..., 1)."""
    if grad_scale is None:
        grad_scale = seq_grad_scale(w.numel(), bits)
    return _SEQFakeQuant.apply(w, delta, bits, grad_scale)


@torch.no_grad()
def seq_mse_scale(groups: torch.Tensor, bits: int, steps: int = 41, lowest: float = 0.2) -> torch.Tensor:
    """Per-group Delta minimising ``||Q(w) - w||^2`` over ``Delta = a * max|w|``.

    ``a`` runs over ``steps`` values from ``lowest`` to ``n / (n - 0.5)`` (where the top level
    lands on max|w|) plus 1 (the plain max init, so the result is never worse than it).
    ``groups`` is (..., g); returns (...). At 2 bits the max init leaves most weights on the
    inner levels, which a smaller scale fixes at the cost of clipping the largest ones.
    """
    w = groups.float()
    peak = w.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8)
    best_err = torch.full(peak.shape[:-1], float("inf"), device=w.device)
    best = peak.squeeze(-1).clone()
    n = _half_levels(bits)
    for a in [1.0, n / (n - 0.5), *torch.linspace(lowest, n / (n - 0.5), steps).tolist()]:
        delta = peak * a
        err = (seq_levels(seq_codes(w, delta, bits), delta, bits) - w).pow(2).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, delta.squeeze(-1), best)
    return best


class SEQQuantizer(nn.Module):
    """Holds the learnable SEQ scale Delta, shape (out, groups), initialised to max|W| per group."""

    def __init__(self, spec: GridSpec, weight: torch.Tensor) -> None:
        super().__init__()
        self.spec = spec
        self.group_len = spec.group_len(weight.shape[1])
        groups = to_groups(weight.detach().float(), self.group_len)
        delta = groups.abs().amax(dim=-1).clamp_min(1e-8)
        self.delta = nn.Parameter(delta.to(weight.dtype))

    @torch.no_grad()
    def init_mse(self, weight: torch.Tensor) -> None:
        """Reset Delta to the weight-MSE-optimal scale of ``weight`` (see :func:`seq_mse_scale`)."""
        groups = to_groups(weight.detach().float(), self.group_len)
        self.delta.copy_(seq_mse_scale(groups, self.spec.bits).to(self.delta.dtype))

    def fake_quant(self, weight: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``weight`` (out, in) with STE/LSQ gradients."""
        groups = to_groups(weight, self.group_len)
        delta = self.delta.abs().clamp_min(1e-8).unsqueeze(-1)
        out = seq_fake_quant(groups, delta.to(groups.dtype), self.spec.bits, seq_grad_scale(weight.numel(), self.spec.bits))
        return out.reshape(weight.shape)

    @torch.no_grad()
    def encode(self, weight: torch.Tensor) -> QuantizedWeight:
        """Integer codes and scales of ``weight`` under the current Delta."""
        groups = to_groups(weight.float(), self.group_len)
        delta = self.delta.float().abs().clamp_min(1e-8)
        codes = seq_codes(groups, delta.unsqueeze(-1), self.spec.bits).reshape(weight.shape)
        return QuantizedWeight(self.spec, codes, delta)


def seq_decode(q: QuantizedWeight) -> torch.Tensor:
    """Dequantize a SEQ ``QuantizedWeight`` to a float32 (out, in) tensor."""
    group_len = q.spec.group_len(q.codes.shape[1])
    codes = to_groups(q.codes, group_len)
    return seq_levels(codes, q.scale.float().unsqueeze(-1), q.spec.bits).reshape(q.codes.shape)
