"""Shared pieces of every grid: the grid registry, the grid spec, group reshaping and the quantized-weight record.

A grid is one :class:`Grid` subclass in its own file (``seq.py``, ``asym.py``,
``residual_binary.py``), registered with :func:`register_grid`: its levels and codes, its
trainable fake-quant holder, its buffer layout, the affine form the GGUF export needs and its
kernel id. Nothing outside the grid's file and the kernels knows a grid by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class Grid:
    """One quantization grid. Subclasses set the class attributes and implement ``quantizer`` and ``decode``.

    ``bits``: the code widths it supports. ``has_zero``: stores a uint8 zero point per group.
    ``scale_columns``: float parameters per group (1, or 2 for R2Q's two magnitudes).
    ``kernel_id``: its id in the packed native/Triton kernels (``None``: the reference path only).
    """

    name: str = ""
    bits: tuple[int, ...] = ()
    has_zero: bool = False
    scale_columns: int = 1
    kernel_id: int | None = None

    def quantizer(self, spec: "GridSpec", weight: torch.Tensor, **options: Any) -> nn.Module:
        """The trainable parameter holder (``fake_quant``, ``encode``) initialised from ``weight`` (out, in)."""
        raise NotImplementedError

    def decode(self, q: "QuantizedWeight") -> torch.Tensor:
        """Dequantize ``q`` to a float32 (out, in) tensor."""
        raise NotImplementedError

    def affine(self, q: "QuantizedWeight") -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-group float32 (scale, offset) with ``weight = scale * code + offset``; ``None`` if the grid is not affine."""
        return None

    @property
    def is_affine(self) -> bool:
        """Whether the grid defines :meth:`affine` (export as GGML affine blocks)."""
        return type(self).affine is not Grid.affine

    def scale_shape(self, out_features: int, groups: int) -> tuple[int, ...]:
        """Shape of the stored scale buffer."""
        return (out_features, groups) if self.scale_columns == 1 else (out_features, groups, self.scale_columns)


GRIDS: dict[str, Grid] = {}


def register_grid(grid: type[Grid]) -> type[Grid]:
    """Class decorator: add a grid to the registry under its ``name`` (re-registering replaces it)."""
    if not grid.name or not grid.bits:
        raise ValueError(f"{grid.__name__} needs a name and its supported bits")
    GRIDS[grid.name] = grid()
    return grid


@dataclass(frozen=True)
class GridSpec:
    """Which grid, how many bits, and the group size (``None`` = one group per output row)."""

    grid: str
    bits: int
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.grid not in GRIDS:
            raise ValueError(f"unknown grid {self.grid!r}; choose one of {sorted(GRIDS)}")
        if self.bits not in GRIDS[self.grid].bits:
            raise ValueError(f"grid {self.grid!r} supports bits {GRIDS[self.grid].bits}, got {self.bits}")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group size must be positive or None (per-channel), got {self.group_size}")

    @property
    def impl(self) -> Grid:
        """The registered :class:`Grid` of this spec."""
        return GRIDS[self.grid]

    @property
    def levels(self) -> int:
        """Number of representable codes, 2**bits."""
        return 1 << self.bits

    def group_len(self, in_features: int) -> int:
        """Weights per group for a row of ``in_features``; raises if the group size does not divide it."""
        if self.group_size is None:
            return in_features
        if in_features % self.group_size != 0:
            raise ValueError(
                f"group size {self.group_size} does not divide in_features={in_features}; "
                f"use a divisor of {in_features} or group_size=None (per-channel)"
            )
        return self.group_size

    def describe(self) -> str:
        """Short human label such as ``seq-w2-channel`` or ``asym-w4-g128``."""
        g = "channel" if self.group_size is None else f"g{self.group_size}"
        return f"{self.grid}-w{self.bits}-{g}"


def parse_group_size(value: str | int | None) -> int | None:
    """Parse a CLI/recipe group size: ``channel``/``none``/``-1``/``0`` mean per-channel."""
    if value is None:
        return None
    if isinstance(value, int):
        return None if value <= 0 else value
    text = str(value).strip().lower()
    if text in {"channel", "per-channel", "none", "row", "-1", "0"}:
        return None
    try:
        size = int(text)
    except ValueError as exc:
        raise ValueError(f"group size must be an integer or 'channel', got {value!r}") from exc
    return None if size <= 0 else size


def to_groups(w: torch.Tensor, group_len: int) -> torch.Tensor:
    """View a (out, in) weight as (out, in // group_len, group_len)."""
    out_features, in_features = w.shape
    return w.reshape(out_features, in_features // group_len, group_len)


@dataclass
class QuantizedWeight:
    """Integer codes of a weight plus the per-group parameters needed to dequantize it.

    ``codes``: uint8, shape (out, in), values in [0, 2**bits). ``scale``: float, shape (out, groups)
    or (out, groups, 2) for the residual-binary grid. ``zero``: uint8 (out, groups) for the
    asymmetric grid, else ``None``.
    """

    spec: GridSpec
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
