"""Training-memory savers that leave every number unchanged.

* **Recomputation** (``DistillConfig.gradient_checkpointing``): ``mlp`` keeps only each decoder
  MLP's input for backward and recomputes the MLP there (gate, up, SiLU, product and down, with
  their quantized weights), instead of keeping four intermediate-sized tensors per layer, the
  largest share of a Llama layer's saved activations. ``layers`` recomputes whole decoder layers
  (transformers' own gradient checkpointing): less memory still, one more student forward.
* **Shared frozen tensors**: the student's frozen parameters that equal the teacher's (the
  embedding and a tied head, normally) use the teacher's storage instead of a second copy.

Recomputing is deterministic here (same inputs, same kernels), so gradients are identical with
and without it; ``tests/test_distill_memory.py`` checks that.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

CHECKPOINTING = ("none", "mlp", "layers")


def check_checkpointing(mode: Any) -> str:
    """The recomputation mode ``mode`` names (``True``/``False`` mean ``layers``/``none``, as before)."""
    if isinstance(mode, bool):
        return "layers" if mode else "none"
    if mode not in CHECKPOINTING:
        raise ValueError(f"gradient_checkpointing must be one of {CHECKPOINTING}, got {mode!r}")
    return mode


def _recomputed(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(hidden: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return forward(hidden)
        return checkpoint(forward, hidden, use_reentrant=False)

    return run


def _decoder_mlps(lm: nn.Module) -> list[nn.Module]:
    layers = getattr(lm.get_decoder(), "layers", None)
    mlps = [getattr(layer, "mlp", None) for layer in layers] if layers is not None else []
    if not mlps or any(m is None for m in mlps):
        raise ValueError(f"gradient_checkpointing='mlp' needs decoder layers with an `mlp` module; "
                         f"{type(lm).__name__} has none (use 'layers' or 'none')")
    return mlps


def enable_checkpointing(lm: nn.Module, mode: str) -> None:
    """Turn on the recomputation ``mode`` (:data:`CHECKPOINTING`) for training ``lm``."""
    mode = check_checkpointing(mode)
    if mode == "layers":
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif mode == "mlp":
        for mlp in _decoder_mlps(lm):
            # the instance attribute shadows the class's forward; names and state dict are unchanged
            mlp.forward = _recomputed(type(mlp).forward.__get__(mlp))


@torch.no_grad()
def share_frozen_tensors(student: nn.Module, teacher: nn.Module) -> int:
    """Point every frozen student parameter that equals the teacher's same-named one at the
    teacher's storage (the Parameter object stays, so tied weights stay tied). Returns bytes saved."""
    theirs = dict(teacher.named_parameters())
    saved = 0
    for name, mine in student.named_parameters():
        other = theirs.get(name)
        if (mine.requires_grad or other is None or other.shape != mine.shape or other.dtype != mine.dtype
                or other.device != mine.device or other.data_ptr() == mine.data_ptr()
                or not torch.equal(other, mine)):
            continue
        mine.data = other.data
        saved += mine.numel() * mine.element_size()
    return saved
