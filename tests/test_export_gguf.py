"""GGUF export: metadata, tokenizer, type choice per grid, exact re-encoding, Q/K permutation, errors."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import build_tiny_tokenizer

import upq
from upq.checkpoint import save_quantized
from upq.cli import main
from upq.export_gguf import (
    GGUFExportError,
    choose_type,
    dequantize_tensor,
    export_gguf,
    rotary_row_order,
)
from upq.grids import GridSpec

FP16_REL = 2.0**-11  # fp16 rounding, relative


def _tiny_llama(hidden: int, intermediate: int, tie: bool = False, seed: int = 0):
    """A seeded 2-layer Llama with the tiny tokenizer; widths chosen by the test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=tie,
    )
    config.rope_parameters = {"rope_type": "default", "rope_theta": 50000.0}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # distinct norm weights so a mix-up of norms would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model, tokenizer


def _checkpoint(tmp_path: Path, spec: GridSpec, hidden: int = 256, intermediate: int = 512, tie: bool = False) -> Path:
    from upq.ptq.rtn import rtn_quantize

    model, tokenizer = _tiny_llama(hidden, intermediate, tie)
    rtn_quantize(model, spec)
    return save_quantized(model, tmp_path / f"ckpt-{spec.describe()}", tokenizer, dense_dtype=None)


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def _upq_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """upq's own float32 weights (dequantized linears) keyed by transformers name."""
    model = upq.load(ckpt)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, upq.modules.PackedLinear):
            out[f"{name}.weight"] = module.dequantize()
    packed = {name.rpartition(".")[0] for name in out}
    for name, tensor in model.state_dict().items():
        if name.rpartition(".")[0] not in packed:
            out[name] = tensor.float()
    return out


def _gguf_name(hf: str) -> str:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2).get_name(hf, try_suffixes=(".weight",))


@pytest.mark.parametrize(
    ("spec", "hidden", "expected"),
    [
        (GridSpec("seq", 2), 256, "Q2_K"),
        (GridSpec("asym", 2), 256, "Q2_K"),
        (GridSpec("seq", 2, 64), 256, "Q4_1"),
        (GridSpec("seq", 2), 96, "Q4_1"),
        (GridSpec("seq", 4), 256, "Q4_1"),
        (GridSpec("asym", 4, 32), 256, "Q4_1"),
        (GridSpec("r2q", 2, 32), 256, "F16"),
        (GridSpec("seq", 2, 16), 256, "F16"),
    ],
    ids=lambda v: v.describe() if isinstance(v, GridSpec) else str(v),
)
def test_gguf_tensors_equal_upq_weights(tmp_path: Path, spec: GridSpec, hidden: int, expected: str) -> None:
    ckpt = _checkpoint(tmp_path, spec, hidden=hidden, intermediate=2 * hidden)
    out = tmp_path / "model.gguf"
    report = export_gguf(ckpt, out, dense_type="float32")
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    config = json.loads((ckpt / "config.json").read_text())
    weights = _upq_weights(ckpt)
    assert len(tensors) == 2 * 9 + 3  # 7 linears + 2 norms per block, embedding, final norm, output
    for hf_name, reference in weights.items():
        name = _gguf_name(hf_name)
        tensor = tensors[name]
        if "q_proj" in hf_name or "k_proj" in hf_name:
            heads = config["num_attention_heads"] if "q_proj" in hf_name else config["num_key_value_heads"]
            reference = reference[rotary_row_order(reference.shape[0], heads)]
        got = torch.from_numpy(dequantize_tensor(tensor).copy())
        assert got.shape == reference.shape, name
        if hf_name.rpartition(".")[0] in config["quantization_config"]["modules"]:
            assert tensor.tensor_type.name == expected, name
            tol = FP16_REL * float(reference.abs().max())
        else:
            assert tensor.tensor_type.name == "F32", name
            tol = 0.0
        assert torch.allclose(got, reference, rtol=0, atol=tol), (name, float((got - reference).abs().max()))
    by_name = {t.name: t for t in report.tensors}
    assert by_name["blk.0.attn_q.weight"].gguf_type == expected
    assert report.max_abs_error <= FP16_REL * max(t.max_abs_weight for t in report.tensors)
    if expected == "F16":
        assert report.notes and all(t.note for t in report.tensors if t.grid)


@pytest.mark.parametrize("spec", [GridSpec("seq", 2), GridSpec("seq", 2, 64), GridSpec("seq", 3, 32)],
                         ids=lambda s: s.describe())
def test_two_and_three_bit_seq_are_bit_exact(tmp_path: Path, spec: GridSpec) -> None:
    report = export_gguf(_checkpoint(tmp_path, spec), tmp_path / "m.gguf")
    assert all(t.max_abs_error == 0.0 for t in report.tensors if t.grid), report.table()


