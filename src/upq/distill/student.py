"""The INT2 student of Distill-QAT: built progressively from an INT4 checkpoint or directly.

* **progressive** (UPQ, DESIGN §2.3): load the stage-1 INT4 checkpoint, dequantize every packed
  layer to a float latent weight (exactly the INT4 values), then wrap it in an INT2
  ``QuantLinear``. Delta2 starts at max|W_int4| per row (the SEQ quantizer's own init,
  ``delta_init="max"``) or at Delta4 (``delta_init="int4"``); both nest the 16 INT4 levels
  into the 4 INT2 levels, four INT4 levels per INT2 level, with no rounding ties. Or
  ``delta_init="mse"``: the per-row/group scale that minimises the INT2 weight error (searched over
  fractions of max|W|); it gives up the clean nesting for a closer INT2 weight fit (which did not
  give a lower starting KL on the bundled model: ``bench/results/compare_upq_variants.md``).
* **direct** (the ablation): the original model's float weights, quantized straight to INT2.

Only the INT2 latent weights and their quantizer scales train; everything else is frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ..checkpoint import load as load_checkpoint
from ..checkpoint import load_tokenizer
from ..grids import GridSpec
from ..grids.seq import SEQQuantizer
from ..loading import is_upq_checkpoint, source_model_of
from ..models import fix_special_tokens, load_model
from ..modules import PackedLinear, QuantLinear, _set_submodule

INITS = ("progressive", "direct")
DELTA_INITS = ("max", "int4", "mse")


@dataclass
class Student:
    """A freshly initialised student: the model, its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: Any
    source_model: str | None
    info: dict[str, Any]


def _int2_from_packed(layer: PackedLinear, spec: GridSpec, delta_init: str) -> QuantLinear:
    """An INT2 ``QuantLinear`` whose latent weight is the dequantized INT4 weight of ``layer``."""
    weight = layer.dequantize().float()
    bias = None if layer.bias is None else layer.bias.float()
    quant = QuantLinear(weight, bias, spec)
    if delta_init == "int4":
        if layer.spec.grid != "seq" or spec.grid != "seq":
            raise ValueError("delta_init='int4' needs SEQ grids on both sides")
        scale = layer.scale.float()
        if tuple(scale.shape) != tuple(quant.quantizer.delta.shape):
            raise ValueError(
                f"delta_init='int4' needs the same groups for INT4 and INT2; INT4 scale has shape "
                f"{tuple(scale.shape)}, INT2 delta {tuple(quant.quantizer.delta.shape)}"
            )
        with torch.no_grad():
            quant.quantizer.delta.copy_(scale.abs().clamp_min(1e-8))
    elif delta_init == "mse":
        _init_mse(quant)
    return quant


def _init_mse(layer: QuantLinear) -> None:
    """Weight-MSE-optimal Delta for a SEQ ``QuantLinear`` (other grids have no such init)."""
    if not isinstance(layer.quantizer, SEQQuantizer):
        raise ValueError(f"delta_init='mse' needs the SEQ grid, not {layer.spec.grid!r}")
    layer.quantizer.init_mse(layer.weight)


def progressive_student(
    int4_dir: str | Path,
    spec: GridSpec = GridSpec("seq", 2, None),
    delta_init: str = "max",
    device: str | torch.device = "cpu",
) -> Student:
    """INT2 student initialised from a upq INT4 checkpoint directory (stage-1 output)."""
    if delta_init not in DELTA_INITS:
        raise ValueError(f"delta_init must be one of {DELTA_INITS}, got {delta_init!r}")
    if not is_upq_checkpoint(int4_dir):
        raise ValueError(f"{int4_dir} is not a upq checkpoint directory (expected the INT4 stage-1 output)")
    model = load_checkpoint(int4_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(str(int4_dir))
    fix_special_tokens(model, tokenizer)
    packed = [(n, m) for n, m in model.named_modules() if isinstance(m, PackedLinear)]
    bits = sorted({m.spec.bits for _, m in packed})
    for name, layer in packed:
        _set_submodule(model, name, _int2_from_packed(layer, spec, delta_init))
    model.to(device)
    freeze_except_quant(model)
    info = {"init": "progressive", "from": str(int4_dir), "from_bits": bits, "delta_init": delta_init,
            "layers": len(packed), "grid": spec.describe()}
    return Student(model, tokenizer, source_model_of(int4_dir), info)


def direct_student(
    model_name: str | None,
    spec: GridSpec = GridSpec("seq", 2, None),
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    device: str | torch.device = "cpu",
    delta_init: str = "max",
) -> Student:
    """INT2 student initialised straight from the original model's float weights.

    ``delta_init``: ``"max"`` (the grid's own init) or ``"mse"`` (SEQ only, see :func:`_init_mse`).
    """
    from ..modules import quantize_model

    if delta_init not in ("max", "mse"):
        raise ValueError(f"a direct student's delta_init must be 'max' or 'mse', got {delta_init!r}")
    model, tokenizer = load_model(model_name, dtype=torch.float32, device="cpu")
    names = quantize_model(model, spec, include, exclude)
    if delta_init == "mse":
        for module in model.modules():
            if isinstance(module, QuantLinear):
                _init_mse(module)
    model.to(device)
    freeze_except_quant(model)
    info = {"init": "direct", "from": model_name, "layers": len(names), "grid": spec.describe(),
            "delta_init": delta_init}
    return Student(model, tokenizer, model_name, info)


def build_student(
    init: str,
    *,
    int4_dir: str | Path | None = None,
    model_name: str | None = None,
    spec: GridSpec = GridSpec("seq", 2, None),
    delta_init: str = "max",
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    device: str | torch.device = "cpu",
) -> Student:
    """Dispatch on ``init`` (``"progressive"`` needs ``int4_dir``; ``"direct"`` uses ``model_name``)."""
    if init == "progressive":
        if int4_dir is None:
            raise ValueError("progressive initialisation needs the INT4 checkpoint directory (--from)")
        return progressive_student(int4_dir, spec, delta_init, device)
    if init == "direct":
        return direct_student(model_name, spec, include, exclude, device, delta_init)
    raise ValueError(f"student init must be one of {INITS}, got {init!r}")


def freeze_except_quant(model: nn.Module) -> None:
    """Freeze every parameter except ``QuantLinear`` latent weights and quantizer scales."""
    model.requires_grad_(False)
    weights, scales = trainable_groups(model)
    if not weights:
        raise ValueError("the student has no QuantLinear layers to train")
    for p in weights + scales:
        p.requires_grad_(True)


def trainable_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(latent weights, quantizer scales) of every ``QuantLinear`` in ``model``, in module order."""
    weights: list[nn.Parameter] = []
    scales: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, QuantLinear):
            weights.append(module.weight)
            scales.extend(module.quantizer.parameters())
    return weights, scales


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor of the trainable student parameters (what a training checkpoint stores)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
