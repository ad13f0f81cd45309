"""The Python API: the same three jobs as ``upq quantize --recipe``, ``upq eval`` and ``upq export``.

    import upq

    out = upq.quantize(recipe="upq", budget="cpu", out="out/upq-int2", overrides={"distill.beta": 0.3})
    result = upq.evaluate(out, tasks=["ppl", "kl"])
    upq.export(out, "out/upq-int2.gguf", format="gguf")

The CLI commands call these functions, so both take the same recipes, budgets and override keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .logs import get_logger

EXPORT_FORMATS = ("hf", "gguf")
_HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quantize(
    model: str | None = None,
    recipe: str = "upq",
    budget: str = "cpu",
    out: str | Path = "out/upq",
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    work_dir: str | Path | None = None,
    device: str = "cpu",
    keep_work: bool = False,
    add_stages: Sequence[str] = (),
) -> Path:
    """Run ``recipe`` (a built-in name or a YAML path) on ``model`` and return the packed checkpoint directory.

    ``model``: a Hugging Face id or local directory (``None``: the bundled SmolLM2-135M-Instruct).
    ``overrides``: ``{"distill.beta": 0.3}`` or ``["distill.beta=0.3"]``, as ``--set`` takes them.
    ``add_stages``: stage kinds appended to the recipe (e.g. ``["lm-head"]``: pack the output head
    too), set with ``overrides`` like the others. A run that was interrupted resumes from
    ``work_dir`` (default ``OUT.work``) when called again.
    """
    from .pipeline import run_recipe
    from .recipes.schema import load_recipe

    return run_recipe(load_recipe(recipe, budget, overrides, add_stages), model, out, work_dir, device=device,
                      keep_work=keep_work)


def evaluate(
    model: str | Path | None = None,
    tasks: Sequence[str] | None = None,
    reference: str | None = None,
    device: str = "cpu",
    record: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Evaluate a model (upq checkpoint, transformers directory, hub id; ``None``: the bundled model).

    ``tasks``: ppl, kl, mmlu, ifeval (default: EvalSettings' ppl and kl). ``settings`` are
    :class:`upq.evaluation.runner.EvalSettings` fields (``limit``, ``ppl_max_tokens``,
    ``kl_prompts``, ...). KL and top-1 agreement are measured against ``reference`` (default: the
    source model a upq checkpoint records). With ``record``, a upq checkpoint's model card gets the
    results. Returns the result dictionary that ``upq eval --out`` writes.
    """
    from .evaluation.runner import EvalSettings
    from .evaluation.runner import evaluate as run_evaluation
    from .loading import is_upq_checkpoint

    result = run_evaluation(None if model is None else str(model), reference,
                            EvalSettings(**({} if tasks is None else {"tasks": tuple(tasks)}), **settings), device=device)
    if record and model is not None and is_upq_checkpoint(model):
        _record_in_card(Path(model), result)
    return result


def _record_in_card(checkpoint: Path, result: dict[str, Any]) -> None:
    """Add an evaluation to the checkpoint's model card; a read-only directory only warns."""
    from .model_card import record_evaluation

    try:
        record_evaluation(checkpoint, result)
    except OSError as exc:
        get_logger("eval").warning("could not record the results in %s's model card: %s", checkpoint, exc)


def export(checkpoint: str | Path, out: str | Path, format: str = "hf", dtype: str = "float16", **options: Any) -> Any:
    """Export a upq checkpoint: ``hf`` (a dequantized transformers directory; returns its path) or
    ``gguf`` (llama.cpp; returns the per-tensor :class:`upq.export_gguf.GGUFReport`).

    ``options`` go to :func:`upq.export_gguf.export_gguf` (``tokenizer_pre``, ``strict``).
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; supported: {', '.join(EXPORT_FORMATS)}")
    if format == "gguf":
        from .export_gguf import export_gguf

        return export_gguf(checkpoint, out, dense_type=dtype, **options)
    if options:
        raise ValueError(f"the hf export takes no options {sorted(options)}")
    if dtype not in _HF_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_HF_DTYPES)}, got {dtype!r}")
    from .export_hf import export_hf

    return export_hf(checkpoint, out, dtype=_HF_DTYPES[dtype])
