"""upq.lm_eval_adapter: lm-eval's HFLM really runs our packed model; a clear error without lm-eval."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import upq
from upq.checkpoint import save_quantized
from upq.grids import GridSpec
from upq.lm_eval_adapter import hflm
from upq.modules import PackedLinear
from upq.ptq.rtn import rtn_quantize

# (context, continuation): different lengths, so a batch of two needs padding inside HFLM
REQUESTS = [
    ("What is two plus two? Two plus two is", " four."),
    ("Please list three fruits:", " apple, banana, cherry."),
]


def _direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log p(continuation token | prefix) from one forward pass of ``model``, greedy flag."""
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    assert whole[: len(ctx)] == ctx and len(whole) > len(ctx)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    targets = torch.tensor(whole[len(ctx):])
    rows = logprobs[len(ctx) - 1 : len(whole) - 1]
    total = rows.gather(1, targets[:, None]).sum().item()
    greedy = bool((rows.argmax(-1) == targets).all())
    return total, greedy


@pytest.fixture(scope="module")
def packed_ckpt(tiny_model_dir, tmp_path_factory) -> Path:
    from upq.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    rtn_quantize(model, GridSpec("seq", 2))
    return save_quantized(model, tmp_path_factory.mktemp("lmeval") / "ckpt", tokenizer)


def test_hflm_loglikelihood_matches_our_packed_model(packed_ckpt: Path, tiny_model_dir: Path) -> None:
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    lm = hflm(packed_ckpt, batch_size=2, device="cpu")
    assert any(isinstance(m, PackedLinear) for m in lm.model.modules()), "HFLM is not running the packed model"

    instances = [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(REQUESTS)
    ]
    got = lm.loglikelihood(instances, disable_tqdm=True)

    ours = upq.load(packed_ckpt)
    from upq.models import load_model

    dense, tokenizer = load_model(str(tiny_model_dir))
    for (context, continuation), (ll, greedy) in zip(REQUESTS, got):
        want, want_greedy = _direct_loglikelihood(ours, tokenizer, context, continuation)
        assert ll == pytest.approx(want, abs=1e-4), (context, ll, want)
        assert greedy == want_greedy
        # the 2-bit model scores differently from the dense original, so the match above is not vacuous
        dense_ll, _ = _direct_loglikelihood(dense, tokenizer, context, continuation)
        assert abs(dense_ll - want) > 1e-2, (context, dense_ll, want)


def test_hflm_accepts_a_loaded_model_object(packed_ckpt: Path) -> None:
    pytest.importorskip("lm_eval")
    from upq.loading import load_any

    model, tokenizer = load_any(packed_ckpt)
    with pytest.raises(ValueError, match="tokenizer"):
        hflm(model)
    lm = hflm(model, tokenizer=tokenizer, batch_size=1)
    assert lm.model is model and lm.tokenizer is tokenizer


def test_clear_error_when_lm_eval_is_missing(monkeypatch, packed_ckpt: Path) -> None:
    # None in sys.modules makes ``import lm_eval...`` raise ImportError, installed or not
    for name in ("lm_eval", "lm_eval.models", "lm_eval.models.huggingface"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r'pip install "lm-eval>=0\.4\.13,<0\.5"') as info:
        hflm(packed_ckpt)
    assert "lm-evaluation-harness" in str(info.value) and 'pip install -e ".[lm-eval]"' in str(info.value)


DEMO_TASK = """task: upq_demo
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
DEMO_ROWS = [
    '{"question": "What is two plus two?", "choices": ["three", "four", "five"], "answer": 1}',
    '{"question": "Which of these is a fruit?", "choices": ["apple", "chair", "river"], "answer": 0}',
    '{"question": "How many legs does a dog have?", "choices": ["two", "six", "four"], "answer": 2}',
]


def _demo_task(tmp_path: Path) -> Path:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "upq_demo.jsonl").write_text("\n".join(DEMO_ROWS) + "\n")
    (tasks / "upq_demo.yaml").write_text(DEMO_TASK.format(data=tasks / "upq_demo.jsonl"))
    return tasks


def test_upq_lm_eval_command_and_lm_evals_own_hf_loader_agree(packed_ckpt: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from upq.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = _demo_task(tmp_path)
    assert main(["lm-eval", str(packed_ckpt), "--tasks", "upq_demo", "--include-path", str(tasks),
                 "--out", str(tmp_path / "r.json")]) == 0
    assert "|upq_demo|" in capsys.readouterr().out
    ours = json.loads((tmp_path / "r.json").read_text())["results"]["upq_demo"]["acc,none"]
    # lm-eval's own "hf" model calls from_pretrained on the directory: works because upq is imported
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={packed_ckpt},dtype=float32", tasks=["upq_demo"],
                             device="cpu", task_manager=TaskManager(include_path=str(tasks)))
    assert theirs["results"]["upq_demo"]["acc,none"] == ours


def test_upq_lm_eval_without_lm_eval_is_one_line(packed_ckpt: Path, monkeypatch, capsys) -> None:
    from upq.cli import main

    for name in ("lm_eval", "lm_eval.models", "lm_eval.models.huggingface"):
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["lm-eval", str(packed_ckpt), "--tasks", "hellaswag"]) == 2
    assert "pip install" in capsys.readouterr().err
