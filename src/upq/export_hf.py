"""Export a upq checkpoint to formats other tools load."""

from __future__ import annotations

from pathlib import Path

import torch

from .atomic import atomic_dir
from .checkpoint import load, load_tokenizer
from .modules import dequantize_model


def export_hf(checkpoint: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write a plain dequantized transformers checkpoint (no upq needed to load it)."""
    model = load(checkpoint)
    source_config = dict(model.upq_config)
    dequantize_model(model, dtype=dtype)
    model.to(dtype)
    tokenizer = load_tokenizer(checkpoint)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.config.upq_dequantized_from = {k: source_config[k] for k in ("method", "grid", "bits", "group_size", "upq_version")}
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir
