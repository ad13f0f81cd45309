"""The shared heavy-compute lock of the benchmark scripts, and stage results cached under it."""

from __future__ import annotations

import fcntl
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from upq.atomic import write_json_atomic

LOCK = "/tmp/upq-heavy.lock"


@contextmanager
def heavy_lock() -> Iterator[None]:
    """Hold the shared heavy-compute lock (the same file ``flock`` uses)."""
    with open(LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()`` once under the heavy lock; its JSON result is kept at ``path``."""
    if path.is_file():
        return json.loads(path.read_text())
    with heavy_lock():
        started = time.perf_counter()
        result = compute()
        result["stage_seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(path, result)
    return result