def test_metadata_and_tokenizer(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, GridSpec("seq", 2))
    out = tmp_path / "model.gguf"
    report = export_gguf(ckpt, out)
    reader = gguf.GGUFReader(out)
    tokenizer = build_tiny_tokenizer()
    assert _field(reader, "general.architecture") == "llama"
    expected = {
        "llama.context_length": 512, "llama.embedding_length": 256, "llama.block_count": 2,
        "llama.feed_forward_length": 512, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 64, "llama.vocab_size": len(tokenizer),
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q2_K),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 2, "tokenizer.chat_template": tokenizer.chat_template,
    }
    for key, value in expected.items():
        assert _field(reader, key) == value, key
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(50000.0)
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = tokenizer.get_vocab()
    assert len(tokens) == len(vocab) and all(vocab[t] == i for i, t in enumerate(tokens))
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[:3] == [int(gguf.TokenType.CONTROL)] * 3 and set(types[3:]) == {int(gguf.TokenType.NORMAL)}
    merges = _field(reader, "tokenizer.ggml.merges")
    assert len(merges) == len(json.loads((ckpt / "tokenizer.json").read_text())["model"]["merges"]) > 0
    assert report.file_type == "Q2_K" and report.tokenizer_pre == "default"


def test_transformers_reads_the_file_and_matches_upq_logits(tmp_path: Path) -> None:
    """End to end: transformers' GGUF loader un-permutes q/k; logits must equal upq's model."""
    from transformers import AutoModelForCausalLM

    ckpt = _checkpoint(tmp_path, GridSpec("seq", 2, 64))
    export_gguf(ckpt, tmp_path / "m.gguf", dense_type="float32")
    ggml = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ours = upq.load(ckpt)
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ggml(ids).logits - ours(ids).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_tied_lm_head_is_not_written(tmp_path: Path) -> None:
    report = export_gguf(_checkpoint(tmp_path, GridSpec("seq", 2), tie=True), tmp_path / "m.gguf")
    names = {t.name for t in report.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    assert {t.name: t.gguf_type for t in report.tensors}["token_embd.weight"] == "F16"
    assert any("tied" in n for n in report.notes)


def test_choose_type_rules() -> None:
    assert choose_type(GridSpec("seq", 2), 512)[0].name == "Q2_K"
    assert choose_type(GridSpec("seq", 2), 576)[0].name == "Q4_1"  # SmolLM2 rows: 18 blocks of 32
    assert choose_type(GridSpec("seq", 2, 256), 768)[0].name == "Q2_K"
    assert choose_type(GridSpec("asym", 3, 64), 576)[0].name == "Q4_1"
    assert choose_type(GridSpec("seq", 2), 48)[0].name == "F16"
    assert choose_type(GridSpec("asym", 8, 32), 64)[0].name == "F16"


def test_rotary_row_order_interleaves_halves() -> None:
    assert rotary_row_order(8, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_strict_rejects_unrepresentable_group(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, GridSpec("seq", 2, 16))
    with pytest.raises(GGUFExportError, match="not a multiple of 32"):
        export_gguf(ckpt, tmp_path / "m.gguf", strict=True)
    assert not list(tmp_path.glob("*.gguf*")), "a failed export must leave no file behind"


def test_non_llama_model_is_rejected(tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from upq.ptq.rtn import rtn_quantize

    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = Qwen2ForCausalLM(config).eval()
    rtn_quantize(model, GridSpec("seq", 2))
    ckpt = save_quantized(model, tmp_path / "qwen", tokenizer)
    with pytest.raises(GGUFExportError, match="'qwen2'"):
        export_gguf(ckpt, tmp_path / "m.gguf")


def test_cli_writes_gguf_and_report(tmp_path: Path, capsys) -> None:
    ckpt = _checkpoint(tmp_path, GridSpec("seq", 2), hidden=96, intermediate=192)
    out = tmp_path / "out" / "model.gguf"
    assert main(["export", "--format", "gguf", "--quiet", str(ckpt), str(out)]) == 0
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert report["type_counts"]["Q4_1"] == 14 and report["max_abs_error"] < 1e-3
    assert "blk.1.ffn_down.weight" in capsys.readouterr().out
    assert gguf.GGUFReader(out).tensors
    assert main(["export", "--format", "gguf", "--quiet", "--dtype", "bfloat16", str(ckpt), str(out)]) == 2
    assert np.array_equal(np.sort([p.name for p in out.parent.iterdir()]), ["model.gguf", "model.gguf.report.json"])


def test_plain_llama_directory_exports_dense(tmp_path: Path) -> None:
    """An unquantized model exports dense (llama.cpp's quantizer source); transformers reads it back exactly."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = _tiny_llama(256, 512)
    model.save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    report = export_gguf(tmp_path / "plain", tmp_path / "plain.gguf", dense_type="float32")
    assert {t.gguf_type for t in report.tensors} == {"F32"}
    assert max(t.max_abs_error for t in report.tensors) == 0.0
    ggml = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="plain.gguf", dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ggml(ids).logits - model(ids).logits).abs().max().item()
    assert diff < 1e-4, diff
