"""The model card (``README.md``) written into every upq checkpoint directory.

It is rebuilt from what the directory records: the ``quantization_config`` in ``config.json``
(base model, method or recipe, grid, bits, group size, stages) and, once ``upq eval`` has run on
the checkpoint, its latest metrics in ``upq_eval.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .atomic import write_json_atomic, write_text_atomic
from .models import BUNDLED_HUB_ID, BUNDLED_MODEL

CARD_NAME = "README.md"
EVAL_NAME = "upq_eval.json"


def render_model_card(quant_config: dict[str, Any], weights_bytes: int, evaluation: dict[str, Any] | None) -> str:
    """The card's markdown for a checkpoint with ``quant_config`` and ``weights_bytes`` of weight files."""
    base = quant_config.get("source_model") or "unknown"
    base = BUNDLED_HUB_ID if base == BUNDLED_MODEL else base
    recipe = quant_config.get("recipe") or {}
    method = quant_config.get("method", "upq")
    group = quant_config.get("group_size")
    lines = [
        "---",
        f"base_model: {base}" if "/" in str(base) and not str(base).startswith(("/", ".")) else f"# base model: {base}",
        "library_name: transformers",
        "tags: [upq, quantized, " + f"{quant_config.get('bits')}-bit]",
        "---",
        "",
        f"# {Path(str(base)).name} — {method}, {quant_config.get('bits')}-bit {quant_config.get('grid')}",
        "",
        f"Packed low-bit checkpoint of `{base}`, made by upq {quant_config.get('upq_version', '')}.",
        "",
        "```python",
        "import upq  # registers the upq format with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("THIS_DIR")  # or upq.load("THIS_DIR")',
        'tokenizer = AutoTokenizer.from_pretrained("THIS_DIR")',
        "```",
        "",
        "## Quantization",
        "",
        "| field | value |",
        "|---|---|",
        f"| method / recipe | {method} |",
        f"| grid | {quant_config.get('grid')} |",
        f"| bits | {quant_config.get('bits')} |",
        f"| group size | {'per channel' if group is None else group} |",
        f"| quantized linears | {len(quant_config.get('modules', {}))} (not quantized: {', '.join(quant_config.get('modules_not_quantized', [])) or 'none'}) |",
        f"| weight files | {weights_bytes / 2**20:.1f} MiB |",
    ]
    stages = quant_config.get("stages") or []
    if stages:
        lines += ["", "Stages (`quantization_config.stages` holds every setting):", ""]
        lines += [f"{s.get('index', i) + 1}. {s.get('stage')} ({s.get('seconds', '?')} s)" for i, s in enumerate(stages)]
    if recipe.get("description"):
        lines += ["", f"Recipe `{recipe.get('name', method)}`: {recipe['description']}"]
    lines += ["", "## Evaluation", ""]
    lines += _evaluation_lines(evaluation)
    return "\n".join(lines) + "\n"


def _evaluation_lines(evaluation: dict[str, Any] | None) -> list[str]:
    if not evaluation:
        return ["Not evaluated yet: `upq eval THIS_DIR` records its results here."]
    metrics, measured_with = evaluation.get("metrics", {}), evaluation.get("measured_with", {})
    rows = []
    if "ppl" in metrics:
        rows.append(f"| perplexity ({metrics['ppl'].get('tokens')} held-out tokens) | {metrics['ppl']['ppl']:.3f} |")
    if "kl" in metrics:
        reference = measured_with.get("kl", {}).get("reference", "the original")
        rows.append(f"| KL({reference} ‖ this model) per response token | {metrics['kl']['kl']:.4f} |")
        rows.append(f"| top-1 agreement with {reference} | {metrics['kl']['top1_agreement']:.3f} |")
    if "ifeval" in metrics:
        rows.append(f"| IFEval prompt-level strict | {metrics['ifeval'].get('prompt_level_strict', float('nan')):.3f} |")
    if "mmlu" in metrics:
        rows.append(f"| MMLU accuracy | {metrics['mmlu'].get('accuracy', float('nan')):.3f} |")
    machine = next((c.get("machine", {}) for c in measured_with.values()), {})
    return ["| metric | value |", "|---|---|", *rows, "",
            f"Measured by `upq eval` on {machine.get('cpu', 'unknown')} ({machine.get('gpu') or 'no GPU'}); "
            f"settings in `{EVAL_NAME}`."]


def write_model_card(checkpoint_dir: str | Path) -> Path:
    """(Re)write ``README.md`` of a checkpoint directory from its config and recorded evaluation."""
    checkpoint_dir = Path(checkpoint_dir)
    quant_config = json.loads((checkpoint_dir / "config.json").read_text())["quantization_config"]
    weights = sum(p.stat().st_size for p in checkpoint_dir.iterdir() if p.suffix == ".safetensors")
    eval_file = checkpoint_dir / EVAL_NAME
    evaluation = json.loads(eval_file.read_text()) if eval_file.is_file() else None
    path = checkpoint_dir / CARD_NAME
    write_text_atomic(path, render_model_card(quant_config, weights, evaluation))
    return path


def record_evaluation(checkpoint_dir: str | Path, result: dict[str, Any]) -> Path:
    """Merge an evaluation result into the checkpoint's ``upq_eval.json`` (newest task wins) and rewrite the card."""
    checkpoint_dir = Path(checkpoint_dir)
    eval_file = checkpoint_dir / EVAL_NAME
    merged = json.loads(eval_file.read_text()) if eval_file.is_file() else {"metrics": {}}
    context = {k: v for k, v in result.items() if k not in ("metrics", "timings_s")}
    for task, metrics in result.get("metrics", {}).items():
        merged["metrics"][task] = metrics
        merged.setdefault("measured_with", {})[task] = context
    write_json_atomic(eval_file, merged)
    return write_model_card(checkpoint_dir)
