"""Shared pieces of the Distill-QAT tests: a tiny INT4 checkpoint, a text corpus, a config builder."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch

from upq.checkpoint import save_quantized
from upq.distill.config import DistillConfig
from upq.distill.data import DataConfig
from upq.grids import GridSpec
from upq.models import load_model
from upq.ptq.rtn import rtn_quantize

WORDS = "the quick brown fox jumps over the lazy dog while two bits give four levels and a model answers".split()


def write_corpus(path: Path, docs: int = 60, words: int = 60) -> Path:
    """A seeded random-word corpus (documents separated by blank lines)."""
    gen = torch.Generator().manual_seed(0)
    texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (words,), generator=gen).tolist()) for _ in range(docs)]
    path.write_text("\n\n".join(texts))
    return path


def write_int4(model_dir: Path, out: Path) -> Path:
    """An INT4 SEQ per-channel RTN checkpoint of the tiny model (a stand-in for the stage-1 output)."""
    model, tokenizer = load_model(str(model_dir))
    rtn_quantize(model, GridSpec("seq", 4, None))
    save_quantized(model, out, tokenizer, method="rtn", extra={"source_model": str(model_dir)})
    return out


def tiny_config(int4_dir: Path, corpus: Path, **overrides) -> DistillConfig:
    """A fast config: progressive INT2 student, gJSD, 32-token sequences, fp32 (the same numbers on
    every CPU: ``auto`` precision would mean bf16 on CPUs with native bf16 and fp32 elsewhere)."""
    data = overrides.pop("data", None) or DataConfig(kind="text", text_source=str(corpus), seq_len=32, heldout_samples=4)
    base = dict(student_init="progressive", int4_dir=str(int4_dir), data=data, steps=8, batch_size=2,
                lr_weight=1e-3, lr_scale=1e-2, log_every=2, save_every=2, cpu=True, mixed_precision="no",
                teacher_dtype="float32")
    return DistillConfig(**(base | overrides))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run torch single-threaded: tiny-model steps are far faster (and steadier) on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
