"""Fast matmul kernels for packed low-bit weights, plus the reference path they are tested against.

- :func:`packed_linear`: ``x @ W^T + bias`` with ``backend`` = ``auto`` | ``native`` | ``reference``.
- :func:`native_linear`: the native CPU kernel (C++, AVX-512/AVX2/scalar, multi-threaded),
  compiled at first use; :func:`native_available` / :func:`native_info` report on it.
- :func:`reference_linear`: dequantize in PyTorch, then ``F.linear`` (the oracle).
"""

from .native import kernel_cache_dir, load_native, native_available, native_error, native_info
from .ops import (
    BACKENDS,
    GEMV_MAX_BATCH,
    NativePlan,
    NativeUnsupported,
    native_linear,
    native_plan,
    native_unsupported_reason,
    packed_linear,
    reference_linear,
    run_plan,
)

__all__ = [
    "BACKENDS",
    "GEMV_MAX_BATCH",
    "NativePlan",
    "NativeUnsupported",
    "kernel_cache_dir",
    "load_native",
    "native_available",
    "native_error",
    "native_info",
    "native_linear",
    "native_plan",
    "native_unsupported_reason",
    "packed_linear",
    "reference_linear",
    "run_plan",
]
