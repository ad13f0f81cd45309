"""Every shipped recipe on the bundled SmolLM2-135M-Instruct at one budget, evaluated alike.

Each recipe runs through ``upq.pipeline.run_recipe`` exactly as ``upq quantize --recipe NAME
--budget BUDGET`` does (plus ``distill.eval_every`` so that the held-out KL curve can be plotted
against training tokens, and an optional common ``--tokens`` override). Every model, and the
untrained INT2 start of the progressive path, is then evaluated with the same settings: held-out
wiki perplexity, KL(original || model) and top-1 agreement on the original's greedy answers to
the 32 eval chat prompts, and IFEval on a fixed subset. Writes ``results/<name>.json``, ``.md``
and ``.png`` (held-out KL vs training tokens, one line per QAT recipe; FP16 = 0 and the INT4
checkpoint as horizontal references).

Finished recipes and evaluations are cached under ``--work``; an interrupted recipe resumes.
Each heavy stage takes the shared heavy-compute lock itself:

    python bench/compare.py                  # all rows, CPU budget
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from heavy import cached, heavy_lock
from upq.atomic import write_json_atomic, write_text_atomic
from upq.checkpoint import save_quantized
from upq.distill.config import DistillConfig
from upq.distill.student import build_student
from upq.distill.trainer import read_metrics
from upq.evaluation.runner import EvalSettings, evaluate, machine
from upq.models import BUNDLED_MODEL
from upq.modules import pack_model
from upq.pipeline import run_recipe
from upq.recipes.schema import Recipe, load_recipe

RESULTS = Path(__file__).parent / "results"
RECIPES = ("ptq-int4", "rtn-int2", "direct-qat", "ntp-qat", "bitdistiller", "r2q", "upq-paper", "upq")
INT2_RECIPES = ("rtn-int2", "direct-qat", "ntp-qat", "bitdistiller", "r2q", "upq-paper", "upq")


def recipe_overrides(name: str, args: argparse.Namespace) -> list[str]:
    """Command-line style overrides applied to every QAT recipe (same budget for all)."""
    stages = {s.kind for s in load_recipe(name, args.budget).stages}
    if "distill" not in stages:
        return []
    sets = [f"distill.eval_every={args.eval_every}"]
    if args.tokens:
        sets.append(f"distill.tokens={args.tokens}")
    return sets


def run_one_recipe(name: str, args: argparse.Namespace, work: Path, recipe_name: str | None = None,
                   extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Quantize row ``name`` with a recipe (default: the recipe ``name``) plus ``extra`` overrides
    (resumable); return its provenance and held-out KL curve."""
    overrides = recipe_overrides(recipe_name or name, args) + list(extra)
    recipe = load_recipe(recipe_name or name, args.budget, overrides)
    out, stage_work = work / name, work / f"{name}.work"
    if not (stage_work / "recipe.json").is_file():
        stage_work.mkdir(parents=True, exist_ok=True)
        reused = reuse_finished_stages(recipe.as_dict(), stage_work, sorted(work.glob("*.work")))
        if reused:
            print(f"{name}: reusing finished stage(s) {reused} of an earlier row", flush=True)
    run_recipe(recipe, None, out, work_dir=stage_work, keep_work=True)
    config = json.loads((out / "config.json").read_text())
    stages = config["quantization_config"]["stages"]
    curve: list[tuple[int, float]] = []
    for index, stage in enumerate(recipe.stages):
        if stage.kind == "distill":
            tokens = 0
            for record in read_metrics(stage_work / f"{index}-distill" / "train"):
                tokens += int(record.get("input_tokens", 0))
                if record.get("heldout_kl") is not None:
                    curve.append((tokens, record["heldout_kl"]))
    return {"recipe": recipe.as_dict(), "overrides": overrides, "stages": stages,
            "quantize_seconds": round(sum(s["seconds"] for s in stages), 1),
            "train_tokens": sum(s.get("tokens", 0) for s in stages if s["stage"] == "distill"),
            "heldout_kl_curve": curve}


def reuse_finished_stages(recipe_dict: dict[str, Any], stage_work: Path, donors: list[Path]) -> list[str]:
    """Copy the finished leading stages that an earlier run (one of ``donors``) computed with identical settings.

    A variant that only changes a later stage then skips the stages it shares with an earlier
    row (the donor sharing the longest finished prefix). Returns the copied stage directory names.
    """
    stages = json.loads(json.dumps(recipe_dict["stages"], default=str))
    best: tuple[list[str], Path | None] = ([], None)
    for donor in donors:
        marker = donor / "recipe.json"
        if donor == stage_work or not marker.is_file():
            continue
        names = []
        for index, (mine, theirs) in enumerate(zip(stages, json.loads(marker.read_text())["recipe"]["stages"])):
            name = f"{index}-{mine['stage']}"
            if mine != theirs or not (donor / name / "DONE.json").is_file():
                break
            names.append(name)
        if len(names) > len(best[0]):
            best = (names, donor)
    names, donor = best
    for name in names:
        if not (stage_work / name).exists():
            shutil.copytree(donor / name, stage_work / name)
    return names


def progressive_start(recipe: Recipe, stage_work: Path) -> tuple[DistillConfig, Path] | None:
    """(distill config, checkpoint it starts from) of a recipe whose distill stage is progressive."""
    for index, stage in enumerate(recipe.stages):
        if stage.kind == "distill" and stage.config.student_init == "progressive" and index > 0:
            previous = recipe.stages[index - 1]
            return stage.config, stage_work / f"{index - 1}-{previous.kind}" / "out"
    return None


def save_untrained_start(cfg: DistillConfig, start_dir: Path, out: Path) -> None:
    """The untrained INT2 student of a progressive distill stage (its hand-off from ``start_dir``), packed."""
    student = build_student("progressive", int4_dir=str(start_dir), spec=cfg.spec, delta_init=cfg.delta_init,
                            include=cfg.include, exclude=cfg.exclude, calibration=cfg.calibration)
    pack_model(student.model)
    save_quantized(student.model, out, student.tokenizer, method="int2-untrained-start",
                   extra={"source_model": BUNDLED_MODEL, "student_init": student.info})


def metrics_of(result: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one evaluation."""
    m = result["metrics"]
    row = {"ppl": m["ppl"]["ppl"], "kl": m["kl"]["kl"], "top1": m["kl"]["top1_agreement"]}
    if "ifeval" in m:
        row["ifeval_prompt_strict"] = m["ifeval"]["prompt_level_strict"]
        row["ifeval_prompt_loose"] = m["ifeval"]["prompt_level_loose"]
        row["ifeval_inst_strict"] = m["ifeval"]["inst_level_strict"]
    size = result.get("size") or {}
    if size.get("weights_bytes"):
        row["checkpoint_mib"] = round(size["weights_bytes"] / 2**20, 1)
    row["eval_seconds"] = result.get("timings_s", {}).get("total")
    return row


def plot(report: dict[str, Any], path: Path) -> bool:
    """Held-out KL vs training tokens per QAT recipe, with FP16 and INT4 references (False: no matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return False
    fig, ax = plt.subplots(figsize=(10, 4.8))
    refs = {r["row"]: r for r in report["rows"]}
    for row in report["rows"]:
        curve = row.get("heldout_kl_curve")
        if curve:
            line, = ax.plot([t for t, _ in curve], [k for _, k in curve], marker="o", markersize=3,
                            label=f"{row['row'].split(' (')[0]} (trainer held-out KL)")
            ax.plot([curve[-1][0]], [row["kl"]], marker="x", markersize=9, color=line.get_color())
    ax.axhline(0.0, color="black", linestyle="--", linewidth=1, label="FP16 (KL 0)")
    if "ptq-int4" in refs:
        ax.axhline(refs["ptq-int4"]["kl"], color="grey", linestyle=":", label="INT4 PTQ (eval-prompt KL)")
    if "rtn-int2" in refs:
        ax.axhline(refs["rtn-int2"]["kl"], color="red", linestyle=":", label="RTN INT2 (eval-prompt KL)")
    ax.set_xlabel("distillation training tokens")
    ax.set_ylabel("KL(original || model); x = final eval-prompt KL")
    ax.set_title(f"SmolLM2-135M-Instruct, INT2 recipes, {report['budget']} budget")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(report: dict[str, Any]) -> str:
    """The comparison table and the verdict on UPQ."""
    m, s = report["machine"], report["eval"]
    lines = [f"# Recipes compared: SmolLM2-135M-Instruct on {m['cpu']} ({m['cores']} cores, no GPU)", "",
             f"Budget `{report['budget']}` for every recipe; QAT recipes train on {report['tokens_label']} distillation "
             "tokens each (reduced CPU budget; the paper-scale GPU budget is 20M+). Eval: held-out wiki perplexity "
             f"({s['ppl_max_tokens']} tokens), KL(original || model) and top-1 agreement on the original's greedy answers "
             f"to {s['kl_prompts']} eval chat prompts ({s['kl_max_new_tokens']} tokens), IFEval on the first "
             f"{s['limit']} prompts (greedy, {s['ifeval_max_new_tokens']} new tokens; prompt-level strict / loose).",
             f"Command: `{report['command']}`", "",
             f"Uniform-guess line: KL {report['uniform_kl']:.2f} nats/token (log V minus the original's mean entropy "
             "on these tokens); a row above it is confidently wrong. KL alone ranks over-confidence in that regime, "
             "so read top-1 agreement beside it.", "",
             "| row | ppl | KL | KL / uniform | top-1 | IFEval strict | IFEval loose | train tokens | quantize s | checkpoint MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        ife = (f"{r['ifeval_prompt_strict']:.3f} | {r['ifeval_prompt_loose']:.3f}" if "ifeval_prompt_strict" in r
               else "- | -")
        lines.append(f"| {r['row']} | {r['ppl']:.2f} | {r['kl']:.4f} | {r['kl'] / report['uniform_kl']:.2f} | "
                     f"{r['top1']:.3f} | {ife} | "
                     f"{r.get('train_tokens', '-')} | {r.get('quantize_seconds', '-')} | {r.get('checkpoint_mib', '-')} |")
    lines += ["", report["verdict"]]
    return "\n".join(lines) + "\n"


def verdict(rows: dict[str, dict[str, Any]], variants: dict[str, dict[str, Any]] | None = None,
            original: dict[str, Any] | None = None) -> str:
    """Does UPQ beat every other INT2 row on KL and on IFEval (prompt-level strict), and does it
    reach the targets (KL <= 2.0, top-1 >= 0.5, perplexity <= 5x the original's)?

    ``variants`` (UPQ with overrides) are reported beside the shipped rows, not counted as them.
    """
    tail = "".join(f" Variant {r['row']}: KL {r['kl']:.4g}, top-1 {r['top1']:.3f}." for r in (variants or {}).values())
    if "upq" not in rows:
        return ("UPQ row missing: no verdict." + tail).strip()
    upq = rows["upq"]
    others = [rows[n] for n in INT2_RECIPES if n != "upq" and n in rows]
    parts = []
    for key, label, better in (("kl", "KL", min), ("ifeval_prompt_strict", "IFEval prompt-level strict", max)):
        if key not in upq or not others:
            continue
        best_other = better(others, key=lambda r: r[key])
        wins = all((upq[key] < r[key]) if better is min else (upq[key] > r[key]) for r in others)
        parts.append(f"{label}: UPQ {upq[key]:.4g} vs best other INT2 row {best_other['row']} {best_other[key]:.4g} -> "
                     f"UPQ {'beats every other INT2 row' if wins else 'does NOT beat every other INT2 row'}.")
    if original is not None:
        checks = [("KL <= 2.0", upq["kl"] <= 2.0), ("top-1 >= 0.5", upq["top1"] >= 0.5),
                  ("perplexity <= 5x the original", upq["ppl"] <= 5 * original["ppl"])]
        parts.append("Targets: " + ", ".join(f"{name} {'met' if ok else 'NOT met'}" for name, ok in checks) + ".")
    if not parts:
        return ("No other shipped INT2 recipe in this run: no verdict." + tail).strip()
    return "Verdict at this budget: " + " ".join(parts) + tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--budget", default="cpu")
    parser.add_argument("--tokens", type=int, default=None, help="common distillation token budget (default: the budget's)")
    parser.add_argument("--eval-every", type=int, default=8, help="held-out KL every N training steps (the plot)")
    parser.add_argument("--work", default="runs/compare")
    parser.add_argument("--ppl-tokens", type=int, default=16384)
    parser.add_argument("--ifeval-limit", type=int, default=48)
    parser.add_argument("--ifeval-max-new-tokens", type=int, default=128)
    parser.add_argument("--name", default="compare")
    parser.add_argument("--starts", action=argparse.BooleanOptionalAction, default=True,
                        help="also evaluate the untrained INT2 start of every progressive row")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME RECIPE", "KEY=VALUE"),
                        help="an extra row: NAME, a shipped RECIPE and its overrides, e.g. "
                             "--variant upq-g64 upq ptq.group_size=64 distill.group_size=64")
    args = parser.parse_args()
    for spec in args.variant:
        if len(spec) < 2:
            parser.error(f"--variant needs NAME RECIPE [KEY=VALUE ...], got {spec}")
    work = Path(args.work)
    (work / "evals").mkdir(parents=True, exist_ok=True)
    settings = EvalSettings(tasks=("ppl", "kl", "ifeval"), ppl_max_tokens=args.ppl_tokens, kl_prompts=32,
                            kl_max_new_tokens=128, limit=args.ifeval_limit,
                            ifeval_max_new_tokens=args.ifeval_max_new_tokens, batch_size=16)

    def ev(name: str, model: str | None) -> dict[str, Any]:
        result = cached(work / "evals" / f"{name}.json", lambda: evaluate(model, None, settings))
        print(f"eval {name}: {metrics_of(result)}", flush=True)
        return result

    rows: list[dict[str, Any]] = [{"row": "FP (original)", **metrics_of(ev("fp", None))}]
    by_name: dict[str, dict[str, Any]] = {}
    seen_starts: set[str] = set()

    def start_row(name: str, recipe: Recipe) -> None:
        """The untrained INT2 start of a progressive row, evaluated alike (``--starts``), once per distinct start."""
        found = progressive_start(recipe, work / f"{name}.work")
        if not args.starts or found is None:
            return
        cfg = found[0]
        stages = recipe.as_dict()["stages"]
        key = json.dumps([stages[: next(i for i, s in enumerate(stages) if s["stage"] == "distill")],
                          cfg.spec.describe(), cfg.delta_init, asdict(cfg.calibration)], sort_keys=True, default=str)
        if key in seen_starts:
            return
        seen_starts.add(key)
        start = work / f"{name}-start"
        if not (start / "config.json").is_file():
            with heavy_lock():
                save_untrained_start(*found, start)
        rows.append({"row": f"{name}: INT2 start before distillation ({found[0].delta_init} hand-off)",
                     **metrics_of(ev(f"{name}-start", str(start)))})

    for name in args.recipes.split(","):
        built = cached(work / "evals" / f"build-{name}.json", lambda: run_one_recipe(name, args, work))
        row = {"row": name, **metrics_of(ev(name, str(work / name))), **built}
        rows.append(row)
        by_name[name] = row
        start_row(name, load_recipe(name, args.budget, recipe_overrides(name, args)))
    variants: dict[str, dict[str, Any]] = {}
    for name, recipe_name, *extra in args.variant:
        built = cached(work / "evals" / f"build-{name}.json",
                       lambda: run_one_recipe(name, args, work, recipe_name, tuple(extra)))
        row = {"row": f"{name} ({recipe_name} + {' '.join(extra) or 'no override'})",
               **metrics_of(ev(name, str(work / name))), **built}
        rows.append(row)
        variants[name] = row
        start_row(name, load_recipe(recipe_name, args.budget, recipe_overrides(recipe_name, args) + list(extra)))

    uniform = cached(work / "evals" / "uniform.json",
                     lambda: evaluate(None, None, replace(settings, tasks=("kl",))))["metrics"]["kl"]["uniform_kl"]
    tokens = sorted({r["train_tokens"] for r in by_name.values() if r.get("train_tokens")})
    report = {"benchmark": args.name, "model": "SmolLM2-135M-Instruct (bundled)", "machine": machine(),
              "budget": args.budget, "tokens_override": args.tokens,
              "tokens_label": "/".join(str(t) for t in tokens) or "0",
              "command": " ".join(["python bench/compare.py", *map(shlex.quote, sys.argv[1:])]),
              "eval": asdict(settings), "uniform_kl": uniform, "rows": rows,
              "verdict": verdict(by_name, variants, rows[0])}
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / f"{args.name}.json", report)
    write_text_atomic(RESULTS / f"{args.name}.md", markdown(report))
    plot(report, RESULTS / f"{args.name}.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
