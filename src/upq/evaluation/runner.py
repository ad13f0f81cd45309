"""``upq eval``: run the chosen tasks on one model against its reference and collect one result."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..assets import cache_dir
from ..checkpoint import WEIGHTS_NAME, read_quantization_config
from ..data.prompts import load_prompts
from ..data.text import load_texts
from ..loading import is_upq_checkpoint, load_any, source_model_of
from ..logs import get_logger, progress_enabled
from .agreement import build_reference, kl_and_agreement
from .perplexity import perplexity

TASKS = ("ppl", "kl", "mmlu", "ifeval")
log = get_logger("eval")


@dataclass
class EvalSettings:
    """Every knob of an evaluation run; written into the result for provenance."""

    tasks: tuple[str, ...] = ("ppl", "kl")
    ppl_source: str = "wiki"
    ppl_seq_len: int = 512
    ppl_max_tokens: int | None = 32768
    kl_prompts: int = 32
    kl_max_new_tokens: int = 128
    mmlu_shots: int = 5
    limit: int | None = None
    ifeval_max_new_tokens: int = 1280
    gen_batch_size: int = 64
    batch_size: int = 8
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")


def checkpoint_size(path: str | Path | None) -> dict[str, Any] | None:
    """Bytes on disk of a local model directory's weight files (None for hub ids)."""
    if path is None or not Path(path).is_dir():
        return None
    files = [p for p in Path(path).iterdir() if p.suffix in {".safetensors", ".bin"}]
    return {"weights_bytes": sum(p.stat().st_size for p in files)}


def machine() -> dict[str, Any]:
    """The machine a result was measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def evaluate(model_name: str | None, reference: str | None = None, settings: EvalSettings | None = None,
             device: str = "cpu") -> dict[str, Any]:
    """Evaluate ``model_name`` (upq checkpoint, transformers dir, hub id or None = bundled).

    ``reference`` is the original model used for KL / agreement; by default the model a upq
    checkpoint records as its source, else the bundled model.
    """
    settings = settings or EvalSettings()
    dtype = getattr(torch, settings.dtype)
    started = time.perf_counter()
    model, tokenizer = load_any(model_name, dtype=dtype, device=device)
    result: dict[str, Any] = {
        "model": str(model_name) if model_name is not None else "bundled",
        "quantization": _quant_summary(model_name),
        "size": checkpoint_size(model_name),
        "settings": asdict(settings),
        "machine": machine(),
        "metrics": {},
        "timings_s": {},
    }
    if "ppl" in settings.tasks:
        t0 = time.perf_counter()
        texts = load_texts(settings.ppl_source, "heldout")
        result["metrics"]["ppl"] = perplexity(model, tokenizer, texts, seq_len=settings.ppl_seq_len,
                                              max_tokens=settings.ppl_max_tokens, batch_size=max(1, settings.batch_size // 2))
        result["timings_s"]["ppl"] = round(time.perf_counter() - t0, 2)
        log.info("ppl %.3f on %d held-out tokens", result["metrics"]["ppl"]["ppl"], result["metrics"]["ppl"]["tokens"])
    if "kl" in settings.tasks:
        t0 = time.perf_counter()
        reference = reference if reference is not None else source_model_of(model_name) if is_upq_checkpoint(model_name) else None
        result["reference"] = reference or "bundled"
        teacher = model if _same_model(model_name, reference) else load_any(reference, dtype=dtype, device=device)[0]
        ref = build_reference(teacher, tokenizer, load_prompts("eval")[: settings.kl_prompts],
                              max_new_tokens=settings.kl_max_new_tokens, batch_size=settings.gen_batch_size,
                              cache_dir=cache_dir() / "references", progress=progress_enabled())
        result["metrics"]["kl"] = kl_and_agreement(model, teacher, ref, batch_size=max(1, settings.batch_size // 2))
        result["timings_s"]["kl"] = round(time.perf_counter() - t0, 2)
        del teacher
        log.info("KL(ref||model) %.4f, top-1 agreement %.3f on %d response tokens",
                 result["metrics"]["kl"]["kl"], result["metrics"]["kl"]["top1_agreement"], result["metrics"]["kl"]["tokens"])
    if "mmlu" in settings.tasks:
        from .mmlu import run_mmlu

        t0 = time.perf_counter()
        result["metrics"]["mmlu"] = run_mmlu(model, tokenizer, shots=settings.mmlu_shots, limit=settings.limit,
                                             batch_size=settings.batch_size)
        result["timings_s"]["mmlu"] = round(time.perf_counter() - t0, 2)
    if "ifeval" in settings.tasks:
        from .ifeval import run_ifeval

        t0 = time.perf_counter()
        result["metrics"]["ifeval"] = run_ifeval(model, tokenizer, limit=settings.limit,
                                                 max_new_tokens=settings.ifeval_max_new_tokens,
                                                 batch_size=settings.gen_batch_size)
        result["timings_s"]["ifeval"] = round(time.perf_counter() - t0, 2)
    result["timings_s"]["total"] = round(time.perf_counter() - started, 2)
    return result


def _same_model(model_name: str | None, reference: str | None) -> bool:
    return (model_name is None and reference is None) or (model_name is not None and str(model_name) == str(reference))


def _quant_summary(model_name: str | None) -> dict[str, Any] | None:
    qc = read_quantization_config(model_name) if model_name is not None and Path(model_name).is_dir() else None
    if qc is None:
        return None
    return {k: qc.get(k) for k in ("method", "grid", "bits", "group_size", "source_model", "upq_version")} | {
        "weights_file": WEIGHTS_NAME, "layers": len(qc.get("modules", {}))}


def headline(result: dict[str, Any]) -> str:
    """One readable line: model, ppl, KL, agreement and the other task scores present."""
    m = result["metrics"]
    parts = [f"{result['model']}"]
    if "ppl" in m:
        parts.append(f"ppl={m['ppl']['ppl']:.3f}")
    if "kl" in m:
        parts.append(f"kl={m['kl']['kl']:.4f} top1={m['kl']['top1_agreement']:.3f}")
    if "mmlu" in m:
        parts.append(f"mmlu={m['mmlu'].get('micro_acc', m['mmlu'].get('accuracy', float('nan'))):.3f}")
    if "ifeval" in m:
        parts.append(f"ifeval_prompt_strict={m['ifeval'].get('prompt_level_strict', float('nan')):.3f}")
    if result.get("size"):
        parts.append(f"weights={result['size']['weights_bytes'] / 2**20:.1f}MiB")
    parts.append(f"({result['timings_s']['total']:.0f}s)")
    return " ".join(parts)
