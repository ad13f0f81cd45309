"""Training throughput of Distill-QAT on the bundled SmolLM2-135M-Instruct, and the fake-quant overhead.

Rows (tokens/s = input tokens per second of wall time, median over the timed steps):

* ``plain fp32`` / ``plain bf16``: the original model (weights in that dtype), forward + backward
  with the decoder linears trainable (same parameters as the student), next-token loss from the
  final hidden states in chunks (the loss code the trainer uses);
* ``INT2 fake-quant fp32`` / ``... bf16 autocast``: the same for the INT2 SEQ student
  (per-channel; latent weights and Delta trainable) -- the ratio to the plain row is the
  fake-quantization overhead;
* ``distill step``: one full optimizer step of the real trainer (``upq.distill.trainer``):
  frozen teacher forward, student forward + backward, chunked gJSD(0.5), AdamW. fp32, and bf16
  autocast with a bf16 teacher.

    flock /tmp/upq-heavy.lock python bench/distill_throughput.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import statistics
import tempfile
import time
from pathlib import Path

import torch

from upq.atomic import write_json_atomic, write_text_atomic
from upq.data.text import load_texts, token_blocks
from upq.distill.config import DistillConfig
from upq.distill.data import DataConfig
from upq.distill.losses import chunked_loss
from upq.distill.memory import CHECKPOINTING
from upq.distill.student import direct_student
from upq.distill.trainer import Backbone, distill, read_metrics
from upq.evaluation.runner import machine
from upq.models import load_model
from upq.peak_memory import peak_rss_mib
from upq.modules import select_linears

RESULTS = Path(__file__).parent / "results"


def _fwd_bwd_rate(lm: torch.nn.Module, ids: torch.Tensor, steps: int, autocast: bool) -> float:
    """Median tokens/s of forward + chunked next-token loss + backward over ``steps`` timed steps (+1 warm-up)."""
    backbone = Backbone(lm).train()
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    rates = []
    for step in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden = backbone(ids, mask)
            loss = chunked_loss("ntp", hidden, None, backbone.head, None, labels=labels, chunk_tokens=1024)
        loss.backward()
        lm.zero_grad(set_to_none=True)
        if step:
            rates.append(ids.numel() / (time.perf_counter() - start))
    return statistics.median(rates)


def _plain(dtype: torch.dtype) -> torch.nn.Module:
    lm, _ = load_model(None, dtype=dtype)
    lm.requires_grad_(False)
    for _, linear in select_linears(lm):
        linear.weight.requires_grad_(True)
    return lm


def _trainer_config(batch: int, grad_accum: int, seq_len: int, steps: int, mixed_precision: str,
                    teacher_dtype: str, data: str = "text", settings: dict | None = None) -> DistillConfig:
    """The benchmarked step: a direct INT2 student, gJSD 0.5, ``batch x grad_accum`` sequences of
    ``data`` (``text``: wiki text, every position a token; ``mix``: the recipes' half chat answers,
    half text, where shorter chat samples are padded within a micro-batch). ``settings``: other
    ``DistillConfig`` fields (e.g. ``gradient_checkpointing``, ``block_cache_mib``; absent: the defaults)."""
    return DistillConfig(student_init="direct", data=DataConfig(kind=data, seq_len=seq_len, heldout_samples=0),
                         steps=steps + 1, batch_size=batch, grad_accum=grad_accum, loss="gjsd", beta=0.5,
                         log_every=1, save_every=10_000, mixed_precision=mixed_precision,
                         teacher_dtype=teacher_dtype, cpu=True,
                         **(settings or {}))


def _trainer_rate(batch: int, grad_accum: int, seq_len: int, steps: int, data: str, settings: dict,
                  mixed_precision: str, teacher_dtype: str) -> dict:
    """Median tokens/s and peak RSS (MiB) of real trainer steps (run this in a fresh process)."""
    work = Path(tempfile.mkdtemp(prefix="upq-bench-distill-"))
    try:
        cfg = _trainer_config(batch, grad_accum, seq_len, steps, mixed_precision, teacher_dtype, data, settings)
        distill(cfg, None, work)
        records = [r for r in read_metrics(work) if r["step"] > 1]
        return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
                "memory_mib": max(r["memory_mib"] for r in records)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


PARTS = ("teacher_forward", "student_forward", "loss", "backward", "optimizer", "data")


def _trainer_profile(batch: int, grad_accum: int, seq_len: int, steps: int, data: str, settings: dict,
                     mixed_precision: str, teacher_dtype: str) -> dict:
    """Seconds per step in each labelled part of the trainer's step (``torch.profiler``, steps 2..),
    the step's tokens/s and the peak RSS while stepping (run this in a fresh process)."""
    from torch.profiler import ProfilerActivity, profile

    work = Path(tempfile.mkdtemp(prefix="upq-bench-distill-"))
    prof = profile(activities=[ProfilerActivity.CPU])
    try:
        cfg = _trainer_config(batch, grad_accum, seq_len, steps, mixed_precision, teacher_dtype, data, settings)
        peak_at_start = peak_rss_mib()
        warm_peak = [0.0]

        def on_step(record: dict) -> None:
            if record["step"] == 1:  # after the warm-up step: profile and measure the steady peak from here
                warm_peak[0] = peak_rss_mib()
                Path("/proc/self/clear_refs").write_text("5")
                prof.start()
            elif record["step"] == steps + 1:
                prof.stop()

        distill(cfg, None, work, on_step=on_step)
        records = [r for r in read_metrics(work) if r["step"] > 1]
        totals = {e.key: e.cpu_time_total / 1e6 / steps for e in prof.key_averages() if e.key.startswith("distill.")}
        return {"parts_s_per_step": {p: round(totals.get(f"distill.{p}", 0.0), 3) for p in PARTS},
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
                "step_peak_rss_mib": round(peak_rss_mib(), 1),
                "process_peak_rss_mib": round(max(warm_peak[0], peak_rss_mib()), 1),
                "peak_rss_before_training_mib": round(peak_at_start, 1)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --precision -> (DistillConfig.mixed_precision, DistillConfig.teacher_dtype), and how the report names it
PRECISIONS = {"fp32": (("no", "float32"), "fp32 step of the real trainer (teacher fp32"),
              "bf16": (("bf16", "bfloat16"), "bf16-autocast step of the real trainer (teacher bf16")}

# DistillConfig fields this script's flags set: field -> (flag, argparse attribute)
SETTING_FLAGS = {"gradient_checkpointing": ("--recompute", "recompute"),
                 "block_cache_mib": ("--block-cache-mib", "block_cache_mib")}


def _settings(args: argparse.Namespace) -> dict:
    """The ``DistillConfig`` fields set on the command line."""
    chosen = {field: getattr(args, attr) for field, (_, attr) in SETTING_FLAGS.items()}
    return {field: value for field, value in chosen.items() if value is not None}


def _setting_flags(args: argparse.Namespace) -> list[str]:
    """:func:`_settings` as command-line flags."""
    return [part for field, value in _settings(args).items() for part in (SETTING_FLAGS[field][0], str(value))]


def _trainer_subprocess(args: argparse.Namespace, mode: str, mixed_precision: str, teacher_dtype: str,
                        source: Path | None = None) -> dict:
    """:func:`_trainer_rate` (``mode="rate"``) or :func:`_trainer_profile` (``"profile"``) in a fresh
    interpreter, so its peak RSS is the training process's own. ``source``: run another checkout's
    copy of this script and package instead (its repository root; batch x 1 on text, as older
    checkouts have no ``--grad-accum`` / ``--data``)."""
    script, env = Path(__file__), None
    cmd = ["--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    if source is None:
        cmd += ["--grad-accum", str(args.grad_accum), "--data", args.data]
        cmd += _setting_flags(args)
    else:
        script, env = source / "bench" / "distill_throughput.py", {**os.environ, "PYTHONPATH": str(source / "src")}
    cmd = [sys.executable, str(script), f"--trainer-{mode}", mixed_precision, teacher_dtype, *cmd]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=script.parent.parent, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def write_rate_runs(args: argparse.Namespace) -> None:
    """``NAME.json`` / ``.md``: ``--rate-runs`` unprofiled fp32 trainer runs, each (with
    ``--baseline-src``) paired with a run of the baseline checkout, so every pair shares the VM's
    state; the pairs alternate which runs first, so that a drift within a pair favours neither."""
    runs = []
    for index in range(args.rate_runs):
        run = {"run": index + 1}
        order = ("baseline", "this") if index % 2 == 0 else ("this", "baseline")
        for side in order if args.baseline_src else ("this",):
            source = Path(args.baseline_src) if side == "baseline" else None
            run[side] = _trainer_subprocess(args, "rate", *PRECISIONS[args.precision][0], source)
        run["first"] = order[0] if args.baseline_src else "this"
        runs.append(run)
        print(json.dumps(run), flush=True)
    command = (f"python bench/distill_throughput.py --rate-runs {args.rate_runs} --precision {args.precision} "
               f"--steps {args.steps} --batch {args.batch} "
               f"--grad-accum {args.grad_accum} --data {args.data}"
               + "".join(f" {part}" for part in _setting_flags(args))
               + (" --baseline-src BASELINE" if args.baseline_src else "")
               + f" --name {args.name}")
    report = {"benchmark": args.name, "model": "SmolLM2-135M-Instruct (bundled)", "machine": machine(),
              "batch": args.batch, "grad_accum": args.grad_accum, "seq_len": args.seq_len, "data": args.data,
              "precision": args.precision, "recompute": args.recompute or DistillConfig.gradient_checkpointing,
              "block_cache_mib": args.block_cache_mib if args.block_cache_mib is not None else DistillConfig.block_cache_mib,
              "timed_steps": args.steps,
              "baseline": args.baseline_label if args.baseline_src else None, "runs": runs, "command": command}
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / f"{args.name}.json", report)
    m = report["machine"]
    lines = [f"# Distillation step without the profiler: SmolLM2-135M-Instruct on {m['cpu']} ({m['cores']} cores)", "",
             f"{PRECISIONS[args.precision][1]}, gJSD 0.5, AdamW), {args.batch} x {args.seq_len} tokens "
             f"per micro-batch, {args.grad_accum} micro-batch(es) per step, {args.data} data, recomputation "
             f"`{report['recompute']}`, block cache {report['block_cache_mib']} MiB; median tokens/s "
             f"(non-padding input tokens) of {args.steps} steps after one warm-up; peak RSS of the training process (loading included). Each run is a fresh process; "
             f"nothing else running. `{command}`" + (f"; baseline = {args.baseline_label}." if args.baseline_src else "."),
             ""]
    if args.baseline_src:
        lines += ["| run | ran first | baseline tokens/s | this tokens/s | baseline peak RSS MiB | this peak RSS MiB |",
                  "|---:|---|---:|---:|---:|---:|"]
        lines += [f"| {r['run']} | {r['first']} | {r['baseline']['tokens_per_s']:.1f} | {r['this']['tokens_per_s']:.1f} | "
                  f"{r['baseline']['memory_mib']:.0f} | {r['this']['memory_mib']:.0f} |" for r in runs]
    else:
        lines += ["| run | tokens/s | peak RSS MiB |", "|---:|---:|---:|"]
        lines += [f"| {r['run']} | {r['this']['tokens_per_s']:.1f} | {r['this']['memory_mib']:.0f} |" for r in runs]
    write_text_atomic(RESULTS / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def write_profile(args: argparse.Namespace, prof: dict) -> None:
    """``NAME.json`` / ``.md``: the distill step by part."""
    report = {"benchmark": args.name, "model": "SmolLM2-135M-Instruct (bundled)", "machine": machine(),
              "batch": args.batch, "seq_len": args.seq_len, "precision": args.precision, "profiled_steps": args.steps,
              **prof,
              **_settings(args),
              "command": f"python bench/distill_throughput.py --profile-only --precision {args.precision} "
                         f"--steps {args.steps}"
                         + "".join(f" {part}" for part in _setting_flags(args)) + f" --name {args.name}"}
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / f"{args.name}.json", report)
    m, parts = report["machine"], prof["parts_s_per_step"]
    step = sum(parts.values())
    lines = [f"# Distill step by part: SmolLM2-135M-Instruct on {m['cpu']} ({m['cores']} cores, CPU only)", "",
             f"One {PRECISIONS[args.precision][1]}, gJSD 0.5, AdamW), batch {args.batch} x "
             f"{args.seq_len} tokens; `torch.profiler` over {args.steps} steps after one warm-up, seconds per step "
             f"in each labelled part (`record_function` in `distill/trainer.py`). `{report['command']}`, idle machine.", "",
             "| part | s / step | share |", "|---|---:|---:|"]
    lines += [f"| {p} | {v:.3f} | {100 * v / step:.0f}% |" for p, v in parts.items()]
    lines += [f"| **step (sum of parts)** | **{step:.3f}** | |", "",
              f"Tokens/s (trainer's own clock, median of the profiled steps): **{prof['tokens_per_s']:.1f}**. "
              f"Peak RSS while stepping (after the warm-up step): **{prof['step_peak_rss_mib']:.0f} MiB**; "
              f"process peak including loading: {prof['process_peak_rss_mib']:.0f} MiB "
              f"({prof['peak_rss_before_training_mib']:.0f} MiB before the trainer started)."]
    write_text_atomic(RESULTS / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="micro-batches per optimizer step (the step trains on batch x grad-accum sequences)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--data", choices=("text", "mix"), default="text",
                        help="training data of the distill-step rows (mix: the recipes' chat + text mix)")
    parser.add_argument("--recompute", choices=CHECKPOINTING,
                        help="the trainer's gradient_checkpointing in the distill-step rows (default: its default)")
    parser.add_argument("--block-cache-mib", type=int,
                        help="the trainer's block_cache_mib in the distill-step rows (default: its default)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the fwd+bwd rows (best of)")
    parser.add_argument("--name", default="distill_throughput")
    parser.add_argument("--profile-only", action="store_true",
                        help="only the distill step, profiled by part (writes NAME.json / .md)")
    parser.add_argument("--trainer-rate", nargs=2, metavar=("MIXED_PRECISION", "TEACHER_DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--trainer-profile", nargs=2, metavar=("MIXED_PRECISION", "TEACHER_DTYPE"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--rate-runs", type=int, default=0,
                        help="only N unprofiled runs of the distill step (writes NAME.json / .md)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="the step's precision in --rate-runs and --profile-only "
                             "(bf16: autocast and a bf16 teacher)")
    parser.add_argument("--baseline-src", help="with --rate-runs: a checkout whose step runs before each run")
    parser.add_argument("--baseline-label", default="baseline", help="what --baseline-src is, for the report")
    args = parser.parse_args()
    if args.trainer_rate:
        print(json.dumps(_trainer_rate(args.batch, args.grad_accum, args.seq_len, args.steps, args.data, _settings(args),
                                       *args.trainer_rate)))
        return
    if args.trainer_profile:
        print(json.dumps(_trainer_profile(args.batch, args.grad_accum, args.seq_len, args.steps, args.data, _settings(args),
                                          *args.trainer_profile)))
        return
    if args.rate_runs:
        if args.baseline_src and args.data != "text":
            parser.error("--baseline-src runs the baseline on text data only")
        write_rate_runs(args)
        return
    if args.profile_only:
        write_profile(args, _trainer_subprocess(args, "profile", *PRECISIONS[args.precision][0]))
        return

    load_before = os.getloadavg()
    _, tokenizer = load_model(None)
    ids = token_blocks(load_texts("wiki", "train"), tokenizer, args.seq_len, args.batch)
    rows = []

    def add(name: str, rate: float, note: str = "", memory: float | None = None) -> None:
        rows.append({"row": name, "tokens_per_s": round(rate, 1), "memory_mib": memory, "note": note})
        print(f"{name}: {rate:.1f} tokens/s {note}", flush=True)

    models = {"plain fp32": _plain(torch.float32), "plain bf16": _plain(torch.bfloat16),
              "INT2 fake-quant fp32": direct_student(None).model}
    runs = [("plain fp32", "plain fp32", False), ("plain bf16", "plain bf16", False),
            ("plain fp32 bf16-autocast", "plain fp32", True), ("INT2 fake-quant fp32", "INT2 fake-quant fp32", False),
            ("INT2 fake-quant bf16-autocast", "INT2 fake-quant fp32", True)]
    best: dict[str, float] = {}
    for _ in range(args.rounds):  # interleaved rounds, best of: robust to other jobs on a shared box
        for label, key, autocast in runs:
            best[label] = max(best.get(label, 0.0), _fwd_bwd_rate(models[key], ids, args.steps, autocast))
    plain32, plain16, plain_ac = best["plain fp32"], best["plain bf16"], best["plain fp32 bf16-autocast"]
    fq32, fq16 = best["INT2 fake-quant fp32"], best["INT2 fake-quant bf16-autocast"]
    add("plain fp32 fwd+bwd", plain32)
    add("plain bf16 weights fwd+bwd", plain16)
    add("plain fp32 weights, bf16 autocast fwd+bwd", plain_ac)
    add("INT2 fake-quant fp32 fwd+bwd", fq32, f"fake-quant overhead x{plain32 / fq32:.2f} vs plain fp32")
    add("INT2 fake-quant bf16-autocast fwd+bwd", fq16, f"fake-quant overhead x{plain_ac / fq16:.2f} vs plain bf16 autocast")
    del models
    fp32 = _trainer_subprocess(args, "rate", *PRECISIONS["fp32"][0])
    add("distill step fp32 (teacher fp32, gJSD, AdamW)", fp32["tokens_per_s"],
        f"x{plain32 / fp32['tokens_per_s']:.2f} slower than plain fp32 fwd+bwd", fp32["memory_mib"])
    bf16 = _trainer_subprocess(args, "rate", *PRECISIONS["bf16"][0])
    add("distill step bf16 autocast (teacher bf16, gJSD, AdamW)", bf16["tokens_per_s"],
        f"x{plain_ac / bf16['tokens_per_s']:.2f} slower than plain bf16-autocast fwd+bwd", bf16["memory_mib"])
    report = {"benchmark": args.name, "model": "SmolLM2-135M-Instruct (bundled)", "machine": machine(),
              "batch": args.batch, "seq_len": args.seq_len, "timed_steps": args.steps, "rounds": args.rounds, "rows": rows,
              "command": "flock /tmp/upq-heavy.lock python bench/distill_throughput.py",
              "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / f"{args.name}.json", report)
    m = report["machine"]
    lines = [f"# Distill-QAT training throughput: SmolLM2-135M-Instruct on {m['cpu']} ({m['cores']} cores, CPU only)", "",
             f"Batch {args.batch} x {args.seq_len} tokens, median of {args.steps} timed steps after one warm-up "
             f"(fwd+bwd rows: best of {args.rounds} interleaved rounds); "
             f"torch {m['torch']}, {m['torch_threads']} threads. `{report['command']}`. 1-min load average "
             f"{report['loadavg_before'][0]:.2f} before / {report['loadavg_after'][0]:.2f} after.", "",
             "| row | tokens/s | peak RSS MiB (trainer process) | note |", "|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['tokens_per_s']} | {r['memory_mib'] or '-'} | {r['note']} |" for r in rows]
    write_text_atomic(RESULTS / f"{args.name}.md", "\n".join(lines) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
