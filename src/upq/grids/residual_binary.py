"""R2Q residual-binary grid: two sequential 1-bit stages forming an adaptive 4-level lattice.

Per group: ``b1 = sign(w)``, ``a1 = mean|w|``; ``r = w - a1*b1``; ``b2 = sign(r)``, ``a2 = mean|r|``;
``w_hat = a1*b1 + a2*b2`` (levels {+-a1 +- a2}). Trained with a straight-through estimator.
This is a reconstruction from the R2Q abstract and public reviews, not the paper's exact
equations, which were not available; it is kept isolated here for that reason.
Code ``k = 2*[b1 > 0] + [b2 > 0]``; scale has shape (out, groups, 2) holding (a1, a2).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Grid, GridSpec, QuantizedWeight, register_grid, to_groups


def _sign(x: torch.Tensor) -> torch.Tensor:
    """Sign with sign(0) = +1, so every weight lands on a lattice point."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def residual_binary(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Signs b1, b2 (..., g) and magnitudes a1, a2 (..., 1) of grouped weights."""
    b1 = _sign(groups)
    a1 = groups.abs().mean(dim=-1, keepdim=True)
    residual = groups - a1 * b1
    b2 = _sign(residual)
    a2 = residual.abs().mean(dim=-1, keepdim=True)
    return b1, b2, a1, a2


def residual_levels(codes: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """Dequantized values of grouped codes with magnitudes (..., 1)."""
    codes = codes.to(torch.int64)
    b1 = (codes >> 1).to(a1.dtype) * 2 - 1
    b2 = (codes & 1).to(a1.dtype) * 2 - 1
    return a1 * b1 + a2 * b2


class ResidualBinaryQuantizer(nn.Module):
    """Residual-binary grid holder; magnitudes are recomputed from the weights each forward."""

    def __init__(self, spec: GridSpec, weight: torch.Tensor) -> None:
        super().__init__()
        self.spec = spec
        self.group_len = spec.group_len(weight.shape[1])

    def fake_quant(self, weight: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``weight`` (out, in); the gradient passes straight through to W."""
        groups = to_groups(weight, self.group_len)
        b1, b2, a1, a2 = residual_binary(groups.detach())
        w_hat = (a1 * b1 + a2 * b2).reshape(weight.shape)
        return weight + (w_hat - weight).detach()

    @torch.no_grad()
    def encode(self, weight: torch.Tensor) -> QuantizedWeight:
        """Two-bit codes and the (a1, a2) magnitudes of ``weight``."""
        groups = to_groups(weight.float(), self.group_len)
        b1, b2, a1, a2 = residual_binary(groups)
        codes = ((b1 > 0).to(torch.uint8) * 2 + (b2 > 0).to(torch.uint8)).reshape(weight.shape)
        return QuantizedWeight(self.spec, codes, torch.cat([a1, a2], dim=-1))


def residual_decode(q: QuantizedWeight) -> torch.Tensor:
    """Dequantize a residual-binary ``QuantizedWeight`` to a float32 (out, in) tensor."""
    group_len = q.spec.group_len(q.codes.shape[1])
    codes = to_groups(q.codes, group_len)
    scale = q.scale.float()
    return residual_levels(codes, scale[..., :1], scale[..., 1:]).reshape(q.codes.shape)


@register_grid
class ResidualBinaryGrid(Grid):
    """R2Q's residual-binary grid: levels +-a1 +- a2, two magnitudes per group (not affine)."""

    name = "r2q"
    bits = (2,)
    scale_columns = 2
    kernel_id = 2

    def quantizer(self, spec: GridSpec, weight: torch.Tensor, **options: bool) -> nn.Module:
        return ResidualBinaryQuantizer(spec, weight)

    def decode(self, q: QuantizedWeight) -> torch.Tensor:
        return residual_decode(q)
