"""Result files and one-line / markdown summaries of evaluation results."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..atomic import write_json_atomic

__all__ = ["write_json_atomic", "read_json", "flatten", "format_value", "markdown_header", "compare_table"]


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


def markdown_header(columns: Sequence[str]) -> str:
    """Header and separator lines of a markdown table with ``columns``."""
    return "| " + " | ".join(columns) + " |\n|" + "|".join("---" for _ in columns) + "|"


COMPARE_COLUMNS = ("model", "method", "bits", "ppl", "KL", "top-1", "MMLU", "IFEval (prompt strict)", "weights MiB")


def compare_table(results: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of several ``upq eval`` results side by side (``upq eval --compare``)."""
    rows = [markdown_header(COMPARE_COLUMNS)]
    for r in results:
        flat, q = flatten(r), r.get("quantization") or {}
        weights = flat.get("size.weights_bytes")
        cells = [r.get("name", r.get("model")), q.get("method", "fp"), q.get("bits", "16/32"), flat.get("metrics.ppl.ppl"),
                 flat.get("metrics.kl.kl"), flat.get("metrics.kl.top1_agreement"), flat.get("metrics.mmlu.accuracy"),
                 flat.get("metrics.ifeval.prompt_level_strict"), None if not weights else weights / 2**20]
        rows.append("| " + " | ".join(format_value(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)
