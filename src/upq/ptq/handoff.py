"""The hand-off to a lower bit width: where a quantized layer's scale starts.

A ``QuantLinear`` that starts from another packed layer (INT4 -> INT2, UPQ's progressive path) or
from float weights gets its grid's own init (``max``: Delta = max|W| per row/group) and can then
be moved to one of these starts:

* ``int4`` -- the scale of the packed layer it starts from (Delta2 = Delta4 nests the 16 INT4
  levels into the 4 INT2 levels, four per level, with no rounding ties);
* ``mse`` -- the scale minimising the weight error ``||Q(W) - W||^2`` (SEQ);
* ``output`` -- the scale minimising the layer-output error on calibration inputs, from the
  Gram matrix ``X^T X`` of those inputs (SEQ; BitDistiller's clip search does the same for its
  asymmetric grid).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..grids.seq import SEQQuantizer
from ..modules import PackedLinear, QuantLinear

SCALE_INITS = ("max", "int4", "mse", "output")


def check_scale_init(how: str) -> None:
    """Raise ``ValueError`` unless ``how`` is one of :data:`SCALE_INITS`."""
    if how not in SCALE_INITS:
        raise ValueError(f"delta_init must be one of {SCALE_INITS}, got {how!r}")


@torch.no_grad()
def input_grams(model: nn.Module, names: list[str], run: Callable[[], None]) -> dict[str, torch.Tensor]:
    """``X^T X`` (float32, in x in) of the inputs reaching each named submodule while ``run()`` runs."""
    grams: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        def hook(module: nn.Module, args: tuple, name: str = name) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            gram = x.T @ x
            grams[name] = grams[name] + gram if name in grams else gram
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for handle in hooks:
            handle.remove()
    missing = [n for n in names if n not in grams]
    if missing:
        raise RuntimeError(f"no calibration input reached {missing[:3]}")
    return grams


@torch.no_grad()
def init_scale(layer: QuantLinear, how: str, start: PackedLinear | None = None,
               gram: torch.Tensor | None = None) -> None:
    """Move ``layer``'s quantizer scale to the start ``how`` (see the module docstring).

    ``start`` is the packed layer the latent weight came from (needed by ``int4``); ``gram`` the
    Gram matrix of the layer's calibration inputs (needed by ``output``).
    """
    check_scale_init(how)
    if how == "max":
        return
    quantizer = layer.quantizer
    if not isinstance(quantizer, SEQQuantizer):
        raise ValueError(f"delta_init={how!r} needs the SEQ grid, not {layer.spec.grid!r}")
    if how == "int4":
        if start is None or start.spec.grid != "seq":
            raise ValueError("delta_init='int4' needs a SEQ checkpoint to start from (the progressive path)")
        scale = start.scale.float()
        if tuple(scale.shape) != tuple(quantizer.delta.shape):
            raise ValueError(
                f"delta_init='int4' needs the same groups on both sides; the source scale has shape "
                f"{tuple(scale.shape)}, the new one {tuple(quantizer.delta.shape)}"
            )
        quantizer.delta.copy_(scale.abs().clamp_min(1e-8).to(quantizer.delta.dtype))
    elif how == "mse":
        quantizer.init_mse(layer.weight)
    else:
        if gram is None:
            raise ValueError("delta_init='output' needs calibration inputs (the Gram matrix of the layer's inputs)")
        quantizer.init_output(layer.weight, gram)
