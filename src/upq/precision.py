"""Where bf16 pays: the ``mixed_precision`` setting of the training stages and what ``auto`` means."""

from __future__ import annotations

import torch

MIXED_PRECISION = ("auto", "no", "bf16")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively: CUDA, or a CPU with AVX512-BF16 or AMX
    (where oneDNN's bf16 products run several times faster than fp32; without them bf16 is
    emulated and slower than fp32)."""
    if device.type == "cuda":
        return True
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return device.type == "cpu" and any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def check_mixed_precision(setting: str) -> str:
    """``setting`` if it is one of :data:`MIXED_PRECISION`, else a ValueError naming the choices."""
    if setting not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {setting!r}")
    return setting


def use_bf16(setting: str, device: torch.device) -> bool:
    """Whether forward passes run under bf16 autocast: ``bf16``, or ``auto`` where :func:`native_bf16`."""
    return setting == "bf16" or (setting == "auto" and native_bf16(device))
