"""Stable digests of JSON-like payloads: cache keys and resume fingerprints share this one definition."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def json_digest(payload: Any) -> str:
    """Hex sha256 of ``payload`` as canonical JSON (sorted keys; values JSON cannot hold written with ``str``)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
