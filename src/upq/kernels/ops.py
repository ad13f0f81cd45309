"""Packed low-bit matmul: the native CPU kernel, the Triton CUDA kernel and the pure-PyTorch
reference (the test oracle).

All take the storage form of a ``PackedLinear`` (``qweight``, ``scale``, ``zero``, ``bias``, its
``GridSpec`` and ``in_features``) and compute ``x @ W^T + bias`` for ``x`` of shape (..., in).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..grids import GridSpec, QuantizedWeight, decode
from ..packing import storage_bits, unpack_codes
from . import native as _native
from .native import load_native, native_error

ISA_IDS = {"auto": -1, "scalar": 0, "avx2": 1, "avx512": 2}
BACKENDS = ("auto", "native", "triton", "reference")
AUTO_KERNELS = {"cpu": "native", "cuda": "triton"}  # what ``auto`` tries, by the input's device type
GEMV_MAX_BATCH = 16


class KernelUnsupported(RuntimeError):
    """A requested kernel cannot run this layer/input (the reason is the message)."""


class NativeUnsupported(KernelUnsupported):
    """The native kernel cannot run this layer/input (the reason is the message)."""


class TritonUnsupported(KernelUnsupported):
    """The Triton kernel cannot run this layer/input (the reason is the message)."""


_UNSUPPORTED = {"native": NativeUnsupported, "triton": TritonUnsupported}
_triton_module: ModuleType | None = None
_triton_error: str | None = None


def reference_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bias: torch.Tensor | None,
    spec: GridSpec,
    in_features: int,
) -> torch.Tensor:
    """Dequantize the whole weight in float32, cast to ``x``'s dtype and multiply (the oracle)."""
    codes = unpack_codes(qweight, spec.bits, in_features)
    weight = decode(QuantizedWeight(spec, codes, scale, zero)).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def native_unsupported_reason(
    spec: GridSpec, in_features: int, x: torch.Tensor | None = None, isa: str = "auto"
) -> str | None:
    """Why the native kernel cannot run this layer (and input), or ``None`` when it can."""
    if spec.impl.kernel_id is None:
        return f"grid {spec.grid!r} has no native kernel"
    if storage_bits(spec.bits) not in (2, 4):
        return f"{spec.bits}-bit codes are stored in {storage_bits(spec.bits)}-bit containers; the kernel handles 2- and 4-bit storage"
    if x is not None:
        if x.device.type != "cpu":
            return f"input is on {x.device}, the native kernel is CPU-only"
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"input dtype {x.dtype} is not supported (float32, bfloat16, float16)"
        if x.shape[-1] != in_features:
            return f"input has {x.shape[-1]} features, the layer expects {in_features}"
    mod = load_native()
    if mod is None:
        return f"native kernel unavailable ({native_error()})"
    group_len = spec.group_len(in_features)
    if not mod.layout_supported(spec.bits, in_features // group_len, group_len, ISA_IDS[isa]):
        return f"group size {spec.group_size} with {spec.bits}-bit codes is not supported by the {isa} kernel"
    return None


class NativePlan(NamedTuple):
    """What the native kernel needs to know about a layer, checked once (see :func:`native_plan`)."""

    grid: int
    bits: int
    group_len: int
    in_features: int


def native_plan(spec: GridSpec, in_features: int, isa: str = "auto") -> NativePlan:
    """Validate a layer format for the native kernel once; raises :class:`NativeUnsupported`."""
    reason = native_unsupported_reason(spec, in_features, isa=isa)
    if reason is not None:
        raise NativeUnsupported(reason)
    return NativePlan(spec.impl.kernel_id, spec.bits, spec.group_len(in_features), in_features)


def run_plan(
    plan: NativePlan,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The per-call fast path of :func:`native_linear` for a validated plan (CPU float input)."""
    mod = _native._module
    if mod is None:
        raise NativeUnsupported(f"native kernel unavailable ({native_error()})")
    if x.dim() == 2:
        return mod.packed_linear(x, qweight, scale, zero, bias, plan.grid, plan.bits, plan.group_len, -1, GEMV_MAX_BATCH)
    out = mod.packed_linear(x.reshape(-1, plan.in_features), qweight, scale, zero, bias, plan.grid, plan.bits,
                            plan.group_len, -1, GEMV_MAX_BATCH)
    return out.view(*x.shape[:-1], out.shape[-1])


def native_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bias: torch.Tensor | None,
    spec: GridSpec,
    in_features: int,
    *,
    isa: str = "auto",
    gemv_max_batch: int = GEMV_MAX_BATCH,
) -> torch.Tensor:
    """``x @ W^T + bias`` with the native CPU kernel, reading the packed codes directly.

    Batches of up to ``gemv_max_batch`` rows use the register-unpacking matrix-vector kernel;
    larger ones dequantize cache-sized tiles of W and call ``at::mm``. ``isa`` forces
    ``scalar``/``avx2``/``avx512`` (for tests); ``auto`` picks the best the CPU has.
    Raises :class:`NativeUnsupported` when the kernel cannot run this case.
    """
    mod = load_native()
    if mod is None:
        raise NativeUnsupported(f"native kernel unavailable ({native_error()})")
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {in_features}")
    x2 = x.reshape(-1, in_features)
    try:
        out = mod.packed_linear(
            x2, qweight, scale, zero, bias, spec.impl.kernel_id, spec.bits,
            spec.group_len(in_features), ISA_IDS[isa], gemv_max_batch,
        )
    except KeyError as exc:
        raise NativeUnsupported(f"no native kernel for {exc}") from exc
    return out.view(*x.shape[:-1], out.shape[-1])


def load_triton() -> ModuleType | None:
    """The Triton kernel module (importing Triton on first use), or ``None`` when Triton cannot be imported.

    Set ``TRITON_INTERPRET=1`` before the first call to run the kernel in Triton's CPU interpreter.
    """
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            from . import triton_kernel

            _triton_module = triton_kernel
        except Exception as exc:  # noqa: BLE001 -- not installed or a broken install: remembered as the reason
            _triton_error = f"{type(exc).__name__}: {exc}"
    return _triton_module


def triton_unsupported_reason(
    spec: GridSpec, in_features: int, device: torch.device | str, dtype: torch.dtype
) -> str | None:
    """Why the Triton kernel cannot run this layer on an input of ``device``/``dtype`` (``None``: it can)."""
    mod = load_triton()
    if mod is None:
        return f"Triton unavailable ({_triton_error})"
    return mod.unsupported_reason(spec, in_features, torch.device(device), dtype)


def triton_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bias: torch.Tensor | None,
    spec: GridSpec,
    in_features: int,
) -> torch.Tensor:
    """``x @ W^T + bias`` with the Triton kernel (CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``).

    Raises :class:`TritonUnsupported` when the kernel cannot run this case.
    """
    reason = triton_unsupported_reason(spec, in_features, x.device, x.dtype)
    if reason is not None:
        raise TritonUnsupported(reason)
    return _triton_module.triton_linear(x, qweight, scale, zero, bias, spec, in_features)


def choose_backend(
    backend: str, device_type: str, reason_for: Callable[[str], str | None]
) -> tuple[str, str | None]:
    """Which implementation runs: ``(kernel, None)`` or ``("reference", why no kernel runs)``.

    ``reason_for(kernel)`` says why ``native``/``triton`` cannot run the case (``None``: it can).
    ``auto`` tries the kernel of ``device_type`` (``native`` on CPU, ``triton`` on CUDA) and falls
    back to the reference path; naming a kernel raises its :class:`KernelUnsupported` instead.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "reference":
        return "reference", None
    kernel = AUTO_KERNELS.get(device_type) if backend == "auto" else backend
    if kernel is None:
        return "reference", f"no kernel for {device_type} tensors"
    reason = reason_for(kernel)
    if reason is None:
        return kernel, None
    if backend != "auto":
        raise _UNSUPPORTED[kernel](reason)
    return "reference", reason


def packed_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bias: torch.Tensor | None,
    spec: GridSpec,
    in_features: int,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``x @ W^T + bias`` with ``backend`` = ``native``, ``triton``, ``reference`` or ``auto``.

    ``auto`` uses the kernel for ``x``'s device (native on CPU, Triton on CUDA) when it can run the
    case (supported format, no gradient needed for ``x``) and the reference path otherwise;
    ``native``/``triton`` raise :class:`NativeUnsupported`/:class:`TritonUnsupported` with the
    reason instead of falling back (see :func:`choose_backend`).
    """

    def reason_for(kernel: str) -> str | None:
        if torch.is_grad_enabled() and x.requires_grad:
            return f"the {kernel} kernel has no backward pass"
        if kernel == "native":
            return native_unsupported_reason(spec, in_features, x)
        return triton_unsupported_reason(spec, in_features, x.device, x.dtype)

    kernel, _ = choose_backend(backend, x.device.type, reason_for)
    if kernel == "native":
        return native_linear(x, qweight, scale, zero, bias, spec, in_features)
    if kernel == "triton":
        return _triton_module.triton_linear(x, qweight, scale, zero, bias, spec, in_features)
    return reference_linear(x, qweight, scale, zero, bias, spec, in_features)
