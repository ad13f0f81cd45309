"""Result files and one-line / markdown summaries of evaluation results."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..atomic import write_json_atomic

__all__ = ["write_json_atomic", "read_json", "flatten", "format_value", "summary_line",
           "markdown_header", "markdown_row"]


def read_json(path: str | Path) -> Any:
    """Load a JSON file."""
    with Path(path).open(encoding="utf-8") as f:
        return json.load(f)


def flatten(result: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are kept as values)."""
    out: dict[str, Any] = {}
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def format_value(value: Any) -> str:
    """Compact text for a metric: 4 significant digits for floats, ints as is, '-' for None."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def summary_line(result: Mapping[str, Any], keys: Sequence[str] | None = None) -> str:
    """One line ``name: k1=v1 k2=v2 ...`` (nested keys dotted; ``name`` used as the label)."""
    flat = flatten(result)
    label = flat.pop("name", None)
    keys = list(keys) if keys is not None else [k for k, v in flat.items() if not isinstance(v, list)]
    body = " ".join(f"{k}={format_value(flat.get(k))}" for k in keys)
    return f"{label}: {body}" if label is not None else body


def markdown_header(columns: Sequence[str]) -> str:
    """Header and separator lines of a markdown table with ``columns``."""
    return "| " + " | ".join(columns) + " |\n|" + "|".join("---" for _ in columns) + "|"


def markdown_row(result: Mapping[str, Any], columns: Sequence[str]) -> str:
    """One markdown table row with the (dotted) ``columns`` of ``result``; missing -> '-'."""
    flat = flatten(result)
    cells = [format_value(flat.get(c)).replace("|", "\\|") for c in columns]
    return "| " + " | ".join(cells) + " |"
