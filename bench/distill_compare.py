"""UPQ's central comparison on the bundled SmolLM2-135M-Instruct at a fixed token budget.

INT2 SEQ per-channel student, initialised **progressively** (from an INT4 block-wise PTQ
checkpoint) or **directly** (from the FP weights), trained with **gJSD(0.5)** or the
**next-token** loss (NTP) for the same number of tokens. Each model is evaluated with
``upq.evaluation.runner.evaluate`` (tasks ppl, kl): held-out wiki perplexity, KL(original || model)
and top-1 agreement on the original model's greedy answers to the 32 eval chat prompts -- before
training (the INT2 initialisation) and after.

Every stage is cached under ``--work`` (re-running skips finished stages; an interrupted training
run resumes). Each stage takes the heavy lock itself, so other jobs can interleave:

    upq quantize --method blockwise-ptq --bits 4 --grid seq --group-size channel \\
        --samples 64 --seq-len 256 --epochs 1 --out runs/distill_compare/int4        (under the flock)
    python bench/distill_compare.py --int4 runs/distill_compare/int4 --sweep        # learning rates
    python bench/distill_compare.py --int4 runs/distill_compare/int4                # the table
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from heavy import cached, heavy_lock
from upq.atomic import write_json_atomic, write_text_atomic
from upq.checkpoint import save_quantized
from upq.distill.config import DistillConfig
from upq.distill.data import DataConfig
from upq.distill.student import build_student
from upq.distill.trainer import distill, read_metrics
from upq.evaluation.runner import EvalSettings, evaluate, machine
from upq.models import BUNDLED_MODEL
from upq.modules import pack_model

RESULTS = Path(__file__).parent / "results"
ROWS = ("progressive:gjsd", "direct:gjsd", "progressive:ntp", "direct:ntp")


def eval_settings(args: argparse.Namespace) -> EvalSettings:
    return EvalSettings(tasks=("ppl", "kl"), ppl_max_tokens=args.ppl_tokens, kl_prompts=32, kl_max_new_tokens=128,
                        batch_size=8)


def metrics_of(result: dict[str, Any]) -> dict[str, Any]:
    m = result["metrics"]
    return {"ppl": m["ppl"]["ppl"], "kl": m["kl"]["kl"], "top1": m["kl"]["top1_agreement"],
            "ppl_tokens": m["ppl"]["tokens"], "kl_tokens": m["kl"]["tokens"]}


def save_init(init: str, int4: str, out: Path) -> Path:
    """The untrained INT2 student, packed and saved (the "before" model)."""
    student = build_student(init, int4_dir=int4, model_name=None)
    pack_model(student.model)
    save_quantized(student.model, out, student.tokenizer, method=f"int2-init-{init}",
                   extra={"source_model": student.source_model or BUNDLED_MODEL, "student_init": student.info})
    return out


def train_config(args: argparse.Namespace, init: str, loss: str, tokens: int, lr_weight: float,
                 lr_scale: float) -> DistillConfig:
    return DistillConfig(
        student_init=init, int4_dir=args.int4 if init == "progressive" else None, loss=loss, beta=0.5,
        data=DataConfig(kind="text", seq_len=args.seq_len, heldout_samples=8), tokens=tokens,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr_weight=lr_weight, lr_scale=lr_scale,
        warmup_ratio=0.05, max_grad_norm=1.0, log_every=5, eval_every=max(1, tokens // (args.batch_size * args.grad_accum * args.seq_len) // 4),
        save_every=20, cpu=True)


def run_training(cfg: DistillConfig, out: Path, work: Path) -> dict[str, Any]:
    result = distill(cfg, out, work)
    records = read_metrics(work)
    kls = [(r["step"], r["heldout_kl"]) for r in records if r.get("heldout_kl") is not None]
    losses = [r["loss"] for r in records if r["step"] > 0]
    rates = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    return {"summary": result.summary, "heldout_kl_curve": kls, "loss_first5": sum(losses[:5]) / max(1, len(losses[:5])),
            "loss_last5": sum(losses[-5:]) / max(1, len(losses[-5:])), "tokens_per_s_median": sorted(rates)[len(rates) // 2] if rates else None,
            "config": cfg.to_dict()}


def sweep(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Short progressive gJSD runs at several weight learning rates (scale lr = 10x)."""
    rows = []
    for lr in args.sweep_lrs:
        name = f"sweep-progressive-gjsd-lr{lr:g}"
        cfg = train_config(args, "progressive", "gjsd", args.sweep_tokens, lr, 10 * lr)
        res = cached(work / "stages" / f"{name}.json", lambda: run_training(cfg, work / name / "out", work / name / "work"))
        rows.append({"lr_weight": lr, "lr_scale": 10 * lr, "tokens": res["summary"]["tokens"],
                     "heldout_kl_curve": res["heldout_kl_curve"], "loss_first5": res["loss_first5"],
                     "loss_last5": res["loss_last5"]})
        print(f"sweep lr {lr:g}: held-out KL {res['heldout_kl_curve'][0][1]:.4f} -> {res['heldout_kl_curve'][-1][1]:.4f}",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--int4", required=True, help="INT4 block-wise PTQ checkpoint (SEQ per-channel)")
    parser.add_argument("--work", default="runs/distill_compare")
    parser.add_argument("--tokens", type=int, default=100_000, help="training token budget per run")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr-weight", type=float, default=1e-4)
    parser.add_argument("--lr-scale", type=float, default=1e-3)
    parser.add_argument("--ppl-tokens", type=int, default=16384)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--sweep", action="store_true", help="only run the learning-rate sweep")
    parser.add_argument("--sweep-lrs", type=float, nargs="+", default=[2e-5, 1e-4, 5e-4])
    parser.add_argument("--sweep-tokens", type=int, default=16_384)
    parser.add_argument("--name", default="distill_compare")
    args = parser.parse_args()
    work = Path(args.work)
    (work / "stages").mkdir(parents=True, exist_ok=True)
    settings = eval_settings(args)

    sweep_rows = sweep(args, work) if args.sweep or (work / "stages" / "sweep.json").is_file() else []
    if args.sweep:
        write_json_atomic(work / "stages" / "sweep.json", {"rows": sweep_rows})
        return

    def ev(name: str, model: str | None) -> dict[str, Any]:
        res = cached(work / "stages" / f"eval-{name}.json", lambda: evaluate(model, None, settings))
        print(f"{name}: {metrics_of(res)}", flush=True)
        return res

    table: list[dict[str, Any]] = []
    table.append({"row": "FP (original)", **metrics_of(ev("fp", None))})
    table.append({"row": "INT4 block-wise PTQ (stage 1)", **metrics_of(ev("int4", args.int4))})
    for init in ("progressive", "direct"):
        out = work / f"init-{init}"
        if not (out / "config.json").is_file():
            with heavy_lock():
                save_init(init, args.int4, out)
        table.append({"row": f"INT2 {init} init, untrained", **metrics_of(ev(f"init-{init}", str(out)))})
    for row in args.rows.split(","):
        init, loss = row.split(":")
        name = f"{init}-{loss}"
        cfg = train_config(args, init, loss, args.tokens, args.lr_weight, args.lr_scale)
        train = cached(work / "stages" / f"train-{name}.json",
                       lambda: run_training(cfg, work / name / "out", work / name / "work"))
        result = ev(name, str(work / name / "out"))
        table.append({"row": f"INT2 {init} init + {loss}", **metrics_of(result), "train_tokens": train["summary"]["tokens"],
                      "train_seconds": train["summary"]["seconds"], "tokens_per_s": train["tokens_per_s_median"],
                      "heldout_kl_curve": train["heldout_kl_curve"]})

    report = {"benchmark": args.name, "model": "SmolLM2-135M-Instruct (bundled)", "machine": machine(),
              "int4": args.int4, "budget_tokens": args.tokens, "seq_len": args.seq_len, "batch_size": args.batch_size,
              "grad_accum": args.grad_accum, "lr_weight": args.lr_weight, "lr_scale": args.lr_scale,
              "eval": asdict(settings), "rows": table, "lr_sweep": sweep_rows}
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / f"{args.name}.json", report)
    m = report["machine"]
    lines = [f"# INT2 Distill-QAT: progressive vs direct, gJSD vs NTP -- SmolLM2-135M-Instruct on {m['cpu']} ({m['cores']} cores)", "",
             f"Budget {args.tokens} training tokens per run (wiki text, {args.seq_len}-token sequences, batch "
             f"{args.batch_size} x accum {args.grad_accum}), lr weights {args.lr_weight:g}, lr Delta {args.lr_scale:g}, "
             "AdamW wd 0, 5% warmup + cosine. Eval: held-out wiki ppl "
             f"({settings.ppl_max_tokens} tokens), KL(original || model) and top-1 agreement on the original's greedy answers "
             "to 32 eval chat prompts.", "",
             "| model | ppl | KL | top-1 | train tokens | train s |", "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['row']} | {r['ppl']:.2f} | {r['kl']:.4f} | {r['top1']:.3f} | {r.get('train_tokens', '-')} | "
                     f"{r.get('train_seconds', '-')} |")
    if sweep_rows:
        lines += ["", "Learning-rate sweep (progressive + gJSD, lr Delta = 10 x lr weights; held-out text KL):", "",
                  "| lr weights | tokens | held-out KL start | end |", "|---|---|---|---|"]
        lines += [f"| {s['lr_weight']:g} | {s['tokens']} | {s['heldout_kl_curve'][0][1]:.4f} | {s['heldout_kl_curve'][-1][1]:.4f} |"
                  for s in sweep_rows]
    write_text_atomic(RESULTS / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
