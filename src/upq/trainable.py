"""Which parameters of a fake-quantized model train: the kinds a training stage may choose.

``weights``: the latent weights of every ``QuantLinear``; ``scales``: their quantizers' scale
(and zero) parameters; ``norms``: the RMSNorm / LayerNorm gains. Shared by block-wise PTQ and
Distill-QAT so that both name and group their parameters the same way.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .modules import QuantLinear

TRAINABLE = ("weights", "scales", "norms")


def check_trainable(train: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate a choice of trainable parameter kinds (a non-empty subset of :data:`TRAINABLE`)."""
    train = tuple(train)
    bad = [t for t in train if t not in TRAINABLE]
    if bad or not train:
        raise ValueError(f"train must be a non-empty subset of {TRAINABLE}, got {list(train)}")
    return train


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer whose gain may train."""
    return type(module).__name__.lower().endswith(("rmsnorm", "layernorm"))


def trainable_groups(model: nn.Module, train: tuple[str, ...] = ("weights", "scales")) -> dict[str, list[nn.Parameter]]:
    """Kind -> parameters of each chosen kind (``weights``, ``scales``, ``norms``), in module order."""
    groups: dict[str, list[nn.Parameter]] = {kind: [] for kind in train}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            if "weights" in groups:
                groups["weights"].append(module.weight)
            if "scales" in groups:
                groups["scales"].extend(module.quantizer.parameters())
        elif "norms" in groups and is_norm(module):
            groups["norms"].extend(p for p in module.parameters(recurse=False))
    return groups


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor of the parameters that train (what a training checkpoint stores)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def lr_factor(step: int, total: int, warmup: int = 0, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
