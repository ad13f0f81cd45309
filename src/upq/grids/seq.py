"""SEQ, stretched elastic quantization (ParetoQ), the grid UPQ uses.

Symmetric, no zero level, one learnable scale Delta per row or group, n = 2**(bits-1):
``Q(W) = Delta * (round(n * clip(W / Delta, -1 + eps, 1 - eps) - 0.5) + 0.5) / n``.
Code k in [0, 2n) stands for the level ``(k - n + 0.5) / n * Delta``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Grid, GridSpec, QuantizedWeight, register_grid, to_groups

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
    """Forward: SEQ quantize-dequantize. Backward: STE for W, LSQ-style gradient for Delta.

    Only W and Delta are kept for backward (W is the trainable parameter itself, so nothing is
    added): the scaled weight, its levels and the clip mask are recomputed there, which costs a
    few elementwise passes and saves three weight-sized tensors per layer during training.
    """

    @staticmethod
    def _levels(w: torch.Tensor, delta: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = w / delta
        q = torch.clamp(x, -1 + EPS, 1 - EPS).mul_(n).sub_(0.5).round_().add_(0.5).div_(n)
        return x, q

    @staticmethod
    def forward(ctx, w: torch.Tensor, delta: torch.Tensor, bits: int, grad_scale: float) -> torch.Tensor:
        n = _half_levels(bits)
        _, q = _SEQFakeQuant._levels(w, delta, n)
        ctx.save_for_backward(w, delta)
        ctx.n, ctx.grad_scale = n, grad_scale
        return q.mul_(delta)

    @staticmethod
    def _grads(grad_q: torch.Tensor, x: torch.Tensor, q: torch.Tensor, grad_scale: float, need_w: bool = True,
               need_delta: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """STE gradient of W and LSQ gradient of Delta (summed over the last dim, kept) from the
        gradient ``grad_q`` of the quantized weight, the scaled weight ``x`` and its levels ``q``."""
        inside = (x > -1 + EPS) & (x < 1 - EPS)
        grad_w = grad_q * inside if need_w else None
        grad_delta = None
        if need_delta:
            # inside the clip range d(out)/dDelta = q - x (STE through round); at the clipped ends q.
            ddelta = torch.where(inside, q.sub(x), q)
            grad_delta = (grad_q * ddelta).sum(dim=-1, keepdim=True) * grad_scale
        return grad_w, grad_delta

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w, delta = ctx.saved_tensors
        x, q = _SEQFakeQuant._levels(w, delta, ctx.n)
        grad_w, grad_delta = _SEQFakeQuant._grads(grad_out, x, q, ctx.grad_scale)
        return grad_w, grad_delta, None, None


class _SEQLinear(torch.autograd.Function):
    """``x @ Q(W)^T + b`` with Q the SEQ fake-quantizer, keeping only x, W and Delta for backward.

    ``F.linear`` on a fake-quantized weight would keep Q(W), one more weight-sized tensor per
    layer, alive until backward. Here backward recomputes the levels once and uses them both for
    the input gradient and for the STE/LSQ gradients of W and Delta (:meth:`_SEQFakeQuant._grads`),
    so training holds no quantized weight copies and does no extra pass.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, delta: torch.Tensor, bias: torch.Tensor | None,
                bits: int, grad_scale: float) -> torch.Tensor:
        n = _half_levels(bits)
        _, q = _SEQFakeQuant._levels(w.view(w.shape[0], delta.shape[1], -1), delta.unsqueeze(-1), n)
        ctx.save_for_backward(x, w, delta)
        ctx.n, ctx.grad_scale, ctx.has_bias = n, grad_scale, bias is not None
        return F.linear(x, q.mul_(delta.unsqueeze(-1)).view(w.shape), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, w, delta = ctx.saved_tensors
        need_x, need_w, need_delta, need_bias = ctx.needs_input_grad[:4]
        d = delta.unsqueeze(-1)
        groups = w.view(w.shape[0], delta.shape[1], -1)
        scaled, q = _SEQFakeQuant._levels(groups, d, ctx.n)
        grad_x = grad_w = grad_delta = grad_bias = None
        flat_out = grad_out.reshape(-1, grad_out.shape[-1])
        if need_x:
            grad_x = grad_out.matmul((q * d).view(w.shape))
        if need_w or need_delta:
            grad_q = flat_out.t().mm(x.reshape(-1, x.shape[-1])).view(groups.shape)
            grad_w, grad_delta = _SEQFakeQuant._grads(grad_q, scaled, q, ctx.grad_scale, need_w, need_delta)
            grad_w = None if grad_w is None else grad_w.view(w.shape)
            grad_delta = None if grad_delta is None else grad_delta.squeeze(-1)
        if need_bias and ctx.has_bias:
            grad_bias = flat_out.sum(dim=0)
        return grad_x, grad_w, grad_delta, grad_bias, None, None


def seq_grad_scale(numel: int, bits: int) -> float:
    """LSQ gradient scale for Delta: 1 / sqrt(numel(W) * (2**(bits-1) - 1)), with a floor of 1 level."""
    return 1.0 / math.sqrt(numel * max(_half_levels(bits) - 1, 1))


def seq_fake_quant(w: torch.Tensor, delta: torch.Tensor, bits: int, grad_scale: float | None = None) -> torch.Tensor:
    """Differentiable SEQ quantize-dequantize of grouped ``w`` (..., g) with ``delta`` (..., 1)."""
    if grad_scale is None:
        grad_scale = seq_grad_scale(w.numel(), bits)
    return _SEQFakeQuant.apply(w, delta, bits, grad_scale)


def _scale_candidates(bits: int, steps: int, lowest: float) -> list[float]:
    """Fractions of max|w| tried by the scale searches: 1 (the max init) first, then a sweep."""
    n = _half_levels(bits)
    return [1.0, n / (n - 0.5), *torch.linspace(lowest, n / (n - 0.5), steps).tolist()]


@torch.no_grad()
def _search_scale(groups: torch.Tensor, bits: int, error, steps: int, lowest: float) -> torch.Tensor:
    """Per-group ``Delta = a * max|w|`` minimising ``error(Q(w) - w)`` (a (..., g) -> (...) map).

    The max init (a = 1) is tried first and kept on ties, so the result is never worse than it.
    """
    w = groups.float()
    peak = w.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8)
    best_err = torch.full(peak.shape[:-1], float("inf"), device=w.device)
    best = peak.squeeze(-1).clone()
    for a in _scale_candidates(bits, steps, lowest):
        delta = peak * a
        err = error(seq_levels(seq_codes(w, delta, bits), delta, bits) - w)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, delta.squeeze(-1), best)
    return best


