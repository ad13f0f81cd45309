"""Fast matmul kernels for packed low-bit weights, plus the reference path they are tested against.

- :func:`packed_linear`: ``x @ W^T + bias`` with ``backend`` = ``auto`` | ``native`` | ``triton`` |
  ``reference``; :func:`choose_backend` is its selection rule.
- :func:`native_linear`: the native CPU kernel (C++, AVX-512/AVX2/scalar, multi-threaded),
  compiled at first use; :func:`native_available` / :func:`native_info` report on it.
- :func:`triton_linear`: the Triton CUDA kernel (``triton_kernel.py``, imported on first use).
- :func:`reference_linear`: dequantize in PyTorch, then ``F.linear`` (the oracle).
"""

from .native import (
    kernel_cache_dir,
    load_native,
    native_available,
    native_error,
    native_info,
)
from .ops import (
    BACKENDS,
    GEMV_MAX_BATCH,
    KernelUnsupported,
    NativePlan,
    NativeUnsupported,
    TritonUnsupported,
    choose_backend,
    load_triton,
    native_linear,
    native_plan,
    native_unsupported_reason,
    packed_linear,
    reference_linear,
    run_plan,
    triton_linear,
    triton_unsupported_reason,
)

__all__ = [
    "BACKENDS",
    "GEMV_MAX_BATCH",
    "KernelUnsupported",
    "NativePlan",
    "NativeUnsupported",
    "TritonUnsupported",
    "choose_backend",
    "kernel_cache_dir",
    "load_native",
    "load_triton",
    "native_available",
    "native_error",
    "native_info",
    "native_linear",
    "native_plan",
    "native_unsupported_reason",
    "packed_linear",
    "reference_linear",
    "run_plan",
    "triton_linear",
    "triton_unsupported_reason",
]
