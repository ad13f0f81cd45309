"""Perplexity, KL / agreement against a reference, and report helpers."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import upq.evaluation.agreement as agreement
from upq.data.text import pack_token_ids
from upq.evaluation.agreement import (
    Reference,
    build_reference,
    compare_to_reference,
    kl_and_agreement,
    model_fingerprint,
)
from upq.evaluation.perplexity import perplexity
from upq.evaluation.report import compare_table, markdown_header, write_json_atomic

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps weights to a few levels; two bits give four levels.",
    "Wikipedia articles describe history, science, art and people.",
]
PROMPTS = ["hi", "What is two plus two?", "list three fruits", "Write a poem.", "ok"]


def test_perplexity_single_window_matches_model_loss(tiny_model):
    model, tok = tiny_model
    ids = pack_token_ids(TEXTS, tok)
    res = perplexity(model, tok, TEXTS, seq_len=ids.numel() + 10)
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss.item()
    assert res["tokens"] == ids.numel() - 1 and res["windows"] == 1
    assert res["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert res["nll"] == pytest.approx(loss, rel=1e-5)


def test_perplexity_windows_are_token_weighted(tiny_model):
    model, tok = tiny_model
    ids = pack_token_ids(TEXTS, tok)
    seq_len = 16
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel(), seq_len):
            w = ids[start : start + seq_len]
            if w.numel() < 2:
                continue
            total += model(input_ids=w[None], labels=w[None]).loss.item() * (w.numel() - 1)
            count += w.numel() - 1
    res = perplexity(model, tok, TEXTS, seq_len=seq_len, batch_size=3)
    assert res["tokens"] == count
    assert res["nll"] == pytest.approx(total / count, rel=1e-5)
    capped = perplexity(model, tok, TEXTS, seq_len=seq_len, max_tokens=40)
    assert capped["tokens"] == 40 - math.ceil(40 / seq_len)


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("refs")


@pytest.fixture(scope="module")
def reference(tiny_model_dir, ref_cache):
    from upq.models import load_model

    model, tok = load_model(str(tiny_model_dir))
    return build_reference(model, tok, PROMPTS, max_new_tokens=8, batch_size=2,
                           cache_dir=ref_cache, progress=False)


def test_kl_against_itself_is_zero(tiny_model, reference):
    model, _ = tiny_model
    res = kl_and_agreement(model, model, reference, batch_size=2)
    assert res["tokens"] == reference.tokens == sum(len(r) for r in reference.response_ids)
    assert abs(res["kl"]) < 1e-6
    assert res["top1_agreement"] == 1.0
    assert res["ref_agreement"] > 0.95  # greedy tokens are the argmax (up to float ties)


def test_kl_against_perturbed_copy_is_positive(tiny_model, reference):
    model, _ = tiny_model
    student = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    res = kl_and_agreement(student, model, reference, batch_size=3, chunk_tokens=5)
    assert res["kl"] > 1e-4
    assert 0.0 <= res["top1_agreement"] <= 1.0
    # chunking and batching do not change the result
    again = kl_and_agreement(student, model, reference, batch_size=1, chunk_tokens=1000)
    assert again["kl"] == pytest.approx(res["kl"], rel=1e-4)
    assert again["top1_agreement"] == res["top1_agreement"]
    solo = compare_to_reference(student, reference)
    assert solo["kl"] is None and solo["ref_agreement"] == pytest.approx(res["ref_agreement"])


def test_kl_matches_direct_float64(tiny_model, reference):
    model, _ = tiny_model
    student = copy.deepcopy(model)
    with torch.no_grad():
        student.lm_head.weight.mul_(1.7)
    res = kl_and_agreement(student, model, reference)
    total, uniform, n = 0.0, 0.0, 0
    with torch.no_grad():
        for p, r in zip(reference.prompt_ids, reference.response_ids):
            ids = torch.tensor([p + r])
            pos = slice(len(p) - 1, len(p) + len(r) - 1)
            lt = torch.log_softmax(model(ids).logits[0, pos].double(), -1)
            ls = torch.log_softmax(student(ids).logits[0, pos].double(), -1)
            total += (lt.exp() * (lt - ls)).sum().item()
            flat = torch.full_like(lt, -torch.log(torch.tensor(lt.shape[-1], dtype=torch.float64)).item())
            uniform += (lt.exp() * (lt - flat)).sum().item()  # KL(teacher || uniform guess)
            n += len(r)
    assert res["kl"] == pytest.approx(total / n, rel=1e-3)
    assert res["uniform_kl"] == pytest.approx(uniform / n, rel=1e-3)


def test_reference_cache_roundtrip(tiny_model, reference, ref_cache, monkeypatch):
    model, tok = tiny_model
    files = list(ref_cache.glob("reference-*.json"))
    assert len(files) == 1
    assert Reference.from_json(files[0]) == reference

    def boom(*a, **k):
        raise AssertionError("should have used the cache")

    monkeypatch.setattr(agreement, "generate_ids", boom)
    again = build_reference(model, tok, PROMPTS, max_new_tokens=8, cache_dir=ref_cache,
                            progress=False)
    assert again == reference
    # other settings or other weights -> another key
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight[0, 0] += 1.0
    assert model_fingerprint(other) != model_fingerprint(model)
    with pytest.raises(AssertionError, match="cache"):
        build_reference(model, tok, PROMPTS, max_new_tokens=9, cache_dir=ref_cache,
                        progress=False)


def test_report_helpers(tmp_path):
    result = {"name": "rtn-w2", "ppl": 12.3456, "agreement": {"kl": 0.01234, "tokens": 500},
              "mmlu": None}
    path = write_json_atomic(tmp_path / "sub" / "r.json", result)
    assert json.loads(path.read_text()) == result
    assert not [p for p in path.parent.iterdir() if p.name != "r.json"]  # no temp left behind
    assert markdown_header(["name", "ppl"]) == "| name | ppl |\n|---|---|"
    quantized = {"model": "out/q", "quantization": {"method": "upq", "bits": 2}, "size": {"weights_bytes": 3 * 2**20},
                 "metrics": {"ppl": {"ppl": 96.41}, "kl": {"kl": 1.44213, "top1_agreement": 0.512}}}
    table = compare_table([{"model": "bundled", "metrics": {"ppl": {"ppl": 23.13}}}, quantized]).splitlines()
    assert table[0] == "| model | method | bits | ppl | KL | top-1 | MMLU | IFEval (prompt strict) | weights MiB |"
    assert table[2] == "| bundled | fp | 16/32 | 23.13 | - | - | - | - | - |"
    assert table[3] == "| out/q | upq | 2 | 96.41 | 1.442 | 0.512 | - | - | 3 |"
