"""The process's peak resident memory, as the training stages log it."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: ``VmHWM`` where Linux reports it, because
    ``getrusage``'s ``ru_maxrss`` of a process started by fork + exec still counts its parent's
    resident memory at the fork; ``ru_maxrss`` elsewhere."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
