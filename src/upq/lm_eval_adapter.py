"""Run lm-evaluation-harness itself on a upq model: an ``HFLM`` built from the loaded model object.

lm-eval is an optional extra (``pip install -e ".[lm-eval]"`` in a checkout); it is imported only when
:func:`hflm` is called, so ``import upq`` never needs it. ``upq eval`` does not use this module.

    from lm_eval import simple_evaluate
    from upq.lm_eval_adapter import hflm

    results = simple_evaluate(model=hflm("out/upq-int2", batch_size=8), tasks=["hellaswag"])

``upq lm-eval DIR --tasks ...`` (:func:`run_tasks`) does the same from the command line. The
checkpoint is loaded by :func:`upq.loading.load_any` (so its decoder linears stay
``PackedLinear`` and run the packed kernels); lm-eval receives the live model object and
does not need to call ``from_pretrained`` itself (which also works once ``upq`` is imported:
:mod:`upq.transformers_quantizer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

LM_EVAL_REQUIREMENT = "lm-eval>=0.4.13,<0.5"
INSTALL_HINT = f'pip install "{LM_EVAL_REQUIREMENT}"   (or, in a upq checkout: pip install -e ".[lm-eval]")'


def _import_hflm() -> type:
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise ImportError(
            f"upq.lm_eval_adapter needs lm-evaluation-harness, which is not installed ({exc}). Install it with: {INSTALL_HINT}"
        ) from exc
    return HFLM


def hflm(
    model_or_path: str | Path | torch.nn.Module | None,
    batch_size: int | str = 1,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizer: Any = None,
    **hflm_kwargs: Any,
) -> Any:
    """An lm-eval ``HFLM`` wrapping a upq checkpoint, a transformers model or an already-loaded model.

    ``model_or_path``: a upq checkpoint directory, a local transformers directory, a hub id, or
    ``None`` for the bundled default model (all loaded with :func:`upq.loading.load_any` on
    ``device`` in ``dtype``); or a loaded model object, in which case ``tokenizer`` is required.
    ``batch_size`` and any ``hflm_kwargs`` (``max_length``, ``add_bos_token``, ...) go to ``HFLM``.
    """
    HFLM = _import_hflm()  # fail before spending time on loading the model
    if isinstance(model_or_path, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("hflm(model_object) needs tokenizer=...; pass a path to load both")
        model = model_or_path
    else:
        from .loading import load_any

        model, loaded_tokenizer = load_any(model_or_path, dtype=dtype, device=device)
        tokenizer = loaded_tokenizer if tokenizer is None else tokenizer
    model.eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, **hflm_kwargs)


def run_tasks(
    model_or_path: str | Path | None,
    tasks: list[str],
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run lm-eval tasks (hub names, or local YAML tasks under ``include_path``) and return its results."""
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"task directory not found: {include_path}")
    lm = hflm(model_or_path, batch_size=batch_size, device=device)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                           task_manager=TaskManager(include_path=include_path))


def results_json(results: dict[str, Any]) -> str:
    """The results as JSON text, with lm-eval's own fallback for values JSON cannot hold (dtypes, ...)."""
    import json

    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable) + "\n"


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's own markdown table of a results dictionary."""
    from lm_eval.utils import make_table

    return make_table(results)
