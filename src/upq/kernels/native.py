"""Build (at first use) and load the native CPU kernel extension.

The C++ sources in ``csrc/`` are compiled just in time with ``torch.utils.cpp_extension.load``
(ninja + the system C++ compiler) into ``$UPQ_CACHE/kernels/<name>`` (default
``~/.cache/upq/kernels``), where ``<name>`` hashes the sources, the torch version and the
flags, so edits or torch upgrades rebuild and unchanged setups load in well under a second.
Nothing is built at ``pip install`` time (build isolation would pull a different torch).

``UPQ_NATIVE=0`` disables the extension; when the build fails (no compiler, no ninja) the
reference path is used and one warning says why.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

from ..assets import cache_dir

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("upq_cpu.cpp", "llama_decoder.cpp", "dense_gemv.cpp", "gjsd_loss.cpp", "block_cache.cpp")
DEPENDS = ("kernels.h", "kernel_body.inc", "group_params.inc", "multiversion.h")
# -fno-math-errno / -fno-trapping-math change no value (only errno and floating-point exception
# flags, which nothing reads): they let GCC vectorize loops with sqrt/exp and branch-free selects
# (the gJSD row kernel runs 10x slower without the second).
CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math")
LDFLAGS = ("-fopenmp",)

log = logging.getLogger("upq.kernels")
_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None
_build_seconds: float | None = None


def _build_name() -> str:
    digest = hashlib.sha256()
    for name in (*SOURCES, *DEPENDS):
        digest.update(name.encode())
        digest.update((CSRC / name).read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(sys.version.encode())
    digest.update(" ".join((*CFLAGS, *LDFLAGS)).encode())
    return f"upq_cpu_{digest.hexdigest()[:12]}"


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept: ``$UPQ_KERNEL_CACHE``, else ``$UPQ_CACHE/kernels``
    (default ``~/.cache/upq/kernels``)."""
    override = os.environ.get("UPQ_KERNEL_CACHE")
    return Path(override).expanduser() if override else cache_dir() / "kernels"


def _existing_build(name: str) -> Path | None:
    """A finished build of ``name`` in the configured or the default cache (so a temporary
    ``$UPQ_CACHE``, as tests use, does not force a rebuild)."""
    for root in (kernel_cache_dir(), Path.home() / ".cache" / "upq" / "kernels"):
        if any((root / name).glob(f"{name}*.so")):
            return root / name
    return None


def load_native(verbose: bool = False) -> ModuleType | None:
    """The compiled extension module, building it on first use; ``None`` when it cannot be built.

    The first failure is remembered (and warned about once) so later calls return quickly.
    """
    global _module, _error, _build_seconds
    if _module is not None or _error is not None:
        return _module
    with _lock:
        if _module is not None or _error is not None:
            return _module
        if os.environ.get("UPQ_NATIVE", "1").strip().lower() in {"0", "false", "no", "off"}:
            _error = "disabled by UPQ_NATIVE=0"
            return None
        start = time.perf_counter()
        try:
            from torch.utils.cpp_extension import load

            name = _build_name()
            build_dir = _existing_build(name) or kernel_cache_dir() / name
            build_dir.mkdir(parents=True, exist_ok=True)
            if not any(build_dir.glob(f"{name}*.so")):
                log.info("building the native CPU kernel in %s (first use, about a minute)", build_dir)
            _module = load(
                name=name,
                sources=[str(CSRC / s) for s in SOURCES],
                extra_cflags=list(CFLAGS),
                extra_ldflags=list(LDFLAGS),
                extra_include_paths=[str(CSRC)],
                build_directory=str(build_dir),
                verbose=verbose,
            )
        except Exception as exc:  # compiler/ninja missing or a build error: fall back, say why once
            _error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}"
            warnings.warn(
                f"upq: native CPU kernel unavailable ({_error}); using the slower reference path. "
                "Install a C++ compiler (g++) and `pip install ninja` to enable it, or set UPQ_NATIVE=0 "
                "to silence this warning.",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        _build_seconds = time.perf_counter() - start
        return _module


def native_error() -> str | None:
    """Why the native kernel is unavailable (after a load attempt), else ``None``."""
    return _error


def native_available() -> bool:
    """True when the native CPU kernel is (or can be) built and loaded."""
    return load_native() is not None


def native_info() -> dict:
    """ISA the kernel will use, load/build time and where it is cached (loads the kernel)."""
    mod = load_native()
    return {
        "available": mod is not None,
        "isa": mod.best_isa() if mod is not None else None,
        "load_seconds": None if _build_seconds is None else round(_build_seconds, 2),
        "cache_dir": str(kernel_cache_dir()),
        "error": _error,
    }
