"""The INT2 student of Distill-QAT: built progressively from a packed checkpoint or directly.

* **progressive** (UPQ): load a upq checkpoint (the stage-1 INT4 output, or the INT2 block
  stage's output), dequantize every packed layer to a float latent weight (exactly its grid
  values), then wrap it in an INT2 ``QuantLinear`` whose scale starts as ``delta_init`` says
  (:mod:`upq.ptq.handoff`: ``max``, ``int4`` = the checkpoint's own scale, ``mse``, ``output``).
* **direct** (the ablation): the original model's float weights, quantized straight to INT2.

Which parameters train is :data:`upq.trainable.TRAINABLE`-selected: the latent weights, the quantizer scales
and optionally the RMSNorm gains; everything else is frozen.
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
from ..loading import is_upq_checkpoint, source_model_of
from ..models import fix_special_tokens, load_model
from ..modules import PackedLinear, QuantLinear, _set_submodule
from ..ptq.blockwise import load_latent_weights
from ..ptq.handoff import check_scale_init, init_scale, input_grams
from ..trainable import check_trainable, trainable_groups

INITS = ("progressive", "direct")


@dataclass
class Student:
    """A freshly initialised student: the model, its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: Any
    source_model: str | None
    info: dict[str, Any]


def calibration_grams(model: nn.Module, tokenizer: Any, names: list[str], calibration: "Calibration",
                      batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Gram matrices of the inputs of the named layers on the calibration text's training split."""
    from ..data.text import load_texts, token_blocks

    ids = token_blocks(load_texts(calibration.source, "train"), tokenizer, calibration.seq_len, calibration.samples)

    def run() -> None:
        with torch.no_grad():
            for start in range(0, ids.shape[0], batch_size):
                model(input_ids=ids[start : start + batch_size], use_cache=False)

    return input_grams(model, names, run)


@dataclass(frozen=True)
class Calibration:
    """Calibration text for the output-aware hand-off (``delta_init="output"``)."""

    samples: int = 16
    seq_len: int = 256
    source: str = "wiki"


def _grams_for(delta_init: str, model: nn.Module, tokenizer: Any, names: list[str],
               calibration: Calibration) -> dict[str, torch.Tensor]:
    """Input Gram matrices of ``names`` when the hand-off needs them (``output``), taken before the swap."""
    if delta_init != "output":
        return {}
    return calibration_grams(model, tokenizer, names, calibration)


def _start_weight(name: str, layer: PackedLinear, latent: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """The latent weight a progressive student starts from: the block stage's own latent weight
    when ``latent`` is given, else the checkpoint's dequantized codes."""
    dequantized = layer.dequantize().float()
    if latent is None:
        return dequantized
    weight = latent.get(f"{name}.weight")
    if weight is None or weight.shape != dequantized.shape:
        raise ValueError(f"the latent weights have no {tuple(dequantized.shape)} weight for layer {name}; "
                         "they must come from the work directory of the stage that wrote the checkpoint")
    return weight.float()


def _check_latent_matches(name: str, quant: QuantLinear, layer: PackedLinear, tolerance: float = 0.01) -> None:
    """Refuse latent weights whose rounding is not (up to float noise) the checkpoint's codes."""
    differs = (quant.dequantized_weight() - layer.dequantize().float()).abs() > 1e-4
    if float(differs.float().mean()) > tolerance:
        raise ValueError(f"layer {name}: the latent weights do not round to this checkpoint's codes "
                         f"({float(differs.float().mean()):.1%} differ); they belong to another run")


def progressive_student(
    int4_dir: str | Path,
    spec: GridSpec = GridSpec("seq", 2, None),
    delta_init: str = "max",
    device: str | torch.device = "cpu",
    train: tuple[str, ...] = ("weights", "scales"),
    calibration: Calibration = Calibration(),
    latent_from: str | Path | None = None,
) -> Student:
    """INT2 student initialised from a upq checkpoint directory (the INT4 stage-1 or INT2 block-stage output).

    ``latent_from``: the work directory of the block stage that wrote the checkpoint; its latent
    float weights (:func:`upq.ptq.blockwise.load_latent_weights`) replace the dequantized codes.
    """
    check_scale_init(delta_init)
    if not is_upq_checkpoint(int4_dir):
        raise ValueError(f"{int4_dir} is not a upq checkpoint directory (expected the INT4 stage-1 output)")
    latent = load_latent_weights(latent_from) if latent_from is not None else None
    model = load_checkpoint(int4_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(str(int4_dir))
    fix_special_tokens(model, tokenizer)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    bits = sorted({m.spec.bits for m in packed.values()})
    grams = _grams_for(delta_init, model, tokenizer, list(packed), calibration)
    for name, layer in packed.items():
        bias = None if layer.bias is None else layer.bias.float()
        quant = QuantLinear(_start_weight(name, layer, latent), bias, spec)
        init_scale(quant, delta_init, layer, grams.pop(name, None))
        if latent is not None and delta_init == "int4" and layer.spec == spec:
            _check_latent_matches(name, quant, layer)
        _set_submodule(model, name, quant)
    model.to(device)
    freeze_except_quant(model, train)
    info = {"init": "progressive", "from": str(int4_dir), "from_bits": bits, "delta_init": delta_init,
            "layers": len(packed), "grid": spec.describe(), "latent": latent is not None}
    return Student(model, tokenizer, source_model_of(int4_dir), info)


def direct_student(
    model_name: str | None,
    spec: GridSpec = GridSpec("seq", 2, None),
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    device: str | torch.device = "cpu",
    delta_init: str = "max",
    train: tuple[str, ...] = ("weights", "scales"),
    calibration: Calibration = Calibration(),
) -> Student:
    """INT2 student initialised straight from the original model's float weights.

    ``delta_init``: ``"max"`` (the grid's own init), ``"mse"`` or ``"output"`` (SEQ only).
    """
    from ..modules import quantize_model, select_linears

    check_scale_init(delta_init)
    if delta_init == "int4":
        raise ValueError("a direct student has no INT4 scale to start from; delta_init must be max, mse or output")
    model, tokenizer = load_model(model_name, dtype=torch.float32, device="cpu")
    grams = _grams_for(delta_init, model, tokenizer, [n for n, _ in select_linears(model, include, exclude)],
                       calibration)
    names = quantize_model(model, spec, include, exclude)
    for name in names:
        init_scale(model.get_submodule(name), delta_init, None, grams.pop(name, None))
    model.to(device)
    freeze_except_quant(model, train)
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
    train: tuple[str, ...] = ("weights", "scales"),
    calibration: Calibration = Calibration(),
    latent_from: str | Path | None = None,
) -> Student:
    """Dispatch on ``init`` (``"progressive"`` needs ``int4_dir``; ``"direct"`` uses ``model_name``)."""
    if init == "progressive":
        if int4_dir is None:
            raise ValueError("progressive initialisation needs the INT4 checkpoint directory (--from)")
        return progressive_student(int4_dir, spec, delta_init, device, train, calibration, latent_from)
    if latent_from is not None:
        raise ValueError("latent_from applies to a progressive student only")
    if init == "direct":
        return direct_student(model_name, spec, include, exclude, device, delta_init, train, calibration)
    raise ValueError(f"student init must be one of {INITS}, got {init!r}")


@torch.no_grad()
def own_frozen_tensors(model: nn.Module) -> None:
    """Copy every frozen parameter and buffer into process memory.

    A model loaded from safetensors views its file through ``mmap``. Once the trained layers are
    replaced by ``QuantLinear`` copies, the pages of their old weights stay resident as long as any
    tensor (the embedding, a norm gain) still views that file; owning the frozen tensors releases
    the mapping. For a direct student of SmolLM2-135M that is ~0.4 GB of the trainer's RSS.
    """
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad:
                param.data = param.data.clone()
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None:
                module._buffers[name] = buffer.clone()


def freeze_except_quant(model: nn.Module, train: tuple[str, ...] = ("weights", "scales")) -> None:
    """Freeze every parameter except the chosen kinds: ``QuantLinear`` latent weights, quantizer
    scales and/or norm gains (``train``, a subset of :data:`upq.trainable.TRAINABLE`); the frozen
    ones are then owned by the process (:func:`own_frozen_tensors`)."""
    check_trainable(train)
    model.requires_grad_(False)
    groups = trainable_groups(model, train)
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("the student has no QuantLinear layers to train")
    if not any(groups.values()):
        raise ValueError(f"nothing to train: the student has no parameters of kinds {list(train)}")
    for params in groups.values():
        for p in params:
            p.requires_grad_(True)
    own_frozen_tensors(model)
