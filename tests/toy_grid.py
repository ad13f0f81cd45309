"""A toy 3-level (ternary) grid, registered from this one file: levels {-s, 0, +s} per group."""

from __future__ import annotations

import torch
from torch import nn

from upq.grids import Grid, GridSpec, QuantizedWeight, register_grid
from upq.grids.base import to_groups


class TernaryQuantizer(nn.Module):
    """Scale s = 0.7 * mean|w| per group (recomputed each forward); straight-through gradient to W."""

    def __init__(self, spec: GridSpec, weight: torch.Tensor) -> None:
        super().__init__()
        self.spec = spec
        self.group_len = spec.group_len(weight.shape[1])

    def _scale_and_codes(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        groups = to_groups(weight.detach().float(), self.group_len)
        scale = (0.7 * groups.abs().mean(-1, keepdim=True)).clamp_min(1e-8)
        return scale, torch.clamp(torch.round(groups / scale) + 1, 0, 2)

    def fake_quant(self, weight: torch.Tensor) -> torch.Tensor:
        scale, codes = self._scale_and_codes(weight)
        w_hat = ((codes - 1) * scale).reshape(weight.shape).to(weight.dtype)
        return weight + (w_hat - weight).detach()

    @torch.no_grad()
    def encode(self, weight: torch.Tensor) -> QuantizedWeight:
        scale, codes = self._scale_and_codes(weight)
        return QuantizedWeight(self.spec, codes.to(torch.uint8).reshape(weight.shape), scale.squeeze(-1))


@register_grid
class TernaryGrid(Grid):
    name = "ternary"
    bits = (2,)

    def quantizer(self, spec: GridSpec, weight: torch.Tensor, **options: bool) -> nn.Module:
        return TernaryQuantizer(spec, weight)

    def decode(self, q: QuantizedWeight) -> torch.Tensor:
        scale, offset = self.affine(q)
        group_len = q.spec.group_len(q.codes.shape[1])
        codes = to_groups(q.codes.float(), group_len)
        return (codes * scale.unsqueeze(-1) + offset.unsqueeze(-1)).reshape(q.codes.shape)

    def affine(self, q: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
        scale = q.scale.float()
        return scale, -scale
