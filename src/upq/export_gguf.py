"""Export a upq checkpoint to a GGUF file for llama.cpp (architecture ``llama``).

Quantized linears are re-encoded into GGML block formats that hold upq's grids exactly where
they can (up to the fp16 rounding of the block scale/offset):

* **Q2_K** (super-blocks of 256: fp16 ``d``, ``dmin``; sixteen 4-bit sub-block scales ``sc`` and
  mins ``m``; value ``d*sc*q - dmin*m`` with ``q`` in 0..3) for 2-bit SEQ / asym grids whose groups
  are whole multiples of 256 weights (per-channel rows of 256, 512, ...). One scale per
  super-block, so every sub-block uses the same ``sc`` / ``m``:
  SEQ ``step*(q - 1.5)`` -> ``sc=2, m=3, d=dmin=step/2``; asym ``s*(q - z)`` -> ``sc=1, m=z, d=dmin=s``.
* **Q4_1** (blocks of 32: fp16 ``d``, ``m``; value ``d*q + m`` with ``q`` in 0..15) for 2/3/4-bit SEQ and
  asym grids whose groups are multiples of 32: SEQ ``d=step, m=-(n-1/2)*step``; asym ``d=s, m=-z*s``;
  each block may re-code ``q = a*code + c`` so that ``m`` is exact in fp16 (2/3-bit SEQ: ``d=step/2,
  q=2*code+1, m=-Delta``), which makes 2/3-bit grids bit-exact and leaves 4-bit within fp16 rounding of ``m``.
* **F16** otherwise (R2Q's levels ``+-a1 +- a2`` are not an affine lattice; groups that are not a
  multiple of 32; 8-bit asym), noted in the report, or an error with ``strict=True``.

q_proj / k_proj rows are permuted into llama.cpp's rotary layout (as its HF converter does);
codes, scales and zero points move with their rows. The file is read back with
``gguf.GGUFReader`` and every tensor is dequantized with ``gguf.quants`` and compared with upq's
own dequantized weight; the per-tensor maximum error is returned as a :class:`GGUFReport`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from .grids import GridSpec, QuantizedWeight, decode
from .modules import PackedLinear

ARCH = "llama"
QK_K = gguf.QK_K  # 256 weights per K-quant super-block
QK4_1 = gguf.GGML_QUANT_SIZES[QT.Q4_1][0]  # 32 weights per Q4_1 block
_FILE_TYPES = {QT.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K, QT.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
               QT.F16: gguf.LlamaFileType.MOSTLY_F16, QT.F32: gguf.LlamaFileType.ALL_F32}
_DENSE_DTYPES = {"float16": QT.F16, "float32": QT.F32}


class GGUFExportError(ValueError):
    """The checkpoint cannot be exported to GGUF as asked (architecture, grid, group size...)."""


@dataclass
class TensorReport:
    """One written tensor: GGUF name, type, shape (rows, cols as in transformers) and the max abs
    difference between the GGUF-dequantized tensor and upq's own dequantized (or dense) weight."""

    name: str
    source: str
    gguf_type: str
    shape: list[int]
    grid: str | None
    max_abs_error: float
    max_abs_weight: float
    note: str = ""