def seq_mse_scale(groups: torch.Tensor, bits: int, steps: int = 41, lowest: float = 0.2) -> torch.Tensor:
    """Per-group Delta minimising the weight error ``||Q(w) - w||^2`` over ``Delta = a * max|w|``.

    ``a`` runs over ``steps`` values from ``lowest`` to ``n / (n - 0.5)`` (where the top level
    lands on max|w|) plus 1 (the plain max init, so the result is never worse than it).
    ``groups`` is (..., g); returns (...). At 2 bits the max init leaves most weights on the
    inner levels, which a smaller scale fixes at the cost of clipping the largest ones.
    """
    return _search_scale(groups, bits, lambda e: e.pow(2).sum(dim=-1), steps, lowest)


def seq_output_error(err: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Output error ``e_g H_gg e_g^T`` of grouped weight errors ``err`` (out, G, g) on inputs with
    Gram matrix ``gram = X^T X`` (in, in), one value per (row, group): each group's own
    contribution to the layer output, cross-group terms ignored (exact for per-channel groups)."""
    out, n_groups, g = err.shape
    blocks = gram.float().reshape(n_groups, g, n_groups, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (G, g, g)
    return torch.einsum("ogi,gij,ogj->og", err, blocks, err)


def seq_output_scale(groups: torch.Tensor, gram: torch.Tensor, bits: int, steps: int = 41,
                     lowest: float = 0.2) -> torch.Tensor:
    """Per-group Delta minimising the layer-output error on calibration inputs (output-aware search).

    ``groups`` (out, G, g) are the weights, ``gram`` (in, in) is ``X^T X`` of the layer's inputs;
    the objective per (row, group) is :func:`seq_output_error`, searched over the same scale
    candidates as :func:`seq_mse_scale` (max init included, so never worse than it). Returns (out, G).
    """
    return _search_scale(groups, bits, lambda e: seq_output_error(e, gram), steps, lowest)


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

    @torch.no_grad()
    def init_output(self, weight: torch.Tensor, gram: torch.Tensor) -> None:
        """Reset Delta to the output-aware scale of ``weight`` on inputs with Gram matrix ``gram``."""
        groups = to_groups(weight.detach().float(), self.group_len)
        self.delta.copy_(seq_output_scale(groups, gram.to(groups.device), self.spec.bits).to(self.delta.dtype))

    def fake_quant(self, weight: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``weight`` (out, in) with STE/LSQ gradients."""
        groups = to_groups(weight, self.group_len)
        delta = self.delta.abs().clamp_min(1e-8).unsqueeze(-1)
        out = seq_fake_quant(groups, delta.to(groups.dtype), self.spec.bits, seq_grad_scale(weight.numel(), self.spec.bits))
        return out.reshape(weight.shape)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear(x, fake_quant(weight), bias)`` that keeps no quantized weight for backward
        (:class:`_SEQLinear`); same values and gradients. ``x`` and ``weight`` share one dtype."""
        delta = self.delta.abs().clamp_min(1e-8)
        return _SEQLinear.apply(x, weight, delta.to(weight.dtype), bias, self.spec.bits,
                                seq_grad_scale(weight.numel(), self.spec.bits))

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


@register_grid
class SEQGrid(Grid):
    """SEQ: symmetric, no zero level; code k is ``step * (k - (2^b - 1) / 2)`` with ``step = Delta / 2^(b-1)``."""

    name = "seq"
    bits = (2, 3, 4)
    kernel_id = 0

    def quantizer(self, spec: GridSpec, weight: torch.Tensor, **options: bool) -> nn.Module:
        return SEQQuantizer(spec, weight)

    def decode(self, q: QuantizedWeight) -> torch.Tensor:
        return seq_decode(q)

    def affine(self, q: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
        step = q.scale.float().abs() / _half_levels(q.spec.bits)
        return step, -step * ((q.spec.levels - 1) / 2)
