"""Training-memory savers that leave every number unchanged.

* **Recomputation** (``DistillConfig.gradient_checkpointing``): ``mlp`` keeps only each decoder
  MLP's input for backward and recomputes the MLP there (gate, up, SiLU and product, with their
  quantized weights), instead of keeping four intermediate-sized tensors per layer, the largest
  share of a Llama layer's saved activations. In the layers of :data:`NORM_FEEDS_MLP` the
  post-attention RMSNorm joins the recomputed region, so its output is not kept either.
  ``layers`` recomputes whole decoder layers (transformers' own gradient checkpointing): less
  memory still, one more student forward.
* **Shared frozen tensors**: the student's frozen parameters that equal the teacher's (the
  embedding and a tied head, normally) use the teacher's storage instead of a second copy.
* **Block cache** (``DistillConfig.block_cache_mib``): on CPU, tensors of 1 MiB and more come
  from the native block cache (``kernels/csrc/block_cache.cpp``) instead of glibc's heap, which
  fragments under a training step's mix of lifetimes and keeps freed memory resident.

Recomputing is deterministic here (same inputs, same kernels), so gradients are identical with
and without it; ``tests/test_distill_memory.py`` checks that.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..kernels.native import load_native
from ..logs import get_logger

CHECKPOINTING = ("none", "mlp", "layers")
# Requests below this size stay with the default allocator (small tensors do not fragment the heap).
BLOCK_CACHE_MIN_BYTES = 1 << 20
log = get_logger("distill.memory")


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


# Decoder layers whose forward is `mlp(post_attention_layernorm(h))` with nothing else reading the
# norm's output (checked in transformers' sources; Gemma's norm of that name does something else).
NORM_FEEDS_MLP = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def _decoder_layers(lm: nn.Module) -> list[nn.Module]:
    layers = list(getattr(lm.get_decoder(), "layers", None) or [])
    if not layers or any(getattr(layer, "mlp", None) is None for layer in layers):
        raise ValueError(f"gradient_checkpointing='mlp' needs decoder layers with an `mlp` module; "
                         f"{type(lm).__name__} has none (use 'layers' or 'none')")
    return layers


def _recompute_mlp(layer: nn.Module) -> None:
    """Make ``layer``'s MLP (with its input norm where :data:`NORM_FEEDS_MLP` allows) one recomputed
    region. Instance attributes shadow the classes' forwards: names and state dict are unchanged."""
    mlp = layer.mlp
    mlp_forward = type(mlp).forward.__get__(mlp)
    norm = getattr(layer, "post_attention_layernorm", None)
    if type(layer).__name__ in NORM_FEEDS_MLP and norm is not None:
        norm_forward = type(norm).forward.__get__(norm)
        norm.forward = _identity
        mlp.forward = _recomputed(lambda hidden: mlp_forward(norm_forward(hidden)))
    else:
        mlp.forward = _recomputed(mlp_forward)


def enable_checkpointing(lm: nn.Module, mode: str) -> None:
    """Turn on the recomputation ``mode`` (:data:`CHECKPOINTING`) for training ``lm``."""
    mode = check_checkpointing(mode)
    if mode == "layers":
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif mode == "mlp":
        for layer in _decoder_layers(lm):
            _recompute_mlp(layer)


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


@contextmanager
def cpu_block_cache(limit_mib: int) -> Iterator[Callable[[], dict[str, int]] | None]:
    """Serve CPU tensors of at least :data:`BLOCK_CACHE_MIN_BYTES` from the native block cache
    inside the block, keeping at most ``limit_mib`` MiB of freed blocks for reuse. Yields a
    function returning the cache's counters, or None when ``limit_mib`` is 0, the native extension
    is unavailable or a cache is already active (an outer block owns it)."""
    native = load_native() if limit_mib > 0 else None
    if native is None:
        if limit_mib > 0:
            log.info("block cache off: the native extension is unavailable")
        yield None
        return
    if not native.block_cache_install(BLOCK_CACHE_MIN_BYTES, limit_mib << 20):
        yield None
        return
    native.block_cache_reset_peak()
    try:
        yield native.block_cache_stats
    finally:
        native.block_cache_uninstall()
