"""Asymmetric min/max grid with an integer zero point (BitDistiller / GPTQ style).

Per group: ``s = (max - min) / (2**b - 1)``, ``z = clamp(round(-min / s), 0, 2**b - 1)``,
``Q(w) = (clamp(round(w / s) + z, 0, 2**b - 1) - z) * s``. In the default *dynamic* mode s and z
are recomputed from the current weights each forward (BitDistiller); with ``learn_scale=True``
the scale and zero are parameters trained through a straight-through round (OmniQuant style).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Grid, GridSpec, QuantizedWeight, register_grid, to_groups


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def range_params(wmax: torch.Tensor, wmin: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and float zero point that map the range [wmin <= 0, wmax >= 0] onto the codes 0..2**bits - 1."""
    qmax = (1 << bits) - 1
    scale = ((wmax - wmin) / qmax).clamp_min(1e-8)
    zero = torch.clamp(round_ste(-wmin / scale), 0, qmax)
    return scale, zero


def minmax_params(groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (..., 1) and float zero point (..., 1) from each group's min and max."""
    return range_params(groups.amax(dim=-1, keepdim=True).clamp_min(0), groups.amin(dim=-1, keepdim=True).clamp_max(0),
                        bits)


def asym_codes(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2**bits) of grouped weights."""
    qmax = (1 << bits) - 1
    return torch.clamp(torch.round(groups / scale) + torch.round(zero), 0, qmax).to(torch.uint8)


def asym_levels(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Dequantized values of grouped codes."""
    return (codes.to(scale.dtype) - zero.to(scale.dtype)) * scale


def asym_fake_quant(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Differentiable quantize-dequantize (STE through round; zero gradient where clamped)."""
    qmax = (1 << bits) - 1
    zero = round_ste(zero)
    return (torch.clamp(round_ste(groups / scale) + zero, 0, qmax) - zero) * scale


class AsymQuantizer(nn.Module):
    """Asymmetric grid holder: dynamic min/max (default) or learned scale and zero."""

    def __init__(self, spec: GridSpec, weight: torch.Tensor, learn_scale: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.group_len = spec.group_len(weight.shape[1])
        self.learn_scale = learn_scale
        if learn_scale:
            scale, zero = minmax_params(to_groups(weight.detach().float(), self.group_len), spec.bits)
            self.scale = nn.Parameter(scale.squeeze(-1).to(weight.dtype))
            self.zero = nn.Parameter(zero.squeeze(-1).to(weight.dtype))

    def _params(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.learn_scale:
            scale = self.scale.abs().clamp_min(1e-8).unsqueeze(-1).to(groups.dtype)
            zero = self.zero.clamp(0, self.spec.levels - 1).unsqueeze(-1).to(groups.dtype)
            return scale, zero
        return minmax_params(groups, self.spec.bits)

    def fake_quant(self, weight: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``weight`` (out, in) with straight-through gradients."""
        groups = to_groups(weight, self.group_len)
        scale, zero = self._params(groups)
        return asym_fake_quant(groups, scale, zero, self.spec.bits).reshape(weight.shape)

    @torch.no_grad()
    def encode(self, weight: torch.Tensor) -> QuantizedWeight:
        """Integer codes, scales and zero points of ``weight``."""
        groups = to_groups(weight.float(), self.group_len)
        scale, zero = self._params(groups)
        scale, zero = scale.float(), torch.round(zero.float())
        codes = asym_codes(groups, scale, zero, self.spec.bits).reshape(weight.shape)
        return QuantizedWeight(self.spec, codes, scale.squeeze(-1), zero.squeeze(-1).to(torch.uint8))


def asym_decode(q: QuantizedWeight) -> torch.Tensor:
    """Dequantize an asymmetric ``QuantizedWeight`` to a float32 (out, in) tensor."""
    if q.zero is None:
        raise ValueError("asymmetric weight is missing its zero points")
    group_len = q.spec.group_len(q.codes.shape[1])
    codes = to_groups(q.codes, group_len)
    return asym_levels(codes, q.scale.float().unsqueeze(-1), q.zero.unsqueeze(-1)).reshape(q.codes.shape)


@register_grid
class AsymGrid(Grid):
    """The asymmetric grid: ``(k - z) * s``, scale and zero point per group."""

    name = "asym"
    bits = (2, 3, 4, 8)
    has_zero = True
    kernel_id = 1

    def quantizer(self, spec: GridSpec, weight: torch.Tensor, **options: bool) -> nn.Module:
        return AsymQuantizer(spec, weight, learn_scale=options.get("learn_scale", False))

    def decode(self, q: QuantizedWeight) -> torch.Tensor:
        return asym_decode(q)

    def affine(self, q: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
        scale = q.scale.float()
        return scale, -q.zero.float() * scale
