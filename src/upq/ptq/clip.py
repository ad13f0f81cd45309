"""BitDistiller's asymmetric clipping search, done once before QAT.

For every selected linear (query/key projections skipped by default) and every group of the
asymmetric grid, the group's max and min are shrunk independently by factors ``1 - i/20``
(i = 0..9, 100 pairs); the pair whose quantized group minimises the mean squared error of the
group's contribution to the layer output on calibration activations is kept, and the weights are
clamped to it once. The asymmetric grid then recomputes its min/max from the clamped weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..grids import GridSpec
from ..grids.asym import asym_codes, asym_levels, range_params
from ..grids.base import to_groups
from ..logs import progress_enabled
from ..modules import select_linears
from ..stages import StageContext, StageKind, register_stage


@dataclass
class ClipStage:
    """BitDistiller's asymmetric clipping search on the float weights, before QAT (the ``clip`` stage)."""

    grid: str = "asym"
    bits: int = 2
    group_size: int | None = 128
    samples: int = 32
    seq_len: int = 512
    tokens_per_layer: int = 256
    calib_source: str = "wiki"
    skip: list[str] = field(default_factory=lambda: [r"q_proj$", r"k_proj$"])
    include: list[str] | None = None
    exclude: list[str] | None = None

DEFAULT_SKIP = (r"q_proj$", r"k_proj$")
SHRINK_STEPS = 10
SHRINK_STEP = 1 / 20


@torch.no_grad()
def collect_linear_inputs(
    model: nn.Module, input_ids: torch.Tensor, names: list[str], tokens_per_layer: int = 256, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A random sample of ``tokens_per_layer`` input rows reaching each named linear."""
    generator = torch.Generator().manual_seed(seed)
    total = input_ids.numel()
    keep = torch.randperm(total, generator=generator)[:tokens_per_layer]
    samples: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        def hook(module: nn.Module, args: tuple, name: str = name) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            samples[name] = x[keep].float().cpu()
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()
    return samples


def _quantize_with_range(groups: torch.Tensor, wmax: torch.Tensor, wmin: torch.Tensor, bits: int) -> torch.Tensor:
    scale, zero = range_params(wmax, wmin, bits)
    clipped = torch.maximum(torch.minimum(groups, wmax), wmin)
    return asym_levels(asym_codes(clipped, scale, zero, bits), scale, zero)


@torch.no_grad()
def search_clip(weight: torch.Tensor, inputs: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (max, min) per group, each shape (out, groups, 1), for ``weight`` (out, in) on ``inputs`` (tokens, in)."""
    group_len = spec.group_len(weight.shape[1])
    groups = to_groups(weight.float(), group_len)
    x = inputs.float().reshape(inputs.shape[0], -1, group_len)  # (tokens, groups, g)
    wmax = groups.amax(-1, keepdim=True).clamp_min(0)
    wmin = groups.amin(-1, keepdim=True).clamp_max(0)
    best_err = torch.full(groups.shape[:2], float("inf"))
    best_max, best_min = wmax.clone(), wmin.clone()
    for i in range(SHRINK_STEPS):
        cand_max = wmax * (1 - i * SHRINK_STEP)
        for j in range(SHRINK_STEPS):
            cand_min = wmin * (1 - j * SHRINK_STEP)
            diff = groups - _quantize_with_range(groups, cand_max, cand_min, spec.bits)
            err = torch.einsum("tgk,ogk->otg", x, diff).pow(2).mean(1)  # (out, groups)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better.unsqueeze(-1), cand_max, best_max)
            best_min = torch.where(better.unsqueeze(-1), cand_min, best_min)
    return best_max, best_min


@torch.no_grad()
def apply_clip_search(
    model: nn.Module,
    input_ids: torch.Tensor,
    spec: GridSpec,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    skip: Iterable[str] = DEFAULT_SKIP,
    tokens_per_layer: int = 256,
) -> dict[str, float]:
    """Clamp the weights of the selected ``nn.Linear`` layers of ``model`` in place.

    Returns, per layer, the fraction of weights that the chosen clipping changed.
    """
    if spec.grid != "asym":
        raise ValueError(f"the clipping search is defined for the asymmetric grid, not {spec.grid!r}")
    skip_patterns = list(skip)
    chosen = [name for name, _ in select_linears(model, include, exclude)
              if not any(re.search(p, name) for p in skip_patterns)]
    inputs = collect_linear_inputs(model, input_ids, chosen, tokens_per_layer)
    changed: dict[str, float] = {}
    for name in tqdm(chosen, desc="clip search", disable=not progress_enabled()):
        linear = model.get_submodule(name)
        best_max, best_min = search_clip(linear.weight, inputs.pop(name), spec)
        groups = to_groups(linear.weight.data.float(), spec.group_len(linear.in_features))
        clamped = torch.maximum(torch.minimum(groups, best_max), best_min)
        changed[name] = float((clamped != groups).float().mean())
        linear.weight.data.copy_(clamped.reshape(linear.weight.shape).to(linear.weight.dtype))
    return changed


def run_clip_stage(cfg: ClipStage, context: StageContext) -> dict[str, Any]:
    """The ``clip`` stage: clip the float weights and save them as a plain transformers model."""
    from ..atomic import atomic_dir
    from ..data.text import load_texts, token_blocks
    from ..models import load_model

    model, tokenizer = load_model(context.float_model)
    ids = token_blocks(load_texts(cfg.calib_source, "train"), tokenizer, cfg.seq_len, cfg.samples)
    changed = apply_clip_search(model, ids, GridSpec(cfg.grid, cfg.bits, cfg.group_size), cfg.include, cfg.exclude,
                                cfg.skip, cfg.tokens_per_layer)
    with atomic_dir(context.out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {"layers": len(changed), "mean_fraction_clamped": sum(changed.values()) / max(len(changed), 1)}


register_stage(StageKind("clip", ClipStage, run_clip_stage, produces="float_model"))
