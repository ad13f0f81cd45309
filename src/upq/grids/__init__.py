"""Quantization grids: SEQ, asymmetric min/max and R2Q residual-binary, each registered from its own file."""

from __future__ import annotations

import torch
from torch import nn

from . import asym, residual_binary, seq  # noqa: F401  (each registers its grid)
from .base import GRIDS, Grid, GridSpec, QuantizedWeight, parse_group_size, register_grid


def make_quantizer(spec: GridSpec, weight: torch.Tensor, **options: bool) -> nn.Module:
    """Build the parameter holder of ``spec``'s grid, initialised from ``weight`` (out, in)."""
    return spec.impl.quantizer(spec, weight, **options)


def decode(q: QuantizedWeight) -> torch.Tensor:
    """Dequantize any grid's ``QuantizedWeight`` to a float32 (out, in) tensor."""
    return q.spec.impl.decode(q)


__all__ = ["GRIDS", "Grid", "GridSpec", "QuantizedWeight", "parse_group_size", "register_grid", "make_quantizer",
           "decode"]
