"""Save and load packed upq checkpoints.

A checkpoint is a directory: ``model.safetensors`` (packed codes, scales, zero points and every
high-precision tensor), ``config.json`` with a ``quantization_config`` (method, grid, bits, group
size, quantized module names, upq version, the recipe, and a sha256 per weight file), plus the
tokenizer and generation config. Written atomically; loaded by :func:`load`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from . import __version__
from .atomic import atomic_dir
from .grids import GridSpec
from .model_card import write_model_card
from .modules import PackedLinear, _set_submodule, quantized_layer_names

WEIGHTS_NAME = "model.safetensors"
QUANT_METHOD = "upq"
# quantization_config keys that save_quantized derives from the model itself (the rest is provenance)
DERIVED_KEYS = frozenset({"quant_method", "method", "grid", "bits", "group_size", "modules", "modules_not_quantized",
                          "upq_version", "recipe", "files"})


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or corrupt."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    specs = {}
    for name in quantized_layer_names(model):
        layer = model.get_submodule(name)
        if not isinstance(layer, PackedLinear):
            raise TypeError(f"{name} is not packed; call upq.modules.pack_model(model) before saving")
        specs[name] = {"grid": layer.spec.grid, "bits": layer.spec.bits, "group_size": layer.spec.group_size}
    return specs


def _state_dict_for_save(
    model: PreTrainedModel, packed: set[str], dense_dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if dense_dtype is not None:
        for key, tensor in state.items():
            if tensor.is_floating_point() and key.rpartition(".")[0] not in packed:
                state[key] = tensor.to(dense_dtype)
    if getattr(model.config, "tie_word_embeddings", False):
        out_emb = model.get_output_embeddings()
        in_emb = model.get_input_embeddings()
        if out_emb is not None and in_emb is not None and getattr(out_emb, "weight", None) is in_emb.weight:
            for name, module in model.named_modules():
                if module is out_emb:
                    state.pop(f"{name}.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_quantized(
    model: PreTrainedModel,
    out_dir: str | Path,
    tokenizer: Any = None,
    method: str = "rtn",
    recipe: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    dense_dtype: torch.dtype | None = torch.bfloat16,
) -> Path:
    """Write a packed model (all quantized layers must be ``PackedLinear``) to ``out_dir`` atomically.

    Tensors that are not quantized (embeddings, norms, ``lm_head``) are stored as ``dense_dtype``
    (``None`` keeps the model's own dtype, which makes a reload bit-identical).
    """
    layers = _layer_specs(model)
    if not layers:
        raise ValueError("the model has no packed layers; nothing quantized to save")
    # the top-level grid / bits / group size are those of most layers (an INT4 lm_head beside INT2
    # decoder layers still reads "2-bit"); ``modules`` holds every layer's own
    counts = Counter(json.dumps(v, sort_keys=True) for v in layers.values())
    summary = json.loads(counts.most_common(1)[0][0])
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(_state_dict_for_save(model, set(layers), dense_dtype), tmp / WEIGHTS_NAME, metadata={"format": "pt", "producer": f"upq {__version__}"})
        quant_config = {
            "quant_method": QUANT_METHOD,
            "method": method,
            **summary,
            "modules": layers,
            "modules_not_quantized": sorted(
                n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers
            ),
            "upq_version": __version__,
            "recipe": recipe or {},
            "files": {WEIGHTS_NAME: sha256_file(tmp / WEIGHTS_NAME)},
            **(extra or {}),
        }
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["quantization_config"] = quant_config
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_model_card(tmp)
    return out_dir


def provenance(quant_config: dict[str, Any]) -> dict[str, Any]:
    """The recorded fields of a ``quantization_config`` that are not derived from the model (source model, stages, ...)."""
    return {k: v for k, v in quant_config.items() if k not in DERIVED_KEYS}


def read_quantization_config(path: str | Path) -> dict[str, Any] | None:
    """The ``quantization_config`` of a upq checkpoint directory, or ``None`` for other models."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    qc = config.get("quantization_config")
    return qc if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD else None


def materialize_meta_buffers(model: nn.Module) -> None:
    """Rebuild non-persistent buffers (e.g. rotary inverse frequencies) left on the meta device."""
    for name, module in model.named_modules():
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        try:
            fresh = type(module)(config=model.config)
        except TypeError as exc:
            raise CheckpointError(f"cannot rebuild buffers of {name} ({type(module).__name__})") from exc
        for buffer_name, buffer in fresh.named_buffers(recurse=False):
            setattr(module, buffer_name, buffer)
            if hasattr(fresh, f"original_{buffer_name}"):
                setattr(module, f"original_{buffer_name}", getattr(fresh, f"original_{buffer_name}"))


def install_packed_skeletons(model: nn.Module, modules: dict[str, dict[str, Any]]) -> None:
    """Replace the named linears by empty (meta) ``PackedLinear`` layers of the recorded grids."""
    for name, spec in modules.items():
        linear = model.get_submodule(name)
        if isinstance(linear, PackedLinear):
            continue
        grid = GridSpec(spec["grid"], spec["bits"], spec["group_size"])
        packed = PackedLinear(linear.in_features, linear.out_features, grid, linear.bias is not None, device="meta")
        _set_submodule(model, name, packed)


def meta_model(config: Any, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """An empty (meta-device) causal LM of ``config``, with any foreign quantization config dropped."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, verify: bool = True
) -> PreTrainedModel:
    """Load a upq checkpoint directory into a working transformers model with ``PackedLinear`` layers."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    qc = read_quantization_config(path)
    if qc is None:
        raise CheckpointError(f"{path} is not a upq checkpoint (config.json has no upq quantization_config)")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{path} is missing {WEIGHTS_NAME}")
    if verify:
        expected = qc.get("files", {}).get(WEIGHTS_NAME)
        actual = sha256_file(weights)
        if expected != actual:
            raise CheckpointError(
                f"{weights} is corrupt: sha256 {actual[:12]}... does not match the recorded {str(expected)[:12]}..."
            )
    config = AutoConfig.from_pretrained(path)
    model = meta_model(config, dtype)
    install_packed_skeletons(model, qc["modules"])
    try:
        state = load_file(weights)
    except Exception as exc:  # safetensors raises its own error types on truncated files
        raise CheckpointError(f"cannot read {weights}: {exc}") from exc
    for key, tensor in state.items():
        if not (key.endswith((".qweight", ".zero"))) and tensor.is_floating_point() and not key.endswith(".scale"):
            state[key] = tensor.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if getattr(config, "tie_word_embeddings", False) and k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"checkpoint does not match the model: missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    materialize_meta_buffers(model)
    model.upq_config = qc
    return model.to(device).eval()


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer stored in a checkpoint directory."""
    return AutoTokenizer.from_pretrained(path)