@dataclass
class GGUFReport:
    """Everything :func:`export_gguf` wrote and how faithful it is."""

    path: str
    architecture: str
    file_type: str
    tokenizer_pre: str
    tensors: list[TensorReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def max_abs_error(self) -> float:
        """Largest per-tensor error over all tensors."""
        return max((t.max_abs_error for t in self.tensors), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (with the overall maximum error and a count per GGUF type)."""
        data = asdict(self)
        data["max_abs_error"] = self.max_abs_error
        data["type_counts"] = dict(Counter(t.gguf_type for t in self.tensors))
        return data

    def table(self) -> str:
        """Plain-text summary table, one line per tensor."""
        lines = [f"{'tensor':32s} {'type':5s} {'shape':>13s} {'grid':16s} {'max|err|':>9s} {'max|w|':>8s}  note"]
        for t in self.tensors:
            shape = "x".join(str(s) for s in t.shape)
            lines.append(f"{t.name:32s} {t.gguf_type:5s} {shape:>13s} {t.grid or '-':16s} "
                         f"{t.max_abs_error:9.2e} {t.max_abs_weight:8.3g}  {t.note}")
        counts = ", ".join(f"{k}: {v}" for k, v in Counter(t.gguf_type for t in self.tensors).items())
        lines.append(f"{len(self.tensors)} tensors ({counts}); file type {self.file_type}; "
                     f"max abs error {self.max_abs_error:.3g}")
        return "\n".join(lines)


# ---------------------------------------------------------------- type choice and block encoders


def choose_type(spec: GridSpec, in_features: int) -> tuple[QT, str]:
    """The GGML type that holds ``spec``'s grid exactly on rows of ``in_features``, and a note.

    Returns ``(F16, reason)`` when no supported block type holds it exactly.
    """
    group = spec.group_len(in_features)
    if not spec.impl.is_affine:
        return QT.F16, f"{spec.grid} levels are not an affine grid; stored dequantized as F16"
    if spec.bits == 2 and group % QK_K == 0:
        return QT.Q2_K, ""
    if spec.bits <= 4 and group % QK4_1 == 0:
        return QT.Q4_1, ""
    if spec.bits > 4:
        return QT.F16, f"{spec.bits}-bit {spec.grid} has no exact GGML block type; stored as F16"
    return QT.F16, f"group of {group} weights is not a multiple of {QK4_1} (Q4_1 block); stored as F16"


def _affine_params(q: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, offset) with weight = scale * code + offset, in float32 (the grid's own affine form)."""
    form = q.spec.impl.affine(q)
    if form is None:
        raise GGUFExportError(f"grid {q.spec.grid!r} is not an affine grid")
    return form


def _per_block(values: torch.Tensor, group: int, block: int) -> np.ndarray:
    """Repeat per-group values (rows, groups) to one value per block of ``block`` weights."""
    return values.repeat_interleave(group // block, dim=1).reshape(-1).numpy()


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    """fp16 bytes (n, 2) of float values (n,)."""
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _f16_error(values: np.ndarray) -> np.ndarray:
    """|fp16(v) - v| elementwise, in float64."""
    return np.abs(values.astype(np.float16).astype(np.float64) - values)


def q4_1_blocks(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per 32-weight block, (d, m, q) with ``d*q + m == scale*code + offset`` and the least fp16 rounding.

    Q4_1 codes have 16 values and grids use at most 16, so a block may re-code ``q = a*code + c``
    (``a`` in {1, 2}, integer ``c``) while it stays in 0..15, with ``d = scale/a`` and
    ``m = offset - c*d``. Picking the (a, c) whose ``m`` fp16 holds exactly makes 2/3-bit SEQ
    (``m = -Delta``) and most asym blocks (``m = -2^j*s``) bit-exact.
    """
    scale, offset = scale.astype(np.float64), offset.astype(np.float64)
    lo, hi = codes.min(axis=1).astype(np.int64), codes.max(axis=1).astype(np.int64)
    best = np.full(scale.shape, np.inf)
    chosen_a, chosen_c = np.ones(scale.shape, np.int64), np.zeros(scale.shape, np.int64)
    candidates = [(1, 0)] + [(a, c) for a in (1, 2) for c in range(-15, 16) if (a, c) != (1, 0)]
    for a, c in candidates:
        ok = (a * lo + c >= 0) & (a * hi + c <= 15)
        d = scale / a
        bound = _f16_error(d) * np.maximum(np.abs(a * lo + c), np.abs(a * hi + c)) + _f16_error(offset - c * d)
        better = ok & (bound < best)
        best = np.where(better, bound, best)
        chosen_a, chosen_c = np.where(better, a, chosen_a), np.where(better, c, chosen_c)
    d = scale / chosen_a
    q = codes.astype(np.int64) * chosen_a[:, None] + chosen_c[:, None]
    return d, offset - chosen_c * d, q.astype(np.uint8)


def encode_q4_1(q: QuantizedWeight) -> np.ndarray:
    """Q4_1 bytes (rows, in/32*20) of a SEQ/asym ``QuantizedWeight`` with groups of 32k weights.

    Block layout: fp16 ``d``, fp16 ``m``, 16 bytes where byte ``i`` holds code ``i`` (low nibble)
    and code ``i+16`` (high nibble).
    """
    rows, cols = q.codes.shape
    group = q.spec.group_len(cols)
    scale, offset = _affine_params(q)
    codes = q.codes.numpy().reshape(-1, QK4_1)
    d, m, codes = q4_1_blocks(codes, _per_block(scale, group, QK4_1), _per_block(offset, group, QK4_1))
    halves = codes.reshape(-1, 2, QK4_1 // 2)
    packed = (halves[:, 0, :] | (halves[:, 1, :] << 4)).astype(np.uint8)
    blocks = np.concatenate([_f16_bytes(d), _f16_bytes(m), packed], axis=1)
    return blocks.reshape(rows, -1)


def _q2_k_params(q: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group (d, dmin, sc, m) with d*sc*code - dmin*m equal to the grid's level.

    From the affine form ``scale*code + offset``: where ``-offset/scale`` is an integer (asym's zero
    point), ``d = dmin = scale``, ``sc = 1``; where it is a half-integer (SEQ's ``(2^b - 1)/2``),
    ``d = dmin = scale/2``, ``sc = 2``; ``m`` is the integer that remains.
    """
    scale, offset = _affine_params(q)
    ratio = -offset / scale
    half_steps = torch.round(2 * ratio)
    if not torch.allclose(half_steps, 2 * ratio, atol=1e-3) or (half_steps < 0).any():
        raise GGUFExportError(f"grid {q.spec.grid!r}: offset/scale is not a non-negative (half-)integer; no Q2_K form")
    if bool((half_steps % 2 == 0).all()):
        return scale, scale, torch.ones_like(scale), half_steps / 2
    half = scale / 2
    return half, half, torch.full_like(half, 2), half_steps


def encode_q2_k(q: QuantizedWeight) -> np.ndarray:
    """Q2_K bytes (rows, in/256*84) of a 2-bit SEQ/asym ``QuantizedWeight`` with groups of 256k weights.

    Block layout: 16 bytes of sub-block scales (low nibble ``sc``, high nibble ``m``), 64 bytes of
    codes (code ``e`` of the block sits in byte ``32*(e//128) + e%32`` at bits ``2*((e%128)//32)``),
    then fp16 ``d`` and ``dmin``.
    """
    rows, cols = q.codes.shape
    group = q.spec.group_len(cols)
    d, dmin, sc, m = (_per_block(v, group, QK_K) for v in _q2_k_params(q))
    if m.max(initial=0) > 15:
        raise GGUFExportError("Q2_K sub-block min does not fit in 4 bits")
    nibbles = (sc.astype(np.uint8) | (m.astype(np.uint8) << 4)).reshape(-1, 1)
    scales = np.repeat(nibbles, QK_K // 16, axis=1)
    codes = q.codes.numpy().reshape(-1, 2, 4, 32)  # (block, half, shift, lane)
    packed = np.zeros((codes.shape[0], 2, 32), dtype=np.uint8)
    for shift in range(4):
        packed |= codes[:, :, shift, :] << (2 * shift)
    blocks = np.concatenate([scales, packed.reshape(-1, QK_K // 4), _f16_bytes(d), _f16_bytes(dmin)], axis=1)
    return blocks.reshape(rows, -1)


def encode_linear(q: QuantizedWeight, qtype: QT, weight: torch.Tensor) -> np.ndarray:
    """GGUF tensor data of a quantized linear in ``qtype`` (``weight``: upq's dequantized weight)."""
    if qtype == QT.Q2_K:
        return encode_q2_k(q)
    if qtype == QT.Q4_1:
        return encode_q4_1(q)
    return encode_dense(weight, qtype)


def encode_dense(weight: torch.Tensor, qtype: QT) -> np.ndarray:
    """F16 / F32 data of a dense tensor."""
    dtype = {QT.F16: np.float16, QT.F32: np.float32}[qtype]
    return weight.detach().float().cpu().numpy().astype(dtype)


# ---------------------------------------------------------------- llama layout


def rotary_row_order(rows: int, n_head: int) -> torch.Tensor:
    """Row indices that reorder a q/k projection from HF's rotate-half layout to llama.cpp's.

    Within each head, HF keeps the two rotary halves as rows [0, h/2) and [h/2, h); llama.cpp
    interleaves them (row 2i <- i, row 2i+1 <- h/2 + i), as its HF converter's ``permute`` does.
    """
    if rows % (2 * n_head):
        raise GGUFExportError(f"{rows} rows cannot be split into {n_head} heads of even size")
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def permute_rows(q: QuantizedWeight, order: torch.Tensor) -> QuantizedWeight:
    """``q`` with its rows (codes, scales, zero points) reordered by ``order``."""
    return QuantizedWeight(q.spec, q.codes[order], q.scale[order], None if q.zero is None else q.zero[order])


def rotary_heads(hf_name: str, config: Any) -> int | None:
    """Heads to permute over for a llama q/k projection weight or bias, else ``None``."""
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return config.num_attention_heads
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def check_architecture(checkpoint: str | Path) -> dict[str, Any]:
    """The checkpoint's config.json; raises unless it is a llama model (``LlamaForCausalLM``)."""
    config_path = Path(checkpoint) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no config.json; is it a upq checkpoint?")
    config = json.loads(config_path.read_text())
    model_type = config.get("model_type")
    if model_type != ARCH:
        raise GGUFExportError(
            f"GGUF export supports Llama-architecture models (model_type 'llama') only; {checkpoint} is "
            f"model_type {model_type!r} ({', '.join(config.get('architectures') or ['?'])})"
        )
    return config


def rope_settings(config: Any) -> tuple[float, str]:
    """(rope theta, rope type) from a transformers config (4.x ``rope_theta`` or 5.x ``rope_parameters``)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    return float(theta), str(rope_type)


def head_dim(config: Any) -> int:
    """Attention head width."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_hparams(writer: gguf.GGUFWriter, config: Any) -> None:
    """llama.* hyper-parameters (context, widths, heads, rope, norm eps, vocab size)."""
    theta, rope_type = rope_settings(config)
    if rope_type not in ("default", "linear") or (rope_type == "linear" and not _linear_factor(config)):
        raise GGUFExportError(f"rope type {rope_type!r} is not supported by this exporter (only default/linear)")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(_linear_factor(config))


def _linear_factor(config: Any) -> float | None:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("factor")


# ---------------------------------------------------------------- tokenizer


def guess_tokenizer_pre(source: str | None) -> str:
    """llama.cpp pre-tokenizer name for a source model id: ``smollm`` for SmolLM models, else ``default``."""
    return "smollm" if source and "smollm" in source.lower() else "default"


def token_table(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order and their llama.cpp types; ids the tokenizer lacks become UNUSED pads."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {i for i, tok in added.items() if getattr(tok, "special", False)}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else
                         gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    if len(by_id) > vocab_size:
        raise GGUFExportError(f"tokenizer has {len(by_id)} tokens but the model's vocab_size is {vocab_size}")
    return tokens, [int(t) for t in types]


def write_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, checkpoint: Path, vocab_size: int, pre: str) -> None:
    """gpt2-style BPE vocabulary, merges, special ids and the chat template."""
    tokens, types = token_table(tokenizer, vocab_size)
    merges = gguf.SpecialVocab(checkpoint, load_merges=True, n_vocab=vocab_size).merges
    if not merges:
        raise GGUFExportError(f"{checkpoint} has no BPE merges (tokenizer.json); only gpt2-style BPE is supported")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for tid, add in ((tokenizer.bos_token_id, writer.add_bos_token_id), (tokenizer.eos_token_id, writer.add_eos_token_id),
                     (tokenizer.unk_token_id, writer.add_unk_token_id), (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if tid is not None:
            add(int(tid))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        writer.add_chat_template(template)


# ---------------------------------------------------------------- tensors


@dataclass
class _Pending:
    """A tensor queued for writing, with the float32 reference it must dequantize to."""

    name: str
    source: str
    data: np.ndarray
    qtype: QT
    reference: torch.Tensor
    grid: str | None = None
    note: str = ""


def _tensor_name(name_map: gguf.TensorNameMap, hf_name: str) -> str:
    gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise GGUFExportError(f"no llama GGUF tensor name for {hf_name!r}")
    return gguf_name


def _tied_output(model: Any) -> bool:
    """True when lm_head shares the input embedding (then output.weight is not written)."""
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and getattr(out, "weight", None) is emb.weight


def collect_tensors(model: Any, dense: QT, strict: bool) -> list[_Pending]:
    """Every tensor of the model in GGUF form: packed linears re-encoded, the rest dense."""
    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    pending: list[_Pending] = []
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    tied = _tied_output(model)
    for module_name, layer in packed.items():
        q = layer.quantized()
        hf_name = f"{module_name}.weight"
        heads = rotary_heads(hf_name, config)
        if heads:
            q = permute_rows(q, rotary_row_order(layer.out_features, heads))
        qtype, note = choose_type(q.spec, layer.in_features)
        if note and strict:
            raise GGUFExportError(f"{module_name} ({q.spec.describe()}): {note}")
        reference = decode(q)
        pending.append(_Pending(_tensor_name(name_map, hf_name), hf_name, encode_linear(q, qtype, reference), qtype,
                                reference, q.spec.describe(), note))
    for hf_name, tensor in model.state_dict(keep_vars=False).items():
        module_name = hf_name.rpartition(".")[0]
        if module_name in packed and not hf_name.endswith(".bias"):
            continue
        if tied and module_name == "lm_head":
            continue
        if "rotary_emb" in hf_name:
            continue
        reference = tensor.detach().float().cpu()
        heads = rotary_heads(hf_name, config)
        if heads:
            reference = reference[rotary_row_order(reference.shape[0], heads)]
        qtype = dense if reference.dim() == 2 else QT.F32  # norms and biases stay F32
        pending.append(_Pending(_tensor_name(name_map, hf_name), hf_name, encode_dense(reference, qtype), qtype, reference))
    return pending


def file_type(pending: list[_Pending]) -> QT:
    """The type most quantized linears use (general.file_type); F16 when none is quantized."""
    counts = Counter(p.qtype for p in pending if p.grid is not None)
    return counts.most_common(1)[0][0] if counts else QT.F16


# ---------------------------------------------------------------- writing and verification


def write_gguf(path: Path, model: Any, tokenizer: Any, checkpoint: Path, pending: list[_Pending], pre: str,
               name: str) -> None:
    """Write metadata, tokenizer and tensors to ``path`` (not atomic; see :func:`export_gguf`)."""
    writer = gguf.GGUFWriter(path, ARCH)
    try:
        writer.add_name(name)
        write_hparams(writer, model.config)
        writer.add_file_type(int(_FILE_TYPES[file_type(pending)]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_tokenizer(writer, tokenizer, checkpoint, model.config.vocab_size, pre)
        for p in pending:
            writer.add_tensor(p.name, p.data, raw_dtype=p.qtype if p.data.dtype == np.uint8 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def dequantize_tensor(tensor: Any) -> np.ndarray:
    """float32 (rows, cols) of a tensor read by ``gguf.GGUFReader``."""
    data = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(tuple(int(s) for s in reversed(tensor.shape)))


def verify(path: Path, pending: list[_Pending]) -> list[TensorReport]:
    """Read ``path`` back, dequantize every tensor and compare with its reference."""
    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    reports = []
    for p in pending:
        tensor = by_name.get(p.name)
        if tensor is None:
            raise GGUFExportError(f"{p.name} is missing from the written file")
        if tensor.tensor_type != p.qtype:
            raise GGUFExportError(f"{p.name} was written as {tensor.tensor_type.name}, expected {p.qtype.name}")
        got = torch.from_numpy(dequantize_tensor(tensor).copy()).reshape(p.reference.shape)
        error = float((got - p.reference).abs().max()) if got.numel() else 0.0
        reports.append(TensorReport(p.name, p.source, p.qtype.name, list(p.reference.shape), p.grid, error,
                                    float(p.reference.abs().max()) if p.reference.numel() else 0.0, p.note))
    return reports


def export_gguf(
    checkpoint: str | Path,
    out_path: str | Path,
    dense_type: str = "float16",
    tokenizer_pre: str | None = None,
    strict: bool = False,
) -> GGUFReport:
    """Export a upq checkpoint (Llama architecture) to a llama.cpp GGUF file, atomically.

    A plain (unquantized) transformers Llama directory is exported dense (every tensor in
    ``dense_type``): the source llama.cpp's own quantizer needs for its Q8_0 / Q4_K_M files.
    ``dense_type``: ``float16`` or ``float32`` for embeddings and an untied ``lm_head`` (norms are
    always F32). ``tokenizer_pre``: llama.cpp pre-tokenizer name (default: guessed from the
    recorded source model). ``strict``: raise instead of storing a quantized layer as F16.
    """
    from .checkpoint import read_quantization_config
    from .loading import load_any

    checkpoint, out_path = Path(checkpoint), Path(out_path)
    check_architecture(checkpoint)
    qc = read_quantization_config(checkpoint) or {"source_model": checkpoint.name}
    if dense_type not in _DENSE_DTYPES:
        raise GGUFExportError(f"dense type must be one of {sorted(_DENSE_DTYPES)}, got {dense_type!r}")
    model, tokenizer = load_any(checkpoint)
    pending = collect_tensors(model, _DENSE_DTYPES[dense_type], strict)
    source = qc.get("source_model")
    pre = tokenizer_pre or guess_tokenizer_pre(source)
    notes = [f"{count} tensor(s): {note}" for note, count in Counter(p.note for p in pending if p.note).items()]
    if tokenizer_pre is None and pre == "default":
        notes.append("tokenizer pre-type unknown for this source model: wrote 'default' (set tokenizer_pre)")
    if _tied_output(model):
        notes.append("lm_head is tied to the embedding: output.weight not written (llama.cpp reuses token_embd)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_gguf(tmp, model, tokenizer, checkpoint, pending, pre, name=str(source or checkpoint.name))
        reports = verify(tmp, pending)
        tmp.chmod(0o644)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return GGUFReport(str(out_path), ARCH, file_type(pending).name, pre, reports, notes)
